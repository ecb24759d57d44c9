"""HF Phi-3 (`Phi3ForCausalLM`) -> the [llama] layout: Llama's layout from fused source matrices
* `self_attn.qkv_proj` [(n_q + 2 n_kv) d, h], already q | k | v: transposed, split per rank like separate q, k, v;
* `mlp.gate_up_proj` [2 inter, h], gate rows first: mlp.dense_h_to_4h (gate) and mlp.dense_h_to_4h_2 (up);
plus partial rotary (`partial_rotary_factor`, Phi-4-mini) and sliding-window attention in every layer when the
config has a `sliding_window` (Phi-3-mini-4k: 2047). LongRoPE (the 128k variants) is refused by rope.py. See layout.md.
"""

from __future__ import annotations

from dataclasses import replace

from templates.ft_python.ft_checkpoint import FTConfig

from ..lazy import torch
from ..parallel import Split
from .llama import Llama
from .mistral import window_keys
from .registry import register
from .rope import partial_rotary_factor, rope_keys

GATE, UP = "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h_2.weight"


@register("Phi3ForCausalLM", "Phi3Model")
class Phi3(Llama):
    layer_tensors = {
        "input_layernorm.weight": ("layers.{i}.input_layernorm.weight", Split.REPLICATED),
        "attention.query_key_value.weight": ("layers.{i}.self_attn.qkv_proj.weight", Split.QKV),
        "attention.dense.weight": ("layers.{i}.self_attn.o_proj.weight", Split.ROW),
        "post_attention_layernorm.weight": ("layers.{i}.post_attention_layernorm.weight", Split.REPLICATED),
        GATE: ("layers.{i}.mlp.gate_up_proj.weight", Split.COLUMN),
        UP: ("layers.{i}.mlp.gate_up_proj.weight", Split.COLUMN),
        "mlp.dense_4h_to_h.weight": ("layers.{i}.mlp.down_proj.weight", Split.ROW),
    }

    def rotary_keys(self, head_dim: int) -> dict:
        # the first partial_rotary_factor of each head rotates (halves style), the rest passes through
        rotary = int(head_dim * partial_rotary_factor(self.config))
        return {"rotary_embedding": rotary, "rotary_style": "neox", **rope_keys(self.config, partial=True)}

    def params(self) -> FTConfig:
        params = super().params()
        return replace(params, **window_keys(self.config.get("sliding_window"), list(range(params.num_layer))))

    def ft_shape(self, ft_name: str, source_shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
        if ft_name.endswith((GATE, UP)):  # half of [2 inter, h], transposed
            return (source_shapes[0][1], source_shapes[0][0] // 2)
        return super().ft_shape(ft_name, source_shapes)

    def to_ft(self, ft_name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        if ft_name.endswith((GATE, UP)):
            gate, up = tensors[0].chunk(2, dim=0)  # [inter, h] each
            return (gate if ft_name.endswith(GATE) else up).t()
        return super().to_ft(ft_name, tensors)
