"""HF Llama (`LlamaForCausalLM`) -> this project's [llama] layout (FT has no Llama backend: python runtime only).

Quirks: RMSNorm (weights only); rotary over the whole head, halves style, base `rope_theta`, scaled as the config's
rope type says (rope.py); SwiGLU MLP
(`gate_proj` -> mlp.dense_h_to_4h, `up_proj` -> mlp.dense_h_to_4h_2, `down_proj` -> mlp.dense_4h_to_h);
grouped-query attention (q | k | v blocks per rank, kv heads split whole); biases only when the config has them;
tied or untied output layer. See layout.md.
"""

from __future__ import annotations

from templates.ft_python.ft_checkpoint import CheckpointError, FTConfig

from ..parallel import Split
from .base import LinearArchitecture, Table
from .registry import register
from .rope import rope_keys


@register("LlamaForCausalLM", "LlamaModel")
class Llama(LinearArchitecture):
    section = "llama"
    ft_model_type = None  # FasterTransformer has no Llama backend
    prefixes = ("model.", "")
    global_tensors = {
        "model.wte": ("embed_tokens.weight", Split.REPLICATED),
        "model.final_layernorm.weight": ("norm.weight", Split.REPLICATED),
    }
    layer_tensors = {
        "input_layernorm.weight": ("layers.{i}.input_layernorm.weight", Split.REPLICATED),
        "attention.query_key_value.weight": (
            tuple(f"layers.{{i}}.self_attn.{p}_proj.weight" for p in "qkv"),
            Split.QKV,
        ),
        "attention.dense.weight": ("layers.{i}.self_attn.o_proj.weight", Split.ROW),
        "post_attention_layernorm.weight": ("layers.{i}.post_attention_layernorm.weight", Split.REPLICATED),
        "mlp.dense_h_to_4h.weight": ("layers.{i}.mlp.gate_proj.weight", Split.COLUMN),
        "mlp.dense_h_to_4h_2.weight": ("layers.{i}.mlp.up_proj.weight", Split.COLUMN),
        "mlp.dense_4h_to_h.weight": ("layers.{i}.mlp.down_proj.weight", Split.ROW),
    }
    ignored = (r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)
    tied_by_default = False  # tie_word_embeddings when config.json leaves it out (the family's config default)

    def activation_keys(self) -> dict:
        """config.ini's activation keys for the config's gated MLP (Llama: SwiGLU)."""
        if self.config.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"config.json hidden_act {self.config['hidden_act']!r} is not supported (SwiGLU: silu)")
        return {"activation_type": "SiGLU"}

    def rotary_keys(self, head_dim: int) -> dict:
        """config.ini's rotary keys: over the whole head (Llama), base and scaling from the config (rope.py)."""
        return {"rotary_embedding": head_dim, "rotary_style": "neox", **rope_keys(self.config)}

    def tied(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", self.tied_by_default))

    def params(self) -> FTConfig:
        config = self.config
        hidden, heads = config["hidden_size"], config["num_attention_heads"]
        # An explicit head_dim may make the attention width heads * head_dim differ from hidden_size
        head_dim = config.get("head_dim") or self.head_shape("hidden_size", "num_attention_heads")[2]
        kv_heads = config.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise CheckpointError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        return FTConfig(
            model_name=config.get("model_type", "llama"),
            head_num=heads,
            size_per_head=head_dim,
            hidden_units=hidden,
            inter_size=config["intermediate_size"],
            num_layer=config["num_hidden_layers"],
            max_pos_seq_len=config["max_position_embeddings"],
            vocab_size=config["vocab_size"],
            start_id=_token_id(config.get("bos_token_id"), 1),
            end_id=_token_id(config.get("eos_token_id"), 2),
            layernorm_eps=config.get("rms_norm_eps", 1e-6),
            **self.activation_keys(),
            kv_head_num=kv_heads,
            norm_type="rmsnorm",
            has_positional_encoding=False,
            **self.rotary_keys(head_dim),
            attention_bias=bool(config.get("attention_bias", False)),
            mlp_bias=bool(config.get("mlp_bias", False)),
        )

    def tables(self, params: FTConfig) -> tuple[Table, Table]:
        global_table = dict(self.global_tensors)
        if not self.tied():
            global_table["model.lm_head.weight"] = ("lm_head.weight", Split.REPLICATED)
        layer_table = dict(self.layer_tensors)
        if params.attention_bias:
            layer_table["attention.query_key_value.bias"] = (
                tuple(f"layers.{{i}}.self_attn.{p}_proj.bias" for p in "qkv"),
                Split.QKV,
            )
            if params.attention_output_bias:
                layer_table["attention.dense.bias"] = ("layers.{i}.self_attn.o_proj.bias", Split.REPLICATED)
        if params.mlp_bias:
            layer_table["mlp.dense_h_to_4h.bias"] = ("layers.{i}.mlp.gate_proj.bias", Split.COLUMN)
            layer_table["mlp.dense_h_to_4h_2.bias"] = ("layers.{i}.mlp.up_proj.bias", Split.COLUMN)
            layer_table["mlp.dense_4h_to_h.bias"] = ("layers.{i}.mlp.down_proj.bias", Split.REPLICATED)
        return global_table, layer_table

    def extra_ignored(self) -> tuple[str, ...]:
        # A tied lm_head is embed_tokens again (transformers 5 does not save it at all).
        return ("lm_head.weight",) if self.tied() else ()


def _token_id(value, default: int) -> int:
    """HF configs may give a list of end tokens; FT has one end_id (the first)."""
    if isinstance(value, list):
        return int(value[0]) if value else default
    return default if value is None else int(value)
