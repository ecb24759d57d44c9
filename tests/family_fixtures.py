"""Tiny seeded HF checkpoints of every registered architecture, built with transformers (the independent reference).

`FIXTURES` is keyed by registered architecture name; `tests/test_registry.py` fails when a registered name has no
entry. Each entry lists variants (name -> builder) that together exercise the family's quirks. An entry whose
reference is not HF transformers (e.g. NeMo, whose reference is NeMo's own saved outputs) sets `reference` to a
callable giving greedy tokens, see `Fixture`.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

SHARED_TOKENIZER = Path(__file__).resolve().parents[1] / "exporter" / "data" / "gpt2-tokenizer"
VOCAB = 50257  # the GPT-2 tokenizer's, so text through the ensemble maps onto every tiny model
END_ID = 50256


def _finish(model, directory: Path, noise: float = 0.2) -> Path:
    """Noise on norms and biases (so a wrong mapping of any tensor changes outputs), save, add the tokenizer."""
    import torch

    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or "norm" in name or ".ln_" in name:
                parameter.add_(torch.randn_like(parameter) * noise)
    model.save_pretrained(directory)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy2(SHARED_TOKENIZER / name, directory / name)
    return directory


def build_opt(directory: Path, *, seed: int = 1, post_layernorm: bool = False, project: bool = False,
              n_layer: int = 2) -> Path:
    """OPT; post_layernorm + project = opt-350m's shape (no final layernorm, project_in/out around 32-wide embeddings)."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    config = OPTConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=n_layer, ffn_dim=128,
                       num_attention_heads=4, max_position_embeddings=128, do_layer_norm_before=not post_layernorm,
                       word_embed_proj_dim=32 if project else 64, init_std=0.2, bos_token_id=END_ID,
                       eos_token_id=END_ID, pad_token_id=1, dropout=0.0)
    return _finish(OPTForCausalLM(config).eval(), directory)


def build_gptj(directory: Path, *, seed: int = 2, n_layer: int = 2) -> Path:
    import torch
    from transformers import GPTJConfig, GPTJForCausalLM

    torch.manual_seed(seed)
    config = GPTJConfig(vocab_size=VOCAB, n_embd=64, n_layer=n_layer, n_head=4, rotary_dim=8, n_positions=128,
                        initializer_range=0.2, bos_token_id=END_ID, eos_token_id=END_ID)
    return _finish(GPTJForCausalLM(config).eval(), directory)


def build_gptneox(directory: Path, *, seed: int = 3, parallel: bool = True, n_layer: int = 2,
                  rotary_emb_base: float = 5000) -> Path:
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    # gelu_new: FT's tanh Gelu, so greedy tokens can be compared exactly (Pythia's exact gelu differs slightly).
    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=n_layer, num_attention_heads=4,
                           intermediate_size=128, rotary_pct=0.5, rotary_emb_base=rotary_emb_base,
                           hidden_act="gelu_new", max_position_embeddings=128, use_parallel_residual=parallel, initializer_range=0.2,
                           bos_token_id=END_ID, eos_token_id=END_ID, tie_word_embeddings=False)
    return _finish(GPTNeoXForCausalLM(config).eval(), directory)


