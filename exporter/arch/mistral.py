"""HF Mistral (`MistralForCausalLM`) -> the [llama] layout: Llama's tables, plus sliding-window attention in every
layer when config.json has a `sliding_window` (Mistral 7B v0.1: 4096; null in later versions = full attention).
See layout.md ("Sliding-window attention")."""

from __future__ import annotations

from dataclasses import replace

from templates.ft_python.ft_checkpoint import CheckpointError, FTConfig

from .llama import Llama
from .registry import register


def window_keys(window, layers: list[int]) -> dict:
    """config.ini's sliding-window keys for `window` (None or 0: none) over the given layers."""
    if not window or not layers:
        return {"sliding_window": 0, "sliding_window_layers": ""}
    if int(window) < 1:
        raise CheckpointError(f"config.json sliding_window {window} must be a positive number of positions")
    return {"sliding_window": int(window), "sliding_window_layers": ",".join(str(i) for i in layers)}


@register("MistralForCausalLM", "MistralModel")
class Mistral(Llama):
    def params(self) -> FTConfig:
        params = super().params()
        return replace(params, **window_keys(self.config.get("sliding_window"), list(range(params.num_layer))))
