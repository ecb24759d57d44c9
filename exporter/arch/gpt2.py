"""HF GPT-2 (`GPT2LMHeadModel`) -> FT GPT.

Quirk: GPT-2's Conv1D weights are already [in, out], as FT wants; the fused `c_attn` [h, 3h] holds q | k | v
blocks, which FT needs as [h, 3, h] so a tensor-parallel split keeps whole heads of each of q, k and v.
"""

from __future__ import annotations

from templates.ft_python.ft_checkpoint import CheckpointError, FTConfig

from ..lazy import torch
from ..parallel import Split
from .base import Architecture
from .registry import register

# GPT-2's "gelu_new" is the tanh approximation, which is what FT's Gelu kernel computes.
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def gelu_approximation(activation: str, key: str) -> str:
    """config.ini gelu_approximation for an HF activation name: tanh flavours -> "tanh", exact "gelu" -> "none"
    (the python runtime computes it exactly; FT's backend would use its tanh kernel)."""
    if activation in TANH_GELUS:
        return "tanh"
    if activation == "gelu":
        return "none"
    raise CheckpointError(f"config.json {key} {activation!r} is not supported (gelu or {', '.join(TANH_GELUS)})")

QKV_WEIGHT = "attention.query_key_value.weight"
QKV_BIAS = "attention.query_key_value.bias"


@register("GPT2LMHeadModel", "GPT2Model")
class GPT2(Architecture):
    prefixes = ("transformer.", "")
    global_tensors = {
        "model.wte": ("wte.weight", Split.REPLICATED),
        "model.wpe": ("wpe.weight", Split.REPLICATED),
        "model.final_layernorm.weight": ("ln_f.weight", Split.REPLICATED),
        "model.final_layernorm.bias": ("ln_f.bias", Split.REPLICATED),
    }
    layer_tensors = {
        "input_layernorm.weight": ("h.{i}.ln_1.weight", Split.REPLICATED),
        "input_layernorm.bias": ("h.{i}.ln_1.bias", Split.REPLICATED),
        QKV_WEIGHT: ("h.{i}.attn.c_attn.weight", Split.COLUMN),
        QKV_BIAS: ("h.{i}.attn.c_attn.bias", Split.COLUMN),
        "attention.dense.weight": ("h.{i}.attn.c_proj.weight", Split.ROW),
        "attention.dense.bias": ("h.{i}.attn.c_proj.bias", Split.REPLICATED),
        "post_attention_layernorm.weight": ("h.{i}.ln_2.weight", Split.REPLICATED),
        "post_attention_layernorm.bias": ("h.{i}.ln_2.bias", Split.REPLICATED),
        "mlp.dense_h_to_4h.weight": ("h.{i}.mlp.c_fc.weight", Split.COLUMN),
        "mlp.dense_h_to_4h.bias": ("h.{i}.mlp.c_fc.bias", Split.COLUMN),
        "mlp.dense_4h_to_h.weight": ("h.{i}.mlp.c_proj.weight", Split.ROW),
        "mlp.dense_4h_to_h.bias": ("h.{i}.mlp.c_proj.bias", Split.REPLICATED),
    }
    # Causal-mask buffers that old checkpoints saved alongside the weights.
    ignored = (r"h\.\d+\.attn\.bias", r"h\.\d+\.attn\.masked_bias")

    def params(self) -> FTConfig:
        config = self.config
        approximation = gelu_approximation(config.get("activation_function", "gelu_new"), "activation_function")
        for flag, supported in (("scale_attn_by_inverse_layer_idx", False), ("scale_attn_weights", True)):
            if config.get(flag, supported) != supported:
                raise CheckpointError(f"config.json {flag}={config.get(flag)} is not supported by FT's GPT")
        hidden, heads, head_dim = self.head_shape("n_embd", "n_head")
        return FTConfig(
            model_name=config.get("model_type", "gpt2"),
            gelu_approximation=approximation,
            head_num=heads,
            size_per_head=head_dim,
            inter_size=config.get("n_inner") or 4 * hidden,
            num_layer=config["n_layer"],
            max_pos_seq_len=config["n_positions"],
            vocab_size=config["vocab_size"],
            start_id=config.get("bos_token_id", 50256),
            end_id=config.get("eos_token_id", 50256),
            layernorm_eps=config.get("layer_norm_epsilon", 1e-5),
        )

    def extra_ignored(self) -> tuple[str, ...]:
        # A tied lm_head is the embedding table again; FT reuses model.wte.bin when lm_head is absent.
        if self.config.get("tie_word_embeddings", True):
            return ("lm_head.weight",)
        return ()

    def plan(self):
        plan = super().plan()
        if not self.config.get("tie_word_embeddings", True):
            raise CheckpointError("untied GPT-2 output embeddings are not supported yet (tie_word_embeddings=false)")
        return plan

    def ft_shape(self, ft_name: str, source_shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
        source_shape = source_shapes[0]
        if ft_name.endswith(QKV_WEIGHT):  # [h, 3h] -> [h, 3, h]
            return (source_shape[0], 3, source_shape[1] // 3)
        if ft_name.endswith(QKV_BIAS):  # [3h] -> [3, h]
            return (3, source_shape[0] // 3)
        return source_shape

    def to_ft(self, ft_name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        return tensors[0].reshape(self.ft_shape(ft_name, [tuple(tensors[0].shape)]))