def build_llama(directory: Path, *, seed: int = 4, kv_heads: int = 2, tied: bool = False, n_layer: int = 2,
                bias: bool = False, rope: dict | None = None, max_positions: int = 128) -> Path:
    """rope: a transformers `rope_parameters` dict (scaled rotary), default unscaled with base 50000."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=n_layer, num_attention_heads=4,
                         num_key_value_heads=kv_heads, intermediate_size=96, max_position_embeddings=max_positions,
                         rope_parameters=rope or {"rope_type": "default", "rope_theta": 50000.0}, rms_norm_eps=1e-5,
                         initializer_range=0.2, tie_word_embeddings=tied, attention_bias=bias, mlp_bias=bias,
                         bos_token_id=END_ID, eos_token_id=END_ID)
    return _finish(LlamaForCausalLM(config).eval(), directory)


# Scaled rotary (transformers `rope_parameters`), each with a short original context so that the test prompts and
# their greedy continuations (up to 16 positions) run past it: name -> (rope dict, max_position_embeddings).
SCALED_ROPE = {
    "linear": ({"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}, 16),
    # dynamic NTK scales relative to max_position_embeddings itself: 8, so every step past it changes the base
    "dynamic": ({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}, 8),
    # original 32, head_dim 16: wavelength 6.3 < 32/4 kept, 19.9 blended, 62.8 and up > 32/1 divided by the factor
    "llama3": ({"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}, 128),
    # base 500 and betas 8 / 0.25 put the ramp across the first dims: kept, blended and interpolated frequencies
    "yarn": ({"rope_type": "yarn", "rope_theta": 500.0, "factor": 4.0, "original_max_position_embeddings": 8,
              "beta_fast": 8.0, "beta_slow": 0.25}, 32),
}


def build_scaled_llama(directory: Path, rope_type: str) -> Path:
    rope, max_positions = SCALED_ROPE[rope_type]
    return build_llama(directory, seed=5, rope=dict(rope), max_positions=max_positions)


def build_mistral(directory: Path, *, seed: int = 6, sliding_window: int | None = 5) -> Path:
    """Sliding window 5: the test prompts (3 to 8 tokens) plus 8 generated tokens run well past it."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    config = MistralConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=96, max_position_embeddings=128,
                           sliding_window=sliding_window, rope_parameters={"rope_type": "default", "rope_theta": 20000.0},
                           rms_norm_eps=1e-5, initializer_range=0.2, bos_token_id=END_ID, eos_token_id=END_ID)
    return _finish(MistralForCausalLM(config).eval(), directory)


def build_qwen2(directory: Path, *, seed: int = 7, tied: bool = True, sliding_window: int | None = None,
                n_layer: int = 2) -> Path:
    """sliding_window: use_sliding_window with max_window_layers 1 (layers 1.. windowed, layer 0 full)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=n_layer, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=96, max_position_embeddings=128,
                         use_sliding_window=sliding_window is not None, sliding_window=sliding_window,
                         max_window_layers=1, rope_parameters={"rope_type": "default", "rope_theta": 30000.0},
                         rms_norm_eps=1e-5, initializer_range=0.2, tie_word_embeddings=tied,
                         bos_token_id=END_ID, eos_token_id=END_ID)
    return _finish(Qwen2ForCausalLM(config).eval(), directory)


def build_qwen3(directory: Path, *, seed: int = 8, tied: bool = True) -> Path:
    """head_dim 32 with 4 heads: attention width 128 on a 64-wide model (as Qwen3-0.6B: 16 x 128 on 1024)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=64, head_dim=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=96, max_position_embeddings=128,
                         rope_parameters={"rope_type": "default", "rope_theta": 40000.0}, rms_norm_eps=1e-5,
                         initializer_range=0.2, tie_word_embeddings=tied, bos_token_id=END_ID, eos_token_id=END_ID)
    return _finish(Qwen3ForCausalLM(config).eval(), directory)


def build_gemma(directory: Path, *, seed: int = 9) -> Path:
    """head_dim 32 x 4 heads on a 64-wide model with one kv head (gemma-2b's multi-query attention), tied."""
    import torch
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(seed)
    config = GemmaConfig(vocab_size=VOCAB, hidden_size=64, head_dim=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=1, intermediate_size=96, max_position_embeddings=128,
                         hidden_act="gelu_pytorch_tanh", rms_norm_eps=1e-6, initializer_range=0.2,
                         bos_token_id=END_ID, eos_token_id=END_ID, pad_token_id=0)
    return _finish(GemmaForCausalLM(config).eval(), directory)


def build_phi3(directory: Path, *, seed: int = 10) -> Path:
    """Fused qkv_proj and gate_up_proj, half the head rotated, a window of 6 positions."""
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(seed)
    config = Phi3Config(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=96, max_position_embeddings=128,
                        original_max_position_embeddings=128, sliding_window=6,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
                        rms_norm_eps=1e-5, initializer_range=0.2, bos_token_id=END_ID, eos_token_id=END_ID,
                        pad_token_id=END_ID)
    return _finish(Phi3ForCausalLM(config).eval(), directory)


