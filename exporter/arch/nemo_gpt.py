"""NeMo Megatron GPT (`MegatronGPTModel`, read by readers/nemo.py) -> FT GPT.

Quirks:
- weights are torch Linear [out, in]; FT wants [in, out], so matrices are transposed;
- `linear_qkv` / `query_key_value` rows are grouped per query group: [groups, q heads of the group + k + v, d, h];
  FT wants [h, 3, heads * d] so a tensor-parallel split of the last dim keeps whole heads of each of q, k and v;
- the vocabulary is padded (to a multiple of make_vocab_size_divisible_by x TP); FT gets the tokenizer's real
  vocabulary, so the padded rows, which NeMo masks out in greedy decoding, can never be generated;
- two naming schemes (Megatron-core `decoder.layers.N.self_attention.linear_qkv`, legacy
  `language_model.encoder.layers.N.self_attention.query_key_value`), and TransformerEngine's fused norms
  (`linear_qkv.layer_norm_weight` for the input layernorm, `linear_fc1.layer_norm_weight` for the pre-MLP one).
"""

from __future__ import annotations

import logging

import torch

from ..ft.sharding import Split
from ..readers.hf import CheckpointError
from ..tokenizer import load_tokenizer
from ..readers.nemo import NemoCheckpoint
from . import register, registered
from .base import Architecture, ModelParams

log = logging.getLogger(__name__)

QKV_WEIGHT = "attention.query_key_value.weight"
QKV_BIAS = "attention.query_key_value.bias"
TRANSPOSED = ("attention.dense.weight", "mlp.dense_h_to_4h.weight", "mlp.dense_4h_to_h.weight")
VOCAB_ROWS = ("model.wte", "model.lm_head.weight")

# FT name -> source names without the `model.` prefix, first one present wins. `{i}` is the layer.
MCORE_GLOBAL = {
    "model.wte": ("embedding.word_embeddings.weight",),
    "model.wpe": ("embedding.position_embeddings.weight",),
    "model.final_layernorm.weight": ("decoder.final_layernorm.weight",),
    "model.final_layernorm.bias": ("decoder.final_layernorm.bias",),
    "model.lm_head.weight": ("output_layer.weight",),
}
MCORE_LAYER = {
    "input_layernorm.weight": ("decoder.layers.{i}.input_layernorm.weight",
                               "decoder.layers.{i}.self_attention.linear_qkv.layer_norm_weight"),
    "input_layernorm.bias": ("decoder.layers.{i}.input_layernorm.bias",
                             "decoder.layers.{i}.self_attention.linear_qkv.layer_norm_bias"),
    QKV_WEIGHT: ("decoder.layers.{i}.self_attention.linear_qkv.weight",),
    QKV_BIAS: ("decoder.layers.{i}.self_attention.linear_qkv.bias",),
    "attention.dense.weight": ("decoder.layers.{i}.self_attention.linear_proj.weight",),
    "attention.dense.bias": ("decoder.layers.{i}.self_attention.linear_proj.bias",),
    "post_attention_layernorm.weight": ("decoder.layers.{i}.pre_mlp_layernorm.weight",
                                        "decoder.layers.{i}.mlp.linear_fc1.layer_norm_weight"),
    "post_attention_layernorm.bias": ("decoder.layers.{i}.pre_mlp_layernorm.bias",
                                      "decoder.layers.{i}.mlp.linear_fc1.layer_norm_bias"),
    "mlp.dense_h_to_4h.weight": ("decoder.layers.{i}.mlp.linear_fc1.weight",),
    "mlp.dense_h_to_4h.bias": ("decoder.layers.{i}.mlp.linear_fc1.bias",),
    "mlp.dense_4h_to_h.weight": ("decoder.layers.{i}.mlp.linear_fc2.weight",),
    "mlp.dense_4h_to_h.bias": ("decoder.layers.{i}.mlp.linear_fc2.bias",),
}
LEGACY_GLOBAL = {
    "model.wte": ("language_model.embedding.word_embeddings.weight",),
    "model.wpe": ("language_model.embedding.position_embeddings.weight",),
    "model.final_layernorm.weight": ("language_model.encoder.final_layernorm.weight",),
    "model.final_layernorm.bias": ("language_model.encoder.final_layernorm.bias",),
    "model.lm_head.weight": ("language_model.output_layer.weight",),
}
_LEGACY_LAYER_NAMES = {
    "input_layernorm": "input_layernorm", "attention.query_key_value": "self_attention.query_key_value",
    "attention.dense": "self_attention.dense", "post_attention_layernorm": "post_attention_layernorm",
    "mlp.dense_h_to_4h": "mlp.dense_h_to_4h", "mlp.dense_4h_to_h": "mlp.dense_4h_to_h",
}
LEGACY_LAYER = {
    f"{ft}.{kind}": (f"language_model.encoder.layers.{{i}}.{source}.{kind}",)
    for ft, source in _LEGACY_LAYER_NAMES.items() for kind in ("weight", "bias")
}
SPLITS = {
    "model.wte": Split.REPLICATED, "model.wpe": Split.REPLICATED, "model.lm_head.weight": Split.REPLICATED,
    "model.final_layernorm.weight": Split.REPLICATED, "model.final_layernorm.bias": Split.REPLICATED,
    QKV_WEIGHT: Split.COLUMN, QKV_BIAS: Split.COLUMN,
    "attention.dense.weight": Split.ROW, "attention.dense.bias": Split.REPLICATED,
    "mlp.dense_h_to_4h.weight": Split.COLUMN, "mlp.dense_h_to_4h.bias": Split.COLUMN,
    "mlp.dense_4h_to_h.weight": Split.ROW, "mlp.dense_4h_to_h.bias": Split.REPLICATED,
    "input_layernorm.weight": Split.REPLICATED, "input_layernorm.bias": Split.REPLICATED,
    "post_attention_layernorm.weight": Split.REPLICATED, "post_attention_layernorm.bias": Split.REPLICATED,
}
# Copies or buffers that carry nothing FT needs: TransformerEngine state, rotary caches; with tied embeddings,
# the last pipeline stage's copy of the embedding table.
IGNORED = (r".*\._extra_state.*", r".*rotary_pos_emb\.inv_freq")
TIED_COPIES = (r"output_layer\.weight", r"word_embeddings\.weight", r"language_model\.output_layer\.weight")


