"""HF GPT-NeoX (`GPTNeoXForCausalLM`) -> FT's GPT-NeoX layout (section [gptneox]).

Quirks: the fused qkv is per head [heads, 3, d] and becomes q | k | v blocks; rotary over the first
`rotary_pct · d` dims (NeoX halves style); `use_parallel_residual` -> FT's `use_gptj_residual`, in which case FT
reads the two output biases summed in `mlp.attention.bias.sum.bin`; FT's NeoX converter stores those biases divided
by the tensor-parallel size (every rank adds its share before the all-reduce), so this does too; untied output
layer (`embed_out` or `lm_head`).
"""

from __future__ import annotations

import logging

from templates.ft_python.ft_checkpoint import CheckpointError, FTConfig

from ..lazy import torch
from ..parallel import Split
from .base import LinearArchitecture, Table, rope_theta
from .gpt2 import gelu_approximation
from .registry import register

log = logging.getLogger(__name__)

BIAS_SUM = "mlp.attention.bias.sum"
# FT computes rotary frequencies with base 10000 (decoder_masked_multihead_attention_utils.h); no config key sets it.
FT_ROTARY_BASE = 10000.0


@register("GPTNeoXForCausalLM", "GPTNeoXModel")
class GPTNeoX(LinearArchitecture):
    section = "gptneox"
    ft_model_type = "GPT-NeoX"
    prefixes = ("gpt_neox.", "")
    global_tensors = {
        "model.wte": ("embed_in.weight", Split.REPLICATED),
        "model.final_layernorm.weight": ("final_layer_norm.weight", Split.REPLICATED),
        "model.final_layernorm.bias": ("final_layer_norm.bias", Split.REPLICATED),
    }
    layer_tensors = {
        "input_layernorm.weight": ("layers.{i}.input_layernorm.weight", Split.REPLICATED),
        "input_layernorm.bias": ("layers.{i}.input_layernorm.bias", Split.REPLICATED),
        "attention.query_key_value.weight": ("layers.{i}.attention.query_key_value.weight", Split.QKV),
        "attention.query_key_value.bias": ("layers.{i}.attention.query_key_value.bias", Split.QKV),
        "attention.dense.weight": ("layers.{i}.attention.dense.weight", Split.ROW),
        "post_attention_layernorm.weight": ("layers.{i}.post_attention_layernorm.weight", Split.REPLICATED),
        "post_attention_layernorm.bias": ("layers.{i}.post_attention_layernorm.bias", Split.REPLICATED),
        "mlp.dense_h_to_4h.weight": ("layers.{i}.mlp.dense_h_to_4h.weight", Split.COLUMN),
        "mlp.dense_h_to_4h.bias": ("layers.{i}.mlp.dense_h_to_4h.bias", Split.COLUMN),
        "mlp.dense_4h_to_h.weight": ("layers.{i}.mlp.dense_4h_to_h.weight", Split.ROW),
    }
    # Rotary caches and causal-mask buffers some checkpoints saved.
    ignored = (r"layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)",)

    def params(self) -> FTConfig:
        config = self.config
        approximation = gelu_approximation(config.get("hidden_act", "gelu"), "hidden_act")
        _, heads, head_dim = self.head_shape("hidden_size", "num_attention_heads")
        fraction = config.get("rotary_pct")
        if fraction is None:
            fraction = (config.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0)
        if config.get("attention_bias", True) is False:
            raise CheckpointError("config.json attention_bias=false: FT's GPT-NeoX layout has biases")
        return FTConfig(
            model_name=config.get("model_type", "gpt_neox"),
            gelu_approximation=approximation,
            head_num=heads,
            size_per_head=head_dim,
            inter_size=config["intermediate_size"],
            num_layer=config["num_hidden_layers"],
            max_pos_seq_len=config["max_position_embeddings"],
            vocab_size=config["vocab_size"],
            start_id=config.get("bos_token_id", 0),
            end_id=config.get("eos_token_id", 0),
            layernorm_eps=config.get("layer_norm_eps", 1e-5),
            has_positional_encoding=False,
            rotary_embedding=int(head_dim * fraction),
            rotary_style="neox",
            rope_theta=rope_theta(config, key="rotary_emb_base"),
            use_gptj_residual=bool(config.get("use_parallel_residual", True)),
        )

    @classmethod
    def ft_unsupported(cls, config: dict) -> str | None:
        theta = rope_theta(config, key="rotary_emb_base")
        if theta != FT_ROTARY_BASE:
            return f"rotary base {theta:g} (FT's rotary kernels use {FT_ROTARY_BASE:g})"
        return None

    def tables(self, params: FTConfig) -> tuple[Table, Table]:
        names = set(self.checkpoint.names())
        head = "embed_out.weight" if "embed_out.weight" in names else "lm_head.weight"
        global_table = {**self.global_tensors, "model.lm_head.weight": (head, Split.REPLICATED)}
        layer_table = dict(self.layer_tensors)
        attention_bias, mlp_bias = "layers.{i}.attention.dense.bias", "layers.{i}.mlp.dense_4h_to_h.bias"
        if params.use_gptj_residual:
            layer_table[BIAS_SUM] = ((attention_bias, mlp_bias), Split.REPLICATED)
        else:
            layer_table["attention.dense.bias"] = (attention_bias, Split.REPLICATED)
            layer_table["mlp.dense_4h_to_h.bias"] = (mlp_bias, Split.REPLICATED)
        return global_table, layer_table

    def ft_shape(self, ft_name: str, source_shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
        if ft_name.endswith(BIAS_SUM):
            return source_shapes[0]
        return super().ft_shape(ft_name, source_shapes)

    def to_ft(self, ft_name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        heads = self.config["num_attention_heads"]
        if ft_name.endswith(self.QKV_WEIGHT):  # [heads·3·d, h] per head (q, k, v) -> [h, q | k | v]
            fused = tensors[0]
            return fused.view(heads, 3, -1, fused.shape[-1]).transpose(0, 1).reshape(fused.shape).t()
        if ft_name.endswith(self.QKV_BIAS):
            return tensors[0].view(heads, 3, -1).transpose(0, 1).reshape(-1)
        if ft_name.endswith((BIAS_SUM, "attention.dense.bias", "mlp.dense_4h_to_h.bias")):
            # FT NeoX: stored divided by the TP size (added on every rank before the all-reduce).
            return sum(tensor.float() for tensor in tensors) / self.layout.tensor_parallel
        return super().to_ft(ft_name, tensors)