def build_gpt2(directory: Path) -> Path:
    from conftest import build_hf_gpt2

    return build_hf_gpt2(directory)


# NeMo checkpoints saved by NeMo itself, with NeMo's own greedy tokens (see tests/test_nemo.py).
# Resolved once for every test: $NEMO_FIXTURES, else ../shared/fixtures/nemo beside this checkout, else the
# team's shared copy.
T5_VOCAB = 100


def build_t5(directory: Path, *, gated: bool = False, seed: int = 11) -> Path:
    """Tiny T5: original (relu, decoder output scaled by d_model ** -0.5, lm_head tied to shared) or, with `gated`,
    T5 v1.1 / Flan-T5 / UL2-like (gated-gelu, unscaled, its own lm_head.weight: config.json tie_word_embeddings
    false, as those checkpoints have it). transformers 5 always ties lm_head when building a T5, so the untied
    lm_head is added to the saved file; from_pretrained keeps it separate (its values differ from shared)."""
    import json

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(vocab_size=T5_VOCAB, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
                      num_decoder_layers=2, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                      feed_forward_proj="gated-gelu" if gated else "relu", decoder_start_token_id=0, pad_token_id=0,
                      eos_token_id=1, dropout_rate=0.0)
    model = T5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "layer_norm" in name:
                parameter.add_(torch.randn_like(parameter) * 0.2)
    model.save_pretrained(directory)
    if gated:
        weights_file = directory / "model.safetensors"
        weights = load_file(weights_file)
        weights["lm_head.weight"] = torch.randn(T5_VOCAB, 32)
        save_file(weights, weights_file, metadata={"format": "pt"})
        config_file = directory / "config.json"
        saved = json.loads(config_file.read_text())
        saved.pop("scale_decoder_outputs", None)  # as a transformers 4 checkpoint says it
        saved["tie_word_embeddings"] = False
        config_file.write_text(json.dumps(saved, indent=2))
    return directory


def _nemo_fixtures() -> Path:
    if os.environ.get("NEMO_FIXTURES"):
        return Path(os.environ["NEMO_FIXTURES"])
    beside = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "nemo"
    return beside if beside.is_dir() else Path("/work/shared/fixtures/nemo")


NEMO_FIXTURES = _nemo_fixtures()
NEMO_AVAILABLE = (NEMO_FIXTURES / "gpt_tp1.nemo").is_file()
NEMO_MISSING = f"NeMo fixtures not found in {NEMO_FIXTURES} (set NEMO_FIXTURES)"


def nemo_checkpoint(name: str):
    """A builder that returns the fixture file itself (NeMo saved it; nothing to build)."""
    return lambda directory: NEMO_FIXTURES / f"{name}.nemo"


def _nemo_reference_file(checkpoint: Path) -> Path:
    stem = "gpt_rope_swiglu_tp1" if checkpoint.stem == "gpt_rope_swiglu_tp1" else "gpt_tp1"  # A: all its layouts
    return NEMO_FIXTURES / f"{stem}.reference.npz"


