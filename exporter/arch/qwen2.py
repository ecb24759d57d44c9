"""HF Qwen2 (`Qwen2ForCausalLM`) -> the [llama] layout: Llama's tables, q/k/v biases without an attention output
(o_proj) bias, and transformers' sliding-window rule: only with `use_sliding_window`, in the layers `layer_types`
marks "sliding_attention" (when config.json has no `layer_types`: layers >= `max_window_layers`). See layout.md."""

from __future__ import annotations

from dataclasses import replace

from templates.ft_python.ft_checkpoint import CheckpointError, FTConfig

from .llama import Llama
from .mistral import window_keys
from .registry import register

LAYER_TYPES = ("full_attention", "sliding_attention")


def qwen_window_keys(config: dict, layers: int) -> dict:
    """Sliding-window keys by Qwen's rule (Qwen2, Qwen3): only with use_sliding_window, in the layers layer_types
    marks sliding_attention (without layer_types: layers >= max_window_layers)."""
    types = config.get("layer_types")
    window = config.get("sliding_window") if config.get("use_sliding_window", False) else None
    if types is None:
        first = config.get("max_window_layers", layers)
        types = ["sliding_attention" if window and i >= first else "full_attention" for i in range(layers)]
    unknown = sorted(set(types) - set(LAYER_TYPES))
    if unknown or len(types) != layers:
        raise CheckpointError(f"config.json layer_types {types} is not supported: {layers} entries, each one of "
                              f"{list(LAYER_TYPES)}")
    return window_keys(window, [i for i, kind in enumerate(types) if kind == "sliding_attention"])


@register("Qwen2ForCausalLM", "Qwen2Model")
class Qwen2(Llama):
    def params(self) -> FTConfig:
        params = super().params()
        # q/k/v always carry biases, o_proj and the MLP none (whatever attention_bias / mlp_bias say)
        return replace(params, attention_bias=True, attention_output_bias=False, mlp_bias=False,
                       **qwen_window_keys(self.config, params.num_layer))
