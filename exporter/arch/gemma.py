"""HF Gemma (`GemmaForCausalLM`, the first Gemma) -> the [llama] layout: Llama's tables with
* RMSNorm weights stored as (1 + w): Gemma's norm multiplies by 1 + w in fp32, so the sum is folded in at export
  (exact in fp32; one rounding of 1 + w in fp16 / bf16 files);
* token embeddings scaled by sqrt(hidden_size) (config.ini embedding_multiplier), the tied output layer not;
* a GeGLU MLP with the tanh GELU (`gelu_pytorch_tanh`; a legacy `gelu` means the same, as in transformers);
* an explicit head_dim (8 x 256 on 2048 for gemma-2b, 16 x 256 on 3072 for gemma-7b); tied embeddings by default.
Gemma 2 / 3 (soft-capping, extra norms, alternating windows) are other architectures and stay refused. See layout.md.
"""

from __future__ import annotations

from dataclasses import replace

from templates.ft_python.ft_checkpoint import CheckpointError, FTConfig

from ..lazy import torch
from .llama import Llama
from .registry import register

TANH_GELU = ("gelu_pytorch_tanh", "gelu_new", "gelu")  # transformers maps Gemma's legacy "gelu" to the tanh one


@register("GemmaForCausalLM", "GemmaModel")
class Gemma(Llama):
    tied_by_default = True

    def activation_keys(self) -> dict:
        act = self.config.get("hidden_act") or self.config.get("hidden_activation") or "gelu_pytorch_tanh"
        if act not in TANH_GELU:
            raise CheckpointError(f"config.json hidden_act {act!r} is not supported (Gemma: one of {list(TANH_GELU)})")
        return {"activation_type": "GeGLU", "gelu_approximation": "tanh"}

    def params(self) -> FTConfig:
        if self.config.get("use_bidirectional_attention"):
            raise CheckpointError("config.json use_bidirectional_attention is not supported (causal attention only)")
        params = super().params()
        return replace(params, embedding_multiplier=float(params.hidden_units) ** 0.5)

    def to_ft(self, ft_name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        if ft_name.endswith("layernorm.weight"):  # input / post_attention / final: y = norm(x) * (1 + w)
            return tensors[0].float() + 1.0
        return super().to_ft(ft_name, tensors)
