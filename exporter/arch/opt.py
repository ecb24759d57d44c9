"""HF OPT (`OPTForCausalLM`) -> FT's OPT layout (FT's GPT section [gpt]).

Quirks: the position table has 2 leading rows FT drops (OPT offsets positions by 2); `do_layer_norm_before`
picks pre- or post-layernorm (opt-350m: post, no final layernorm); opt-350m's bias-free `project_in` /
`project_out` around a narrower embedding are folded into `wte` = E·W_inᵀ and `lm_head` = E·W_out, as FT's
OPT converter does; `model.lm_head.weight.bin` is always written; ReLU.
"""

from __future__ import annotations

from templates.ft_python.ft_checkpoint import CheckpointError, FTConfig

from ..lazy import torch
from ..parallel import Split
from .base import LinearArchitecture, Table
from .registry import register

POSITION_OFFSET = 2  # OPT's learned positions start at row 2


@register("OPTForCausalLM", "OPTModel")
class OPT(LinearArchitecture):
    prefixes = ("model.decoder.", "decoder.")
    global_tensors = {"model.wte": ("embed_tokens.weight", Split.REPLICATED)}
    layer_tensors = {
        "input_layernorm.weight": ("layers.{i}.self_attn_layer_norm.weight", Split.REPLICATED),
        "input_layernorm.bias": ("layers.{i}.self_attn_layer_norm.bias", Split.REPLICATED),
        "attention.query_key_value.weight": (
            tuple(f"layers.{{i}}.self_attn.{p}_proj.weight" for p in "qkv"),
            Split.QKV,
        ),
        "attention.query_key_value.bias": (tuple(f"layers.{{i}}.self_attn.{p}_proj.bias" for p in "qkv"), Split.QKV),
        "attention.dense.weight": ("layers.{i}.self_attn.out_proj.weight", Split.ROW),
        "attention.dense.bias": ("layers.{i}.self_attn.out_proj.bias", Split.REPLICATED),
        "post_attention_layernorm.weight": ("layers.{i}.final_layer_norm.weight", Split.REPLICATED),
        "post_attention_layernorm.bias": ("layers.{i}.final_layer_norm.bias", Split.REPLICATED),
        "mlp.dense_h_to_4h.weight": ("layers.{i}.fc1.weight", Split.COLUMN),
        "mlp.dense_h_to_4h.bias": ("layers.{i}.fc1.bias", Split.COLUMN),
        "mlp.dense_4h_to_h.weight": ("layers.{i}.fc2.weight", Split.ROW),
        "mlp.dense_4h_to_h.bias": ("layers.{i}.fc2.bias", Split.REPLICATED),
    }

    def _has(self, source: str) -> bool:
        return self.full_name(source) in set(self.checkpoint.names())

    def params(self) -> FTConfig:
        config = self.config
        if config.get("activation_function", "relu") != "relu":
            raise CheckpointError(f"config.json activation_function {config['activation_function']!r}: FT's OPT is ReLU")
        if not config.get("enable_bias", True):
            raise CheckpointError("config.json enable_bias=false: FT's OPT layout has biases")
        _, heads, head_dim = self.head_shape("hidden_size", "num_attention_heads")
        return FTConfig(
            model_name=config.get("model_type", "opt"),
            head_num=heads,
            size_per_head=head_dim,
            inter_size=config["ffn_dim"],
            num_layer=config["num_hidden_layers"],
            max_pos_seq_len=config["max_position_embeddings"],
            vocab_size=config["vocab_size"],
            start_id=config.get("bos_token_id", 2),
            end_id=config.get("eos_token_id", 2),
            layernorm_eps=1e-5,  # nn.LayerNorm's default, which OPT uses
            activation_type="Relu",
            layernorm_type="pre_layernorm" if config.get("do_layer_norm_before", True) else "post_layernorm",
            has_post_decoder_layernorm=self._has("final_layer_norm.weight"),
        )

    def tables(self, params: FTConfig) -> tuple[Table, Table]:
        projected = self._has("project_in.weight")
        tied = self.config.get("tie_word_embeddings", True) or not self._has_lm_head()
        head = "embed_tokens.weight" if tied else "lm_head.weight"
        global_table: Table = {
            "model.wte": (("embed_tokens.weight", "project_in.weight") if projected else "embed_tokens.weight",
                          Split.REPLICATED),
            "model.wpe": ("embed_positions.weight", Split.REPLICATED),
            "model.lm_head.weight": ((head, "project_out.weight") if projected else head, Split.REPLICATED),
        }
        if params.has_post_decoder_layernorm:
            global_table["model.final_layernorm.weight"] = ("final_layer_norm.weight", Split.REPLICATED)
            global_table["model.final_layernorm.bias"] = ("final_layer_norm.bias", Split.REPLICATED)
        return global_table, self.layer_tensors

    def _has_lm_head(self) -> bool:
        return "lm_head.weight" in set(self.checkpoint.names())

    def extra_ignored(self) -> tuple[str, ...]:
        # A tied lm_head is embed_tokens again (transformers 5 does not even save it).
        return ("lm_head.weight",) if self.config.get("tie_word_embeddings", True) else ()

    def ft_shape(self, ft_name: str, source_shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
        if ft_name == "model.wpe":  # [max_pos + 2, h] -> rows 2..
            return (source_shapes[0][0] - POSITION_OFFSET, source_shapes[0][1])
        if ft_name == "model.wte" and len(source_shapes) == 2:  # [V, word] · [h, word]ᵀ -> [V, h]
            return (source_shapes[0][0], source_shapes[1][0])
        if ft_name == "model.lm_head.weight" and len(source_shapes) == 2:  # [V, word] · [word, h] -> [V, h]
            return (source_shapes[0][0], source_shapes[1][1])
        return super().ft_shape(ft_name, source_shapes)

    def to_ft(self, ft_name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        if ft_name == "model.wpe":
            return tensors[0][POSITION_OFFSET:]
        if ft_name == "model.wte" and len(tensors) == 2:
            return tensors[0].float() @ tensors[1].float().t()
        if ft_name == "model.lm_head.weight" and len(tensors) == 2:
            return tensors[0].float() @ tensors[1].float()
        return super().to_ft(ft_name, tensors)
