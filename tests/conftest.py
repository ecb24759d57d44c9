"""Shared fixtures: tiny seeded HF GPT-2 checkpoints built with transformers (the independent reference)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

SHARED_TOKENIZER = Path(__file__).resolve().parents[1] / "exporter" / "data" / "gpt2-tokenizer"


def build_hf_gpt2(directory: Path, *, seed: int = 0, n_layer: int = 2, n_embd: int = 64, n_head: int = 4,
                  n_positions: int = 128, initializer_range: float = 0.2, safe_serialization: bool = True,
                  max_shard_size: str | None = None) -> Path:
    """A tiny GPT2LMHeadModel with random seeded weights and the real GPT-2 tokenizer files."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=50257, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        initializer_range=initializer_range, bos_token_id=50256, eos_token_id=50256,
    )
    model = GPT2LMHeadModel(config).eval()
    # Give layernorms and biases noise too, so a wrong mapping of any tensor changes the outputs.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                parameter.add_(torch.randn_like(parameter) * initializer_range)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    if not safe_serialization:
        # transformers 5 writes safetensors only; a pickled state dict as older checkpoints ship it
        # (with the tied lm_head.weight saved too).
        for stale in directory.glob("model*.safetensors*"):
            stale.unlink()
        torch.save(model.state_dict(), directory / "pytorch_model.bin")
    for name in ("vocab.json", "merges.txt"):
        shutil.copy2(SHARED_TOKENIZER / name, directory / name)
    return directory


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    return build_hf_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def hf_model(tiny_gpt2):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(tiny_gpt2).eval()


def right_padded(prompts: list[list[int]], pad: int):
    """Right-padded [B, Lmax] int64 ids + lengths [B], as clients send them."""
    import numpy as np

    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad, dtype=np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = prompt
    return ids, np.array([len(p) for p in prompts])


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


# The shared server of the request-interface tests (one launch for several test files).
from serving_fixtures import served  # noqa: E402,F401
