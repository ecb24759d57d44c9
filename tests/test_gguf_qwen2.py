"""A GGUF of architecture `qwen2` (llama.cpp's Qwen2 / Qwen2.5 files): Llama's tensor names plus q/k/v biases,
q/k rows in HF's order (llama.cpp runs qwen2 with NeoX rotary, so its converter does not permute them), a byte-level
BPE tokenizer with pre-tokenizer "qwen2". Served by exporter/arch/qwen2.py.

References: transformers loading the very same file (`from_pretrained(dir, gguf_file=...)`), and for an F32 file
the HF Qwen2 it was written from.
"""

from __future__ import annotations


import pytest
import torch

from exporter.ft.convert import convert_checkpoint
from exporter.parallel import ParallelLayout
from gguf_fixtures import write_gguf
from templates.ft_python import ft_gpt
from tokenizer_fixtures import lambada_texts

pytest.importorskip("gguf", reason="the `gguf` package reads GGUF files")
transformers = pytest.importorskip("transformers")

TEXT = "The quick brown fox jumps over the lazy dog, and then it ran back home to its 123 friends"


def _logits(model, ids):
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits.float()


def _served_logits(shards, ids):
    return ft_gpt.FTGPT.from_shards(shards, device="cpu").forward_logits(torch.tensor([ids]).numpy())


def test_logits_match_transformers(tmp_path):
    """A Q8_0 qwen2 file (biases F32, as llama.cpp keeps 1-D tensors) at TP 1 and 2: logits within 1e-4 of
    transformers' Qwen2ForCausalLM loading the same file."""
    path = write_gguf(tmp_path / "qwen2.gguf", "Q8_0", architecture="qwen2", pre="qwen2")
    reference = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                  dtype=torch.float32).eval()
    assert type(reference).__name__ == "Qwen2ForCausalLM"
    ids = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)(TEXT).input_ids
    expected = _logits(reference, ids)
    for tp in (1, 2):
        shards = convert_checkpoint(path, tmp_path / f"tp{tp}", ParallelLayout(tp))
        assert (_served_logits(shards, ids) - expected).abs().max().item() < 1e-4, tp


def test_f32_file_equals_the_model_it_was_written_from(tmp_path):
    """Biases mapped, q/k rows left as they are (un-permuting them as for a llama file would change the logits):
    logits equal the original HF Qwen2's, tied embeddings included."""
    path = write_gguf(tmp_path / "qwen2.gguf", "F32", architecture="qwen2", pre="qwen2", tied=True,
                      hf_dir=tmp_path / "hf")
    original = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(original).__name__ == "Qwen2ForCausalLM"
    ids = [0, 17, 250, 3, 99, 140, 7, 320, 45]
    shards = convert_checkpoint(path, tmp_path / "out")
    assert (_served_logits(shards, ids) - _logits(original, ids)).abs().max().item() < 1e-4


def test_tokenizer_ids_equal_transformers_on_lambada(tmp_path):
    """The "qwen2" pre-tokenizer (single digits) gives transformers' ids on the whole LAMBADA text."""
    from tokenizers import Tokenizer

    path = write_gguf(tmp_path / "qwen2.gguf", "Q8_0", architecture="qwen2", pre="qwen2", add_bos=False)
    reference = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ours = Tokenizer.from_file(str(convert_checkpoint(path, tmp_path / "out") / "tokenizer.json"))
    texts = lambada_texts() + [TEXT]
    assert [encoding.ids for encoding in ours.encode_batch(texts)] == reference(texts).input_ids
