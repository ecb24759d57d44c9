"""Scaled rotary (rope types linear, dynamic, yarn, llama3) against HF transformers, at positions past the original
context length. The greedy parity of each variant at TP 1 and 2 runs in test_families.py (they are Llama fixture
variants); here: long prompts, dynamic NTK's growing base during cached generation, and the refusals."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from conftest import generate
from exporter.ft.convert import convert_checkpoint
from exporter.parallel import ParallelLayout
from family_fixtures import END_ID, SCALED_ROPE, build_scaled_llama
from templates.ft_python import ft_checkpoint, ft_gpt
from templates.ft_python.ft_checkpoint import CheckpointError

LONG = 48  # prompt tokens: past every fixture's original context (8 or 32 positions)


@pytest.fixture(scope="module")
def scaled(tmp_path_factory):
    """rope type -> (HF checkpoint, TP=1 shards, TP=2 shards), built once."""
    built = {}

    def get(kind):
        if kind not in built:
            root = tmp_path_factory.mktemp(kind)
            checkpoint = build_scaled_llama(root / "hf", kind)
            built[kind] = (checkpoint, convert_checkpoint(checkpoint, root / "ft1", ParallelLayout(1, 1)),
                           convert_checkpoint(checkpoint, root / "ft2", ParallelLayout(2, 1)))
        return built[kind]

    return get


def _hf(checkpoint):
    """A fresh HF model: dynamic NTK keeps state in its rotary module between calls, so each reference gets its own."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


def _original_context(kind):
    rope, max_positions = SCALED_ROPE[kind]
    return rope.get("original_max_position_embeddings", max_positions)


def _long_prompt(seed=11):
    return torch.randint(0, END_ID, (1, LONG), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", sorted(SCALED_ROPE))
def test_logits_past_the_original_context_match_hf(scaled, kind):
    checkpoint, tp1, tp2 = scaled(kind)
    assert LONG > _original_context(kind)
    ids = _long_prompt()
    with torch.inference_mode():
        reference = _hf(checkpoint)(ids).logits
    config = ft_checkpoint.read_config(tp1)
    assert config.rope_type == kind
    for shards in (tp1, tp2):
        logits = ft_gpt.FTGPT.from_shards(shards).forward_logits(ids.numpy())
        assert (logits - reference).abs().max().item() < 1e-4, (kind, shards)
    # The comparison can fail: the same weights with unscaled tables are far off past the original context.
    unscaled = ft_gpt.FTGPT(ft_checkpoint.load_weights(tp1), dataclasses.replace(config, rope_type="default"))
    assert (unscaled.forward_logits(ids.numpy()) - reference).abs().max().item() > 1e-2


def test_dynamic_greedy_generation_matches_hf_as_the_base_grows(scaled):
    """Dynamic NTK recomputes its base for every longer sequence while cached keys keep their rotation; a ragged
    batch (each row its own length) matches HF generating each prompt alone, through positions past
    max_pos_seq_len (8). Also pins the bug where decoding clamped positions to max_pos_seq_len - 1."""
    checkpoint, tp1, tp2 = scaled("dynamic")
    prompts = [_long_prompt(seed)[0, :length].tolist() for seed, length in ((1, 12), (2, 5), (3, 9))]
    new_tokens = 12
    expected = []
    for prompt in prompts:
        with torch.inference_mode():
            out = _hf(checkpoint).generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                           max_new_tokens=new_tokens, do_sample=False, num_beams=1,
                                           pad_token_id=END_ID, eos_token_id=END_ID)
        expected.append(out[0, len(prompt):].tolist())
    lengths = np.array([len(p) for p in prompts])
    padded = np.full((len(prompts), lengths.max()), END_ID)
    for row, prompt in enumerate(prompts):
        padded[row, : len(prompt)] = prompt
    for shards in (tp1, tp2):
        model = ft_gpt.FTGPT.from_shards(shards)
        assert model.max_positions == 8
        out = generate(model, padded, lengths, new_tokens)
        for row, prompt in enumerate(prompts):
            end = int(out.sequence_length[row, 0])
            assert out.output_ids[row, 0, len(prompt): end].tolist() == expected[row], (shards, row)


def test_transformers_4_rope_scaling_keys_are_read(scaled, tmp_path):
    """A config.json in transformers 4's form (`rope_scaling` with `type`, top-level `rope_theta`) exports the same
    tables transformers 5 builds from it."""
    checkpoint, _, _ = scaled("yarn")
    legacy = tmp_path / "legacy"
    shutil.copytree(checkpoint, legacy)
    config = json.loads((legacy / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")
    config["rope_scaling"] = rope
    (legacy / "config.json").write_text(json.dumps(config))
    ids = _long_prompt()
    with torch.inference_mode():
        reference = _hf(legacy)(ids).logits
    model = ft_gpt.FTGPT.from_shards(convert_checkpoint(legacy, tmp_path / "out"))
    assert (model.forward_logits(ids.numpy()) - reference).abs().max().item() < 1e-4


def test_unknown_rope_type_is_refused_before_writing(scaled, tmp_path):
    checkpoint, _, _ = scaled("linear")
    source = tmp_path / "longrope"
    shutil.copytree(checkpoint, source)
    config = json.loads((source / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0, "long_factor": [1.0] * 8,
                                 "short_factor": [1.0] * 8}
    (source / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=r"rope type 'longrope' is not supported; supported: default, linear, "
                                              r"dynamic, yarn, llama3"):
        convert_checkpoint(source, out)
    assert not out.exists()


def test_config_ini_without_rope_keys_is_unscaled(scaled):
    """Shards written before the rope keys existed load as plain RoPE (every new key has the unscaled default)."""
    _, tp1, _ = scaled("linear")
    text = (tp1 / "config.ini").read_text()
    old = "\n".join(line for line in text.splitlines()
                    if not line.startswith(("rope_type", "rope_scaling", "rope_original", "rope_low", "rope_high",
                                            "rope_beta", "rope_truncate", "rope_attention")))
    config = ft_checkpoint.FTConfig.from_text(old)
    assert (config.rope_type, config.rope_scaling_factor, config.rope_attention_factor) == ("default", 1.0, 1.0)


def test_runtime_refuses_a_rope_type_it_does_not_compute(scaled):
    _, tp1, _ = scaled("linear")
    config = dataclasses.replace(ft_checkpoint.read_config(tp1), rope_type="longrope")
    with pytest.raises(ValueError, match="rope_type 'longrope' is not supported"):
        ft_gpt.FTGPT(ft_checkpoint.load_weights(tp1), config)
