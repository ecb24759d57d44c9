"""NeMo Megatron GPT (`MegatronGPTModel`, read by readers/nemo.py) -> FT GPT, as model_config.yaml describes it.

Quirks (layout.md has the FT side):
- weights are torch Linear [out, in]; FT wants [in, out], so matrices are transposed;
- `linear_qkv` / `query_key_value` rows are grouped per query group: [groups, (q heads of the group, k, v), d];
  FT wants the q | k | v blocks, heads in order inside each ([h, 3, h] without GQA), split per rank by Split.QKV;
- the fused gated `linear_fc1` [2 ffn, h] is [gate; up]: FT's `dense_h_to_4h` (gate) and `dense_h_to_4h_2` (up);
- the vocabulary is padded (to a multiple of make_vocab_size_divisible_by x TP): FT gets the tokenizer's real
  vocabulary, so the padded rows, which NeMo masks out when it decodes greedily, can never be generated;
- the tokenizer is GPT-2 BPE (start = end = <|endoftext|>) or SentencePiece (`library: sentencepiece`: start / end
  are its bos / eos pieces, as NeMo's SentencePieceTokenizer gives them);
- `layernorm1p` norms compute LN(x) (1 + w) + b: FT gets w + 1;
- two naming schemes (Megatron-core `decoder.layers.N.self_attention.linear_qkv`, legacy
  `language_model.encoder.layers.N.self_attention.query_key_value`), and TransformerEngine's fused norms
  (`linear_qkv.layer_norm_weight` = input layernorm, `linear_fc1.layer_norm_weight` = pre-MLP layernorm).
"""

from __future__ import annotations

from templates.ft_python.ft_checkpoint import CheckpointError, FTConfig

from ..lazy import torch
from ..parallel import ParallelLayout, Split
from ..readers.nemo import NemoCheckpoint, gated_fc1
from ..sentencepiece_tokenizer import end_of_text_ids
from ..tokenizer import TokenizerError, load_tokenizer
from .base import Architecture, Table
from .registry import register, registered

# FT name -> source names without the `model.` prefix (alternatives: the first the checkpoint has). `{i}`: layer.
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
    "attention.query_key_value.weight": ("decoder.layers.{i}.self_attention.linear_qkv.weight",),
    "attention.query_key_value.bias": ("decoder.layers.{i}.self_attention.linear_qkv.bias",),
    "attention.dense.weight": ("decoder.layers.{i}.self_attention.linear_proj.weight",),
    "attention.dense.bias": ("decoder.layers.{i}.self_attention.linear_proj.bias",),
    "post_attention_layernorm.weight": ("decoder.layers.{i}.pre_mlp_layernorm.weight",
                                        "decoder.layers.{i}.mlp.linear_fc1.layer_norm_weight"),
    "post_attention_layernorm.bias": ("decoder.layers.{i}.pre_mlp_layernorm.bias",
                                      "decoder.layers.{i}.mlp.linear_fc1.layer_norm_bias"),
    "mlp.dense_h_to_4h.weight": ("decoder.layers.{i}.mlp.linear_fc1.weight",),
    "mlp.dense_h_to_4h.bias": ("decoder.layers.{i}.mlp.linear_fc1.bias",),
    "mlp.dense_h_to_4h_2.weight": ("decoder.layers.{i}.mlp.linear_fc1.weight",),  # gated: the up half
    "mlp.dense_h_to_4h_2.bias": ("decoder.layers.{i}.mlp.linear_fc1.bias",),
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
_LEGACY_LAYER = {
    "input_layernorm": "input_layernorm", "attention.query_key_value": "self_attention.query_key_value",
    "attention.dense": "self_attention.dense", "post_attention_layernorm": "post_attention_layernorm",
    "mlp.dense_4h_to_h": "mlp.dense_4h_to_h", "mlp.dense_h_to_4h": "mlp.dense_h_to_4h",
    # Unfused legacy "swiglu" keeps the up projection separate; fused "fast-swiglu" packs it into dense_h_to_4h.
    "mlp.dense_h_to_4h_2": "mlp.dense_h_to_4h_2",
}
LEGACY_LAYER = {
    f"{ft}.{kind}": (f"language_model.encoder.layers.{{i}}.{source}.{kind}",)
    for ft, source in _LEGACY_LAYER.items() for kind in ("weight", "bias")
}
SPLITS = {
    "attention.query_key_value": Split.QKV, "attention.dense.weight": Split.ROW,
    "mlp.dense_h_to_4h": Split.COLUMN, "mlp.dense_4h_to_h.weight": Split.ROW,
}
TRANSPOSED = ("attention.dense.weight", "mlp.dense_4h_to_h.weight", "mlp.dense_h_to_4h.weight",
              "mlp.dense_h_to_4h_2.weight")