@register("MegatronGPTModel")
class NemoGPT(Architecture):
    prefixes = ("model.", "")
    ignored = IGNORED

    def __init__(self, checkpoint):
        self.config = checkpoint.config
        names = set(checkpoint.names())
        legacy = any(".language_model." in f".{name}" for name in names)
        global_names, layer_names = (LEGACY_GLOBAL, LEGACY_LAYER) if legacy else (MCORE_GLOBAL, MCORE_LAYER)
        prefix = "model." if any(name.startswith("model.") for name in names) else ""
        wanted = set(self._wanted_ft_names())
        self.global_tensors = {
            ft: (self._pick(ft, options, names, prefix), SPLITS[ft])
            for ft, options in global_names.items() if ft in wanted
        }
        self.layer_tensors = {
            ft: (self._pick(ft, options, names, prefix, layer=0), SPLITS[ft])
            for ft, options in layer_names.items() if ft in wanted
        }
        self._params: ModelParams | None = None
        super().__init__(checkpoint)

    # -- what the config says is there ----------------------------------------------------------------------
    def _wanted_ft_names(self) -> list[str]:
        config = self.config
        names = ["model.wte", "model.final_layernorm.weight"] + [
            "input_layernorm.weight", QKV_WEIGHT, "attention.dense.weight", "post_attention_layernorm.weight",
            "mlp.dense_h_to_4h.weight", "mlp.dense_4h_to_h.weight",
        ]
        if config.get("position_embedding_type", "learned_absolute") == "learned_absolute":
            names.append("model.wpe")
        if not config.get("share_embeddings_and_output_weights", True):
            names.append("model.lm_head.weight")
        if config.get("normalization", "layernorm") == "layernorm":
            names += ["model.final_layernorm.bias", "input_layernorm.bias", "post_attention_layernorm.bias"]
        if config.get("bias", True):
            names += [QKV_BIAS, "attention.dense.bias", "mlp.dense_h_to_4h.bias", "mlp.dense_4h_to_h.bias"]
        return names

    def _pick(self, ft: str, options: tuple[str, ...], names: set[str], prefix: str, layer: int | None = None) -> str:
        """The first of `options` the checkpoint has (layer 0 decides for per-layer names); the first otherwise,
        so that `plan()` reports it as missing."""
        for option in options:
            probe = option.format(i=layer) if layer is not None else option
            if prefix + probe in names:
                return option
        return options[0]

    def extra_ignored(self) -> tuple[str, ...]:
        return TIED_COPIES if self.config.get("share_embeddings_and_output_weights", True) else ()

    # -- hyper-parameters -----------------------------------------------------------------------------------
    def params(self) -> ModelParams:
        if self._params is None:
            self._params = self._read_params()
        return self._params

    def _read_params(self) -> ModelParams:
        config = self.config
        for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads"):
            if not isinstance(config.get(key), int):
                raise CheckpointError(f"{self.checkpoint.origin}: model_config.yaml lacks an integer {key}")
        hidden, heads = config["hidden_size"], config["num_attention_heads"]
        size_per_head = config.get("kv_channels") or hidden // heads
        if size_per_head * heads != hidden:
            raise CheckpointError(f"{self.checkpoint.origin}: hidden_size {hidden} != num_attention_heads {heads} x "
                                  f"kv_channels {size_per_head}; FT's GPT needs them equal")
        groups = config.get("num_query_groups") or heads
        if groups != heads:
            raise CheckpointError(f"{self.checkpoint.origin}: grouped-query attention (num_query_groups {groups}) "
                                  "is not supported yet")
        if config.get("transformer_block_type", "pre_ln") != "pre_ln":
            raise CheckpointError(f"{self.checkpoint.origin}: transformer_block_type "
                                  f"{config['transformer_block_type']!r} is not supported (pre_ln only)")
        if config.get("normalization", "layernorm") != "layernorm":
            raise CheckpointError(f"{self.checkpoint.origin}: normalization {config['normalization']!r} is not "
                                  "supported yet")
        if config.get("position_embedding_type", "learned_absolute") != "learned_absolute":
            raise CheckpointError(f"{self.checkpoint.origin}: position_embedding_type "
                                  f"{config['position_embedding_type']!r} is not supported yet")
        activation = config.get("activation", "gelu")
        if activation != "gelu":
            raise CheckpointError(f"{self.checkpoint.origin}: activation {activation!r} is not supported yet")
        vocab, end_id = self._tokenizer_vocab()
        return ModelParams(
            model_name="nemo-megatron-gpt",
            head_num=heads,
            size_per_head=size_per_head,
            inter_size=config["ffn_hidden_size"],
            num_layer=config["num_layers"],
            max_pos_seq_len=config.get("max_position_embeddings") or config.get("encoder_seq_length"),
            vocab_size=vocab,
            start_id=end_id,
            end_id=end_id,
            layernorm_eps=config.get("layernorm_epsilon", 1e-5),
            tied_embeddings=config.get("share_embeddings_and_output_weights", True),
        )

    def _tokenizer_vocab(self) -> tuple[int, int]:
        """(real vocabulary size, end-of-text id) from the checkpoint's own tokenizer."""
        tokenizer = load_tokenizer(self.checkpoint.path)
        vocab = tokenizer.get_vocab_size(with_added_tokens=True)
        padded = self.checkpoint.shape(self.prefix_name("model.wte"))[0]
        if vocab > padded:
            raise CheckpointError(f"{self.checkpoint.origin}: the tokenizer has {vocab} tokens but the embedding "
                                  f"table only {padded} rows")
        end_id = tokenizer.token_to_id("<|endoftext|>")
        if end_id is None:
            raise CheckpointError(f"{self.checkpoint.origin}: the tokenizer has no <|endoftext|> token")
        return vocab, end_id

    def prefix_name(self, ft_name: str) -> str:
        return self.prefix + self.global_tensors[ft_name][0]

    # -- layout ---------------------------------------------------------------------------------------------
    def ft_shape(self, ft_name: str, source_shape: tuple[int, ...]) -> tuple[int, ...]:
        if ft_name in VOCAB_ROWS:  # [padded vocab, h] -> [vocab, h]
            return (self.params().vocab_size, source_shape[1])
        if ft_name.endswith(QKV_WEIGHT):  # [3h, h] -> [h, 3, h]
            return (source_shape[1], 3, source_shape[0] // 3)
        if ft_name.endswith(QKV_BIAS):  # [3h] -> [3, h]
            return (3, source_shape[0] // 3)
        if ft_name.endswith(TRANSPOSED):  # [out, in] -> [in, out]
            return (source_shape[1], source_shape[0])
        return source_shape

    def to_ft(self, ft_name: str, tensor: torch.Tensor) -> torch.Tensor:
        if ft_name in VOCAB_ROWS:
            return tensor[: self.params().vocab_size]
        heads = self.config["num_attention_heads"]
        if ft_name.endswith(QKV_WEIGHT):
            # rows [heads, (q, k, v), d] x h -> [h, (q, k, v), heads, d] -> [h, 3, heads * d]
            hidden_in = tensor.shape[1]
            grouped = tensor.view(heads, 3, -1, hidden_in)
            return grouped.permute(3, 1, 0, 2).reshape(hidden_in, 3, -1)
        if ft_name.endswith(QKV_BIAS):
            return tensor.view(heads, 3, -1).permute(1, 0, 2).reshape(3, -1)
        if ft_name.endswith(TRANSPOSED):
            return tensor.t()
        return tensor


def open_nemo(staged_path) -> Architecture:
    """The registered architecture for a staged NeMo checkpoint, keyed by the model class model_config.yaml's
    `target` names (MegatronGPTModel when it names none)."""
    checkpoint = NemoCheckpoint(staged_path)
    model_class = str(checkpoint.config.get("target") or "MegatronGPTModel").rpartition(".")[2]
    architecture = registered().get(model_class)
    if architecture is None:
        raise CheckpointError(f"{checkpoint.origin}: NeMo model {model_class!r} is not supported; supported: "
                              f"{sorted(registered())}")
    return architecture(checkpoint)
