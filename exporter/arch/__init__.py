"""Source architectures: the registry (registry.py) and every family file, imported here so each registers."""

from __future__ import annotations

from . import gpt2, gptj, gptneox, llama, nemo_gpt, opt  # noqa: F401  (each registers itself)
from .base import Architecture, TensorSpec
from .registry import architecture_for, register, registered

__all__ = ["Architecture", "TensorSpec", "architecture_for", "register", "registered"]
