"""GGUF (llama.cpp's format) as a source: de-quantised, renamed, q/k permutation undone, tokenizer rebuilt.

Reference: HF transformers loading the very same file (`from_pretrained(dir, gguf_file=...)`), and for an F32 file
the HF model it was written from (so the permutation is checked against more than transformers' GGUF reader).
"""

from __future__ import annotations

import json

import pytest
import torch

from exporter.ft.convert import convert_checkpoint
from exporter.parallel import ParallelLayout
from gguf_fixtures import write_gguf
from templates.ft_python import ft_gpt
from tokenizer_fixtures import lambada_texts
from templates.ft_python.ft_checkpoint import CheckpointError

pytest.importorskip("gguf", reason="the `gguf` package reads GGUF files")

# gguf-py quantises the first six; the K-quants are valid blocks of random bytes (see gguf_fixtures.py).
TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
TEXT = "The quick brown fox jumps over the lazy dog, and then it ran back home to its"


def _transformers(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _logits(model, ids):
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits.float()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    built = {}

    def get(kind, **kwargs):
        key = (kind, tuple(sorted(kwargs.items())))
        if key not in built:
            directory = tmp_path_factory.mktemp(f"gguf-{kind}")
            built[key] = write_gguf(directory / f"tiny-{kind}.gguf", kind, **kwargs)
        return built[key]

    return get


@pytest.mark.parametrize("kind", TYPES)
def test_logits_match_transformers(files, tmp_path, kind):
    path = files(kind)
    reference, tokenizer = _transformers(path)
    ids = tokenizer(TEXT).input_ids
    expected = _logits(reference, ids)
    layouts = [1, 2] if kind in ("Q4_K", "Q8_0") else [1]  # TP 2 splits de-quantised rows like any other source
    for tp in layouts:
        shards = convert_checkpoint(path, tmp_path / f"tp{tp}", ParallelLayout(tp))
        logits = ft_gpt.FTGPT.from_shards(shards, device="cpu").forward_logits(torch.tensor([ids]).numpy())
        assert (logits - expected).abs().max().item() < 1e-4, (kind, tp)


def test_f32_file_equals_the_model_it_was_written_from(tmp_path):
    """The q/k rows llama.cpp's converter permutes come back in HF's order: logits equal the original HF model's."""
    from transformers import AutoModelForCausalLM

    path = write_gguf(tmp_path / "tiny.gguf", "F32", tied=True, hf_dir=tmp_path / "hf")
    original = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = [0, 17, 250, 3, 99, 140, 7, 320, 45]
    shards = convert_checkpoint(path, tmp_path / "out")
    logits = ft_gpt.FTGPT.from_shards(shards, device="cpu").forward_logits(torch.tensor([ids]).numpy())
    assert (logits - _logits(original, ids)).abs().max().item() < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("pre,add_bos", [("smollm", True), ("llama-bpe", False)])
def test_tokenizer_ids_equal_transformers_on_lambada(files, tmp_path, pre, add_bos):
    """The tokenizer.json rebuilt from the metadata gives transformers' ids on the whole LAMBADA text, with and
    without the special tokens the file asks for (here BOS)."""
    from tokenizers import Tokenizer

    path = files("Q8_0", pre=pre, add_bos=add_bos)
    _, reference = _transformers(path)
    shards = convert_checkpoint(path, tmp_path / "out")
    ours = Tokenizer.from_file(str(shards / "tokenizer.json"))
    config = json.loads((shards / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is add_bos and config["bos_token"] == "<|endoftext|>"
    texts = lambada_texts()
    assert [encoding.ids for encoding in ours.encode_batch(texts)] == reference(texts).input_ids
    plain = reference(texts, add_special_tokens=False).input_ids
    assert [encoding.ids for encoding in ours.encode_batch(texts, add_special_tokens=False)] == plain
    assert (ours.encode(texts[0]).ids[0] == 0) is add_bos
    assert ours.decode(plain[0]) == reference.decode(plain[0])


@pytest.mark.parametrize("case,kwargs,named", [
    ("quantisation type", {"kind": "Q5_0"}, "Q5_0"),
    ("architecture", {"architecture": "gpt2"}, "'gpt2'"),
    ("tokenizer model", {"tokenizer_model": "bert"}, "'bert'"),
    ("pre-tokenizer", {"pre": "mystery-bpe"}, "'mystery-bpe'"),
])
def test_unsupported_input_is_refused_before_writing(tmp_path, case, kwargs, named):
    kind = kwargs.pop("kind", "Q8_0")
    path = write_gguf(tmp_path / "bad.gguf", kind, **kwargs)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError) as error:
        convert_checkpoint(path, out)
    message = str(error.value)
    assert named in message and "supported" in message, (case, message)
    assert not out.exists() or not any(out.rglob("*")), case
