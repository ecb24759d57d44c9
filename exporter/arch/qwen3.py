"""HF Qwen3 (`Qwen3ForCausalLM`) -> the [llama] layout: Llama's tables (biases on q/k/v and o_proj only with
`attention_bias`; an explicit `head_dim`, so the attention width may differ from hidden_size), plus a per-head
RMSNorm of q and k before rotary (`self_attn.{q,k}_norm` -> attention.{q,k}_layernorm, [head_dim]) and Qwen2's
sliding-window rule. See layout.md."""

from __future__ import annotations

from dataclasses import replace

from templates.ft_python.ft_checkpoint import FTConfig

from ..parallel import Split
from .base import Table
from .llama import Llama
from .qwen2 import qwen_window_keys
from .registry import register


@register("Qwen3ForCausalLM", "Qwen3Model")
class Qwen3(Llama):
    def params(self) -> FTConfig:
        params = super().params()
        return replace(params, qk_norm=True, mlp_bias=False, **qwen_window_keys(self.config, params.num_layer))

    def tables(self, params: FTConfig) -> tuple[Table, Table]:
        global_table, layer_table = super().tables(params)
        for name in "qk":
            layer_table[f"attention.{name}_layernorm.weight"] = (f"layers.{{i}}.self_attn.{name}_norm.weight",
                                                                 Split.REPLICATED)
        return global_table, layer_table