VOCAB_ROWS = ("model.wte", "model.lm_head.weight")
# FT activation_type for NeMo's `activation`.
ACTIVATIONS = {"gelu": "Gelu", "relu": "Relu", "silu": "Silu", "swiglu": "SiGLU", "fast-swiglu": "SiGLU",
               "geglu": "GeGLU", "fast-geglu": "GeGLU"}
NORMS = {"layernorm": "layernorm", "layernorm1p": "layernorm", "rmsnorm": "rmsnorm"}
# Buffers and copies that carry nothing FT needs: TransformerEngine state, rotary caches, and (tied embeddings
# with pipeline parallelism) the last stage's copy of the embedding table.
IGNORED = (r".*\._extra_state.*", r".*rotary_pos_emb\.inv_freq")
TIED_COPIES = (r"output_layer\.weight", r"word_embeddings\.weight", r"language_model\.output_layer\.weight")


def ft_model_type_for(config: dict) -> str | None:
    """"GPT" when FT's GPT backend can serve the model model_config.yaml describes (learned positions, LayerNorm,
    GELU / ReLU, as many kv as q heads); None when only the python runtime can (rotary, RMSNorm, gated MLPs,
    grouped-query attention)."""
    heads = config.get("num_attention_heads")
    supported = (
        config.get("position_embedding_type", "learned_absolute") == "learned_absolute"
        and config.get("normalization", "layernorm") in ("layernorm", "layernorm1p")
        and config.get("activation", "gelu") in ("gelu", "relu")
        and (config.get("num_query_groups") or heads) == heads
    )
    return "GPT" if supported else None


def _split(ft_name: str) -> Split:
    for key, split in SPLITS.items():
        if ft_name.startswith(key):
            return split
    return Split.REPLICATED