def nemo_reference(checkpoint: Path, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """NeMo's greedy tokens, saved with the fixture for its own prompts (the fixture's `prompts`)."""
    import numpy as np

    with np.load(_nemo_reference_file(Path(checkpoint))) as data:
        if prompts != data["input_ids"].tolist() or new_tokens != data["greedy_ids"].shape[1]:
            raise ValueError("NeMo's reference holds greedy tokens for its own prompts and length only")
        return data["greedy_ids"].tolist()


def nemo_prompts() -> list[list[int]]:
    import numpy as np

    if not (NEMO_FIXTURES / "gpt_tp1.reference.npz").is_file():
        return []
    with np.load(NEMO_FIXTURES / "gpt_tp1.reference.npz") as data:
        return data["input_ids"].tolist()


@dataclass(frozen=True)
class Fixture:
    """Variants of one registered architecture: name -> builder(directory) -> checkpoint directory.

    reference: None = HF transformers (`AutoModelForCausalLM`) on the checkpoint; otherwise a callable
    (checkpoint_path, prompts: list[list[int]], new_tokens) -> list[list[int]] of greedy tokens from an independent
    implementation (e.g. NeMo's saved outputs), for sources transformers cannot load. A builder may return any
    path `convert_checkpoint` accepts (a .nemo file, say). `prompts` / `new_tokens` override the registry test's
    defaults when the reference only exists for its own prompts (NeMo's `*.reference.npz`).
    """

    variants: dict[str, Callable[[Path], Path]]
    reference: Callable | None = None
    max_tp: int = 2  # largest TP the variants support (heads, kv heads, FFN divisibility)
    prompts: list[list[int]] | None = None
    new_tokens: int | None = None
    extra: dict = field(default_factory=dict)


FIXTURES: dict[str, Fixture] = {
    "GPT2LMHeadModel": Fixture({"gpt2": build_gpt2}),
    "OPTForCausalLM": Fixture({
        "opt-pre-ln": build_opt,
        "opt-350m-like": lambda d: build_opt(d, post_layernorm=True, project=True),
    }),
    "GPTJForCausalLM": Fixture({"gptj": build_gptj}),
    "GPTNeoXForCausalLM": Fixture({
        "neox-parallel": build_gptneox,
        "neox-sequential": lambda d: build_gptneox(d, parallel=False),
    }),
    "LlamaForCausalLM": Fixture({
        "llama-gqa": build_llama,
        "llama-tied-bias": lambda d: build_llama(d, kv_heads=4, tied=True, bias=True),
        **{f"llama-rope-{kind}": (lambda d, kind=kind: build_scaled_llama(d, kind)) for kind in SCALED_ROPE},
    }),
    "MistralForCausalLM": Fixture({"mistral-window": build_mistral}),
    "Qwen2ForCausalLM": Fixture({
        "qwen2": build_qwen2,
        "qwen2-window": lambda d: build_qwen2(d, tied=False, sliding_window=4, n_layer=3),
    }),
    "Qwen3ForCausalLM": Fixture({"qwen3-head-dim": build_qwen3}),
    "GemmaForCausalLM": Fixture({"gemma-mqa": build_gemma}),
    "Phi3ForCausalLM": Fixture({"phi3-partial-window": build_phi3}),
    # Model B (rotary, SwiGLU, RMSNorm, GQA, untied) and model A trained at TP=2 (learned positions, exact GELU).
    "MegatronGPTModel": Fixture({
        "nemo-rope-swiglu-gqa": nemo_checkpoint("gpt_rope_swiglu_tp1"),
        "nemo-tp2-legacy": nemo_checkpoint("gpt_tp2_legacy"),
    }, reference=nemo_reference, prompts=nemo_prompts(), new_tokens=8),
}
# Encoder-decoder architectures (ModelKind.ENCODER_DECODER): converted and checked by tests/test_t5_convert.py and
# the registry test; not in FIXTURES, whose users generate with AutoModelForCausalLM.
ENCODER_DECODER_FIXTURES: dict[str, Fixture] = {
    "T5ForConditionalGeneration": Fixture({"t5-relu-tied": build_t5,
                                           "t5-gated-gelu-untied": lambda d: build_t5(d, gated=True)}),
}
# Registered aliases (the bare base models) share their family's fixture: they differ only in the name prefix.
ALIASES = {"GPT2Model": "GPT2LMHeadModel", "OPTModel": "OPTForCausalLM", "GPTJModel": "GPTJForCausalLM",
           "GPTNeoXModel": "GPTNeoXForCausalLM", "LlamaModel": "LlamaForCausalLM",
           "MistralModel": "MistralForCausalLM", "Qwen2Model": "Qwen2ForCausalLM", "Qwen3Model": "Qwen3ForCausalLM",
           "GemmaModel": "GemmaForCausalLM", "Phi3Model": "Phi3ForCausalLM"}
