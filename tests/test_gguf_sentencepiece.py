"""A GGUF whose tokenizer is SentencePiece (`tokenizer.ggml.model` "llama": tokens + scores + token types, no
merges), as llama.cpp writes a Llama-2 / Mistral `tokenizer.model`.

Main refused these files. Reference: transformers loading the very same file (`from_pretrained(dir,
gguf_file=...)`): its tokenizer's ids on the whole LAMBADA text and edge cases, its model's logits.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from exporter.ft.convert import convert_checkpoint
from gguf_fixtures import NORMAL, train_sentencepiece, write_gguf
from templates.ft_python import ft_gpt
from templates.ft_python.ft_checkpoint import CheckpointError
from tokenizer_fixtures import lambada_texts

pytest.importorskip("gguf", reason="the `gguf` package reads GGUF files")
pytest.importorskip("sentencepiece", reason="the `sentencepiece` package trains the fixture's tokenizer")
transformers = pytest.importorskip("transformers")

# Prefix spaces, runs of spaces, bytes with no piece (byte fallback), literal control / unknown / unused pieces,
# the user-defined piece, a pre-escaped space.
EDGE_TEXTS = ["", " ", "  lead and trail  ", "a  b", "tab\there", "x\n\n y", "日本語 ünïcödé", "digits 12345",
              "a<s>b", " </s> x", "<sep>", "x<sep>y <unk> [PAD1]", "\u2581 already", "emoji \U0001F642 ok"]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return lambada_texts() + EDGE_TEXTS


def _reference_tokenizer(path):
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _exported_tokenizer(path, out):
    """tokenizer.json written beside the shards by the export, and its tokenizer_config.json."""
    from tokenizers import Tokenizer

    shards = convert_checkpoint(path, out)
    return Tokenizer.from_file(str(shards / "tokenizer.json")), json.loads(
        (shards / "tokenizer_config.json").read_text()), shards


@pytest.mark.parametrize("flags", [{"add_bos": None}, {"add_bos": False, "add_eos": True}])
def test_ids_equal_transformers_on_lambada(tmp_path, texts, flags):
    """Every LAMBADA text and edge case encodes as transformers' tokenizer for the same file does, with its default
    special tokens (a file without add_bos_token gets BOS, as llama.cpp and transformers add it) and without, and
    decodes as it does."""
    path = write_gguf(tmp_path / "sp.gguf", "F32", tokenizer_model="llama", **flags)
    reference = _reference_tokenizer(path)
    ours, config, _ = _exported_tokenizer(path, tmp_path / "out")
    assert (config["add_bos_token"], config["add_eos_token"]) == (flags["add_bos"] is None, "add_eos" in flags)
    for special in (True, False):
        expected = reference(texts, add_special_tokens=special).input_ids
        served = [encoding.ids for encoding in ours.encode_batch(texts, add_special_tokens=special)]
        assert [i for i, (a, b) in enumerate(zip(served, expected)) if a != b] == [], special
    assert ours.encode("a b", "c d").ids == reference("a b", "c d").input_ids
    assert expected[texts.index("<sep>")] == [3]  # the user-defined piece is matched whole
    assert ours.decode_batch(expected, skip_special_tokens=True) == \
        [reference.decode(ids, skip_special_tokens=True) for ids in expected]


def test_merges_are_ranked_as_transformers_ranks_them(tmp_path, texts):
    """The merges come from the scores, not the ids: with the normal pieces' scores shuffled and rounded to
    hundreds (so many tie), ids still equal transformers'. Ranking by id, or breaking ties by shorter left / right
    piece or by later piece, changes 500 to 1000 of these 1000 texts (measured)."""
    tokens, scores, types = train_sentencepiece()
    rng = np.random.default_rng(0)
    normal = [index for index, kind in enumerate(types) if kind == NORMAL]
    scrambled = list(scores)
    for index, score in zip(normal, rng.permutation([scores[index] for index in normal])):
        scrambled[index] = float(np.floor(score / 100) * 100)
    path = write_gguf(tmp_path / "scrambled.gguf", "F32", tokenizer_model="llama",
                      vocabulary=(tokens, scrambled, types))
    ours, _, _ = _exported_tokenizer(path, tmp_path / "out")
    sample = texts[:1000]
    assert [encoding.ids for encoding in ours.encode_batch(sample)] == _reference_tokenizer(path)(sample).input_ids


def test_logits_match_transformers(tmp_path, texts):
    """The model of a Q8_0 file with a SentencePiece tokenizer, named as a Mistral GGUF is (llama.cpp writes Mistral
    as architecture "llama"; transformers loads it as Llama, as this reader does): the text encoded by the exported
    tokenizer.json, logits within 1e-4 of transformers loading the same file."""
    path = write_gguf(tmp_path / "sp.gguf", "Q8_0", tokenizer_model="llama", name="Mistral 7B Instruct v0.2")
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    ours, _, shards = _exported_tokenizer(path, tmp_path / "out")
    ids = ours.encode(texts[0]).ids[:64]
    assert ids == _reference_tokenizer(path)(texts[0]).input_ids[:64] and ids[0] == 1  # <s> first
    with torch.inference_mode():
        expected = model(torch.tensor([ids])).logits.float()
    logits = ft_gpt.FTGPT.from_shards(shards, device="cpu").forward_logits(torch.tensor([ids]).numpy())
    assert (logits - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("case,kwargs,named", [
    ("pre-tokenizer for a SentencePiece vocabulary", {"pre": "llama-bpe"}, "'llama-bpe'"),
    ("no scores", {"vocabulary": "no scores"}, "tokenizer.ggml.scores"),
])
def test_unsupported_sentencepiece_metadata_is_refused(tmp_path, case, kwargs, named):
    """Refused on opening, naming what was found, before anything is written."""
    if kwargs.get("vocabulary") == "no scores":
        tokens, _, types = train_sentencepiece()
        kwargs = {"vocabulary": (tokens, None, types)}
    path = write_gguf(tmp_path / "bad.gguf", "Q8_0", tokenizer_model="llama", **kwargs)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError) as error:
        convert_checkpoint(path, out)
    assert named in str(error.value), (case, str(error.value))
    assert not out.exists() or not any(out.rglob("*")), case


@pytest.mark.triton
def test_ensemble_text_equals_transformers(tmp_path):
    """Text in, text out through preprocessing -> model -> postprocessing with the SentencePiece tokenizer rebuilt
    from the GGUF (BOS first): the served continuation equals transformers' greedy continuation of the same file,
    decoded with skip_special_tokens=True."""
    pytest.importorskip("tritonclient.http")
    from exporter.parallel import ParallelLayout
    from exporter.runtimes import ModelSettings
    from exporter.serve.tritonserver import TritonServer
    from exporter.stages.export import build_repository
    from test_e2e import infer_ensemble

    path = write_gguf(tmp_path / "sp.gguf", "Q8_0", tokenizer_model="llama")
    prompts = ["The capital of France is", "She looked at him and said<sep>", "Año 2024: naïve café"]
    settings = ModelSettings(name="sp", runtime="python", max_batch_size=4, layout=ParallelLayout(1, 1),
                             data_type="fp32", device="cpu")
    repo = build_repository(tmp_path / "model_repo", path, settings, "fp32")
    with TritonServer(repo, tmp_path / "server.log") as server:
        served = infer_ensemble(server.http_url, prompts, 8)

    tokenizer = _reference_tokenizer(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    for row, prompt in enumerate(prompts):
        inputs = tokenizer(prompt, return_tensors="pt")
        assert inputs.input_ids[0, 0].item() == 1  # <s>
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=2)
        new = out[0, inputs.input_ids.shape[1]:].tolist()
        assert served["OUTPUT_0"][row, 0].decode() == tokenizer.decode(new, skip_special_tokens=True), prompt
    assert all(served["OUTPUT_0"][row, 0].decode().strip() for row in range(len(prompts)))  # text, not only </s>