@register("MegatronGPTModel")
class NemoGPT(Architecture):
    prefixes = ("model.", "")
    ignored = IGNORED

    def __init__(self, checkpoint: NemoCheckpoint, layout: ParallelLayout = ParallelLayout()):
        self.config = checkpoint.config
        self.origin = checkpoint.origin
        staged = checkpoint.path
        self.sentencepiece = (staged / "tokenizer.model").is_file() and not (staged / "vocab.json").is_file()
        if self.sentencepiece:
            self._check_sentencepiece_config()
        self.activation = str(self.config.get("activation", "gelu"))
        self.ft_model_type = self.ft_model_type_of(self.config)
        names = set(checkpoint.names())
        self.legacy = any(".language_model." in f".{name}" for name in names)
        prefix = "model." if any(name.startswith("model.") for name in names) else ""
        global_names, layer_names = (LEGACY_GLOBAL, LEGACY_LAYER) if self.legacy else (MCORE_GLOBAL, MCORE_LAYER)
        self.global_tensors = {ft: (self._pick(options, names, prefix), _split(ft))
                               for ft, options in global_names.items()}
        self.layer_tensors = {ft: (self._pick(options, names, prefix, layer=0), _split(ft))
                              for ft, options in layer_names.items()}
        if self.legacy and gated_fc1(self.layer_tensors["mlp.dense_h_to_4h.weight"][0], self.activation):
            # fused legacy "fast-*glu": the up half comes out of dense_h_to_4h too
            for kind in ("weight", "bias"):
                self.layer_tensors[f"mlp.dense_h_to_4h_2.{kind}"] = self.layer_tensors[f"mlp.dense_h_to_4h.{kind}"]
        self._params: FTConfig | None = None
        super().__init__(checkpoint, layout)

    def _check_sentencepiece_config(self) -> None:
        """NeMo's SentencePieceTokenizer encodes with sentencepiece alone unless `sentencepiece_legacy` adds
        special tokens of its own (ids past the model's pieces, split out of the text): that mode is refused."""
        tokenizer = self.config.get("tokenizer") or {}
        library = tokenizer.get("library")
        if library != "sentencepiece":
            raise TokenizerError(f"{self.origin}: model_config.yaml tokenizer.library = {library!r} with a "
                                 "tokenizer.model; supported: 'sentencepiece'")
        if tokenizer.get("sentencepiece_legacy") and tokenizer.get("special_tokens"):
            raise TokenizerError(f"{self.origin}: model_config.yaml tokenizer.special_tokens with "
                                 "sentencepiece_legacy: true (tokens added outside the SentencePiece model); "
                                 "supported: special tokens inside tokenizer.model")

    @classmethod
    def ft_model_type_of(cls, config: dict) -> str | None:
        return ft_model_type_for(config)

    @staticmethod
    def _pick(options: tuple[str, ...], names: set[str], prefix: str, layer: int | None = None) -> str:
        """The first of `options` the checkpoint has (layer 0 decides for per-layer names); else the first, so
        that plan() names it as missing."""
        for option in options:
            if prefix + (option.format(i=layer) if layer is not None else option) in names:
                return option
        return options[0]

    # -- which tensors, from the config ---------------------------------------------------------------------
    def tables(self, params: FTConfig) -> tuple[Table, Table]:
        drop = set()
        if not params.has_positional_encoding:
            drop.add("model.wpe")
        if self.config.get("share_embeddings_and_output_weights", True):
            drop.add("model.lm_head.weight")
        if params.norm_type == "rmsnorm":
            drop |= {"model.final_layernorm.bias", "input_layernorm.bias", "post_attention_layernorm.bias"}
        if not params.attention_bias:
            drop |= {"attention.query_key_value.bias", "attention.dense.bias"}
        if not params.mlp_bias:
            drop |= {"mlp.dense_h_to_4h.bias", "mlp.dense_h_to_4h_2.bias", "mlp.dense_4h_to_h.bias"}
        if not params.gated:
            drop |= {"mlp.dense_h_to_4h_2.weight", "mlp.dense_h_to_4h_2.bias"}
        global_table = {k: v for k, v in self.global_tensors.items() if k not in drop}
        layer_table = {k: v for k, v in self.layer_tensors.items() if k not in drop}
        return global_table, layer_table

    def extra_ignored(self) -> tuple[str, ...]:
        return TIED_COPIES if self.config.get("share_embeddings_and_output_weights", True) else ()

    # -- hyper-parameters -----------------------------------------------------------------------------------
    def params(self) -> FTConfig:
        if self._params is None:
            self._params = self._read_params()
        return self._params

    def _refuse(self, key: str, why: str) -> CheckpointError:
        return CheckpointError(f"{self.origin}: model_config.yaml {key} = {self.config.get(key)!r}: {why}")

    def _read_params(self) -> FTConfig:
        config = self.config
        for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads"):
            if not isinstance(config.get(key), int):
                raise self._refuse(key, "an integer is required")
        hidden, heads = config["hidden_size"], config["num_attention_heads"]
        size_per_head = config.get("kv_channels") or hidden // heads
        if size_per_head * heads != hidden:
            raise self._refuse("kv_channels", f"heads x kv_channels must equal hidden_size {hidden} for FT's GPT")
        groups = config.get("num_query_groups") or heads
        if heads % groups:
            raise self._refuse("num_query_groups", f"must divide num_attention_heads {heads}")
        for key, supported in (("transformer_block_type", "pre_ln"), ("headscale", False),
                               ("normalize_attention_scores", True), ("num_moe_experts", None),
                               ("seq_len_interpolation_factor", None), ("rotary_scaling", None)):
            if config.get(key) is not None and config.get(key) != supported:
                raise self._refuse(key, f"only {supported!r} is supported")
        activation = config.get("activation", "gelu")
        if activation not in ACTIVATIONS:
            raise self._refuse("activation", f"supported: {sorted(ACTIVATIONS)}")
        normalization = config.get("normalization", "layernorm")
        if normalization not in NORMS:
            raise self._refuse("normalization", f"supported: {sorted(NORMS)}")
        positions = config.get("position_embedding_type", "learned_absolute")
        if positions not in ("learned_absolute", "rope"):
            raise self._refuse("position_embedding_type", "supported: learned_absolute, rope")
        rotary_dim = int(size_per_head * config.get("rotary_percentage", 1.0)) if positions == "rope" else 0
        if rotary_dim % 2:
            raise self._refuse("rotary_percentage", f"gives an odd number of rotary dims ({rotary_dim})")
        vocab, start_id, end_id = self._tokenizer_vocab()
        bias = bool(config.get("bias", True))
        return FTConfig(
            model_name="nemo-megatron-gpt",
            head_num=heads,
            size_per_head=size_per_head,
            inter_size=config["ffn_hidden_size"],
            num_layer=config["num_layers"],
            max_pos_seq_len=config.get("max_position_embeddings") or config["encoder_seq_length"],
            vocab_size=vocab,
            start_id=start_id,
            end_id=end_id,
            layernorm_eps=config.get("layernorm_epsilon", 1e-5),
            activation_type=ACTIVATIONS[activation],
            gelu_approximation=self._gelu_approximation(activation),
            kv_head_num=groups,
            norm_type=NORMS[normalization],
            has_positional_encoding=positions == "learned_absolute",
            rotary_embedding=rotary_dim,
            rotary_style="gptj" if config.get("rotary_interleaved") else "neox",
            rope_theta=float(config.get("rotary_base", 10000)),
            attention_bias=bias,
            mlp_bias=bias,
        )

    def _gelu_approximation(self, activation: str) -> str:
        """Megatron computes GELU exactly (F.gelu) unless `openai_gelu`, or `bias_activation_fusion` picks its fused
        bias-gelu / bias-geglu kernels: both of those are the tanh approximation."""
        if activation not in ("gelu", "geglu"):
            return "tanh"  # unused: no GELU in this model
        fused = bool(self.config.get("bias_activation_fusion", False)) and bool(self.config.get("bias", True))
        return "tanh" if self.config.get("openai_gelu", False) or fused else "none"

    def _tokenizer_vocab(self) -> tuple[int, int, int]:
        """(real vocabulary size, start id, end id) from the checkpoint's own tokenizer: GPT2BPETokenizer's
        <|endoftext|> for both, or the SentencePiece model's bos / eos pieces (NeMo's bos_id / eos_id)."""
        tokenizer = load_tokenizer(self.checkpoint.path)
        vocab = tokenizer.get_vocab_size(with_added_tokens=True)
        padded = self.checkpoint.shape(self.prefix + self.global_tensors["model.wte"][0])[0]
        if vocab > padded:
            raise CheckpointError(f"{self.origin}: the tokenizer has {vocab} tokens but the embedding table only "
                                  f"{padded} rows")
        if self.sentencepiece:
            start_id, end_id = end_of_text_ids(self.checkpoint.path / "tokenizer.model")
            if end_id is None:
                raise CheckpointError(f"{self.origin}: the SentencePiece model defines no end-of-sequence piece "
                                      "(eos_id -1); serving needs one to end generation")
            return vocab, end_id if start_id is None else start_id, end_id
        end_id = tokenizer.token_to_id("<|endoftext|>")
        if end_id is None:
            raise CheckpointError(f"{self.origin}: the tokenizer has no <|endoftext|> token")
        return vocab, end_id, end_id

    # -- layout ---------------------------------------------------------------------------------------------
    def ft_shape(self, ft_name: str, source_shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
        shape = source_shapes[0]
        if ft_name in VOCAB_ROWS:  # [padded vocab, h] -> [vocab, h]
            return (self.params().vocab_size, shape[1])
        if self._fused_gate(ft_name):  # [2 ffn, h] -> one half, transposed [h, ffn]
            return (shape[1], shape[0] // 2) if len(shape) == 2 else (shape[0] // 2,)
        if ft_name.endswith("attention.query_key_value.weight"):  # [rows, h] -> [h, q | k | v]
            return (shape[1], shape[0])
        if ft_name.endswith(TRANSPOSED):
            return (shape[1], shape[0])
        return shape

    def _fused_gate(self, ft_name: str) -> bool:
        """FT's gate / up tensor cut out of a fused [gate; up] fc1."""
        if not self.params().gated or ".mlp.dense_h_to_4h" not in ft_name:
            return False
        fc1 = self.global_tensors.get(ft_name) or self.layer_tensors[ft_name.split(".", 3)[3]]
        return gated_fc1(fc1[0], self.activation)

    def to_ft(self, ft_name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        tensor = tensors[0]
        if ft_name in VOCAB_ROWS:
            return tensor[: self.params().vocab_size]
        if self._fused_gate(ft_name):  # [gate; up]: dense_h_to_4h takes the gate, dense_h_to_4h_2 the up half
            half = tensor.shape[0] // 2
            tensor = tensor[:half] if ".dense_h_to_4h." in ft_name else tensor[half:]
            return tensor.t() if tensor.dim() == 2 else tensor
        if ".attention.query_key_value." in ft_name:
            return self._qkv_blocks(tensor)
        if ft_name.endswith(TRANSPOSED):
            return tensor.t()
        if ft_name.endswith("layernorm.weight") and self.config.get("normalization") == "layernorm1p":
            return tensor + 1  # LN(x) (1 + w) + b
        return tensor

    def _qkv_blocks(self, tensor: torch.Tensor) -> torch.Tensor:
        """[groups x (q heads of the group, k, v) x d, (h)] -> [(h,) q | k | v] with heads in order in each
        (one row gather; the transpose is a view)."""
        params = self.params()
        groups, d = params.kv_head_num, params.size_per_head
        per_group = params.head_num // groups
        # row index of (group, slot, dim) in Megatron's layout; slots 0..per_group-1 are q, then k, then v
        rows = torch.arange(groups * (per_group + 2) * d).view(groups, per_group + 2, d)
        order = torch.cat((rows[:, :per_group].reshape(-1), rows[:, per_group].reshape(-1),
                           rows[:, per_group + 1].reshape(-1)))
        blocks = tensor.index_select(0, order)  # [q + 2 kv, (h)]
        return blocks.t() if tensor.dim() == 2 else blocks


def nemo_model_class(config: dict) -> str:
    """The model class model_config.yaml's `target` names (MegatronGPTModel when it names none)."""
    return str(config.get("target") or "MegatronGPTModel").rpartition(".")[2]


def nemo_architecture(config: dict, origin: object) -> type[Architecture]:
    """The registered architecture for a NeMo model_config.yaml, keyed by its model class; `origin` names the
    checkpoint in the error when none is registered."""
    model_class = nemo_model_class(config)
    architecture = registered().get(model_class)
    if architecture is None:
        raise CheckpointError(f"{origin}: NeMo model {model_class!r} is not supported; supported: "
                              f"{sorted(registered())}")
    return architecture


def open_nemo(staged_path, layout: ParallelLayout = ParallelLayout()) -> Architecture:
    """The registered architecture over a staged NeMo checkpoint."""
    checkpoint = NemoCheckpoint(staged_path)
    return nemo_architecture(checkpoint.config, checkpoint.origin)(checkpoint, layout)
