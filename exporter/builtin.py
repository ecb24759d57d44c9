"""The built-in default checkpoint: a tiny GPT-2 with seeded random weights and the real GPT-2 tokenizer.

It lets `python main.py` run the whole pipeline offline on a fresh machine in a few minutes. Its weights are
random, so its LAMBADA accuracy is near zero: the run shows that export, serving and the served-vs-source parity
check work, not that the model is good. Point `export.model.checkpoint_path` at a real checkpoint for that.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import BUILTIN_CHECKPOINT, DATA_DIR
from .atomic import AtomicDirectory

TINY_GPT2 = {
    "architectures": ["GPT2LMHeadModel"],
    "model_type": "gpt2",
    "vocab_size": 50257,
    "n_positions": 1024,
    "n_embd": 128,
    "n_layer": 2,
    "n_head": 4,
    "n_inner": None,
    "activation_function": "gelu_new",
    "layer_norm_epsilon": 1e-5,
    "bos_token_id": 50256,
    "eos_token_id": 50256,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
}
SEED = 1234
# Larger than GPT-2's 0.02 so the random logits are peaked: greedy choices are not near-ties between runtimes.
INIT_STD = 0.2


def _tiny_gpt2_state_dict(config: dict) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(SEED)
    hidden, inner = config["n_embd"], config["n_inner"] or 4 * config["n_embd"]

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * INIT_STD

    state = {
        "transformer.wte.weight": normal(config["vocab_size"], hidden),
        "transformer.wpe.weight": normal(config["n_positions"], hidden),
        "transformer.ln_f.weight": 1 + normal(hidden),
        "transformer.ln_f.bias": normal(hidden),
    }
    for layer in range(config["n_layer"]):
        prefix = f"transformer.h.{layer}."
        state.update(
            {
                prefix + "ln_1.weight": 1 + normal(hidden),
                prefix + "ln_1.bias": normal(hidden),
                prefix + "attn.c_attn.weight": normal(hidden, 3 * hidden),  # Conv1D: [in, out]
                prefix + "attn.c_attn.bias": normal(3 * hidden),
                prefix + "attn.c_proj.weight": normal(hidden, hidden),
                prefix + "attn.c_proj.bias": normal(hidden),
                prefix + "ln_2.weight": 1 + normal(hidden),
                prefix + "ln_2.bias": normal(hidden),
                prefix + "mlp.c_fc.weight": normal(hidden, inner),
                prefix + "mlp.c_fc.bias": normal(inner),
                prefix + "mlp.c_proj.weight": normal(inner, hidden),
                prefix + "mlp.c_proj.bias": normal(hidden),
            }
        )
    return state


def write_tiny_gpt2(destination: Path, config: dict | None = None) -> Path:
    """Write an HF GPT-2 checkpoint directory (config.json, model.safetensors, GPT-2 tokenizer files)."""
    config = dict(TINY_GPT2 if config is None else config)
    destination = Path(destination)
    with AtomicDirectory(destination) as partial:
        (partial / "config.json").write_text(json.dumps(config, indent=2))
        save_file(_tiny_gpt2_state_dict(config), partial / "model.safetensors", metadata={"format": "pt"})
        for name in ("vocab.json", "merges.txt"):
            shutil.copy2(DATA_DIR / "gpt2-tokenizer" / name, partial / name)
    return destination


def resolve_checkpoint(checkpoint_path: str, cache_dir: Path) -> Path:
    """A user's path as given; `builtin:tiny-gpt2` is built once under `cache_dir` and reused."""
    if checkpoint_path != BUILTIN_CHECKPOINT:
        return Path(checkpoint_path).expanduser()
    destination = Path(cache_dir) / "tiny-gpt2"
    if not (destination / "model.safetensors").is_file():
        write_tiny_gpt2(destination)
    return destination
