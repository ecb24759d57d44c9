"""HF T5 (`T5ForConditionalGeneration`: T5, T5 v1.1, Flan-T5, UL2) -> FT's T5 layout (encoder-decoder).

FT's files are not the GPT layout: they keep HF's tensor names, as FT's converter writes them
(FasterTransformer examples/pytorch/t5/utils/huggingface_t5_ckpt_convert.py, `split_and_convert_process` and
`fuse_decoder_qkv`); the file table and config.ini schema are templates/ft_python/ft_t5_checkpoint.py, the
layout exporter/arch/t5_layout.md. FT's converter's rules, as data below:

- every 2-D tensor is transposed first (nn.Linear [out, in] -> [in, out]); then q/k/v (encoder self-attention,
  cross-attention) and wi / wi_0 / wi_1 split on the last axis, o and wo on the first;
- wi_0 -> `wi`, wi_1 -> `wi2` (gated GELU); the decoder's self-attention q, k, v are fused into one
  `qkv` [d_model, 3, inner] split on the last axis (each rank [d_model, 3, inner/tp]);
- relative_attention_bias [buckets, heads] -> [heads, buckets], split on the first axis (each rank its heads);
- shared.weight is written twice, transposed (`shared.weight`, [d_model, vocab], opened by no FT loader) and as
  stored (`shared.weight_T`, [vocab, d_model], the embedding FT's encoder and decoder read); lm_head.weight is
  written as stored ([vocab, d_model]), for a tied model from shared.weight, as transformers' state_dict has it.

Quirks of HF's config: the decoder output is scaled by d_model ** -0.5 before the output layer unless
config.json says `tie_word_embeddings: false` (T5 v1.1 / Flan-T5 / UL2; transformers 5 saves that as
`scale_decoder_outputs`); config.ini carries it as FT's `tie_word_embeddings`, which FT reads for that scaling.
"""

from __future__ import annotations

from typing import Any

from templates.ft_python.ft_checkpoint import CheckpointError
from templates.ft_python.ft_t5_checkpoint import FEED_FORWARD_PROJ, FT_MAX_DISTANCE, T5Config

from ..lazy import torch
from ..parallel import Split
from .base import ENCODER_DECODER, Architecture, Plan, TensorSpec
from .registry import register

FT_LAYER_NORM_EPSILON = 1e-6  # FT's T5Encoder.h / T5Decoding.h: constexpr layernorm_eps_
# FT file stem (after "encoder.block.{i}." / "decoder.block.{i}.") -> (HF name after the same prefix, split).
ENCODER_LAYER = {
    **{f"layer.0.SelfAttention.{n}.weight": (f"layer.0.SelfAttention.{n}.weight", Split.COLUMN) for n in "qkv"},
    "layer.0.SelfAttention.o.weight": ("layer.0.SelfAttention.o.weight", Split.ROW),
    "layer.0.layer_norm.weight": ("layer.0.layer_norm.weight", Split.REPLICATED),
    "layer.1.layer_norm.weight": ("layer.1.layer_norm.weight", Split.REPLICATED),
    "layer.1.DenseReluDense.wo.weight": ("layer.1.DenseReluDense.wo.weight", Split.ROW),
}
DECODER_LAYER = {
    "layer.0.layer_norm.weight": ("layer.0.layer_norm.weight", Split.REPLICATED),
    "layer.0.SelfAttention.o.weight": ("layer.0.SelfAttention.o.weight", Split.ROW),
    "layer.1.layer_norm.weight": ("layer.1.layer_norm.weight", Split.REPLICATED),
    **{f"layer.1.EncDecAttention.{n}.weight": (f"layer.1.EncDecAttention.{n}.weight", Split.COLUMN) for n in "qkv"},
    "layer.1.EncDecAttention.o.weight": ("layer.1.EncDecAttention.o.weight", Split.ROW),
    "layer.2.layer_norm.weight": ("layer.2.layer_norm.weight", Split.REPLICATED),
    "layer.2.DenseReluDense.wo.weight": ("layer.2.DenseReluDense.wo.weight", Split.ROW),
}
# The MLP's input projections (FT name: HF name), in the encoder's layer.1 and the decoder's layer.2.
MLP_IN = {False: {"wi": "wi"}, True: {"wi": "wi_0", "wi2": "wi_1"}}
DECODER_QKV = "layer.0.SelfAttention.qkv.weight"
RELATIVE_BIAS = "block.0.layer.0.SelfAttention.relative_attention_bias.weight"
# HF copies of shared.weight, and the cross-attention bias transformers drops on loading.
IGNORED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
           "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight")
EMBEDDING_NAMES = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def scales_decoder_output(config: dict[str, Any]) -> bool:
    """Whether the decoder output is multiplied by d_model ** -0.5 (transformers 5 `scale_decoder_outputs`, older
    configs `tie_word_embeddings`, default true as in the original T5)."""
    if "scale_decoder_outputs" in config:
        return bool(config["scale_decoder_outputs"])
    return config.get("tie_word_embeddings", True) is not False


@register("T5ForConditionalGeneration")
class T5(Architecture):
    section = "t5"  # config.ini has [encoder] / [decoder] / [structure] (ft_t5_checkpoint.T5Config)
    ft_model_type = "T5"
    model_kind = ENCODER_DECODER

    @classmethod
    def ft_unsupported(cls, config: dict[str, Any]) -> str | None:
        distance = config.get("relative_attention_max_distance", FT_MAX_DISTANCE)
        if distance != FT_MAX_DISTANCE:
            return (f"config.json relative_attention_max_distance {distance}: FT's T5 backend always uses "
                    f"{FT_MAX_DISTANCE} (T5TritonModel.cc)")
        epsilon = config.get("layer_norm_epsilon", FT_LAYER_NORM_EPSILON)
        if epsilon != FT_LAYER_NORM_EPSILON:
            return (f"config.json layer_norm_epsilon {epsilon}: FT's T5 always uses {FT_LAYER_NORM_EPSILON} "
                    "(T5Encoder.h, T5Decoding.h)")
        return None

    def _detect_prefix(self) -> str:
        return ""  # T5ForConditionalGeneration's names have no prefix

    def params(self) -> T5Config:
        config = self.config
        if config.get("is_encoder_decoder", True) is not True:
            raise CheckpointError(f"config.json is_encoder_decoder {config['is_encoder_decoder']!r}: only "
                                  "encoder-decoder T5 models are supported (T5ForConditionalGeneration)")
        projection = config.get("feed_forward_proj", "relu")
        if projection not in FEED_FORWARD_PROJ:
            raise CheckpointError(f"config.json feed_forward_proj {projection!r} is not supported "
                                  f"(supported: {', '.join(FEED_FORWARD_PROJ)})")
        eos = config.get("eos_token_id", 1)
        layers = config.get("num_layers", 6)
        return T5Config(
            name_or_path=self.checkpoint.path.name,
            num_heads=config.get("num_heads", 8),
            d_kv=config.get("d_kv", 64),
            d_model=config.get("d_model", 512),
            d_ff=config.get("d_ff", 2048),
            vocab_size=config.get("vocab_size", 32128),
            encoder_num_layers=layers,
            decoder_num_layers=config.get("num_decoder_layers") or layers,
            relative_attention_num_buckets=config.get("relative_attention_num_buckets", 32),
            relative_attention_max_distance=config.get("relative_attention_max_distance", 128),
            feed_forward_proj=projection,
            layer_norm_epsilon=config.get("layer_norm_epsilon", 1e-6),
            pad_token_id=config.get("pad_token_id", 0),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
            # T5 starts decoding with the pad token unless the config names another
            decoder_start_token_id=config.get("decoder_start_token_id", config.get("pad_token_id", 0)),
            scale_decoder_output=scales_decoder_output(config),
        )

    def _names(self, params: T5Config) -> list[tuple[str, tuple[str, ...], Split, int | None]]:
        """(FT stem, HF source names, split, writer unit) of every file stem, in FT's converter's names."""
        available = set(self.checkpoint.names())
        embedding = next((name for name in EMBEDDING_NAMES if name in available), "shared.weight")
        if "lm_head.weight" in available:
            lm_head = "lm_head.weight"
        elif self.config.get("tie_word_embeddings", True) is not False:
            lm_head = embedding  # tied: transformers' state_dict holds the embedding under this name too
        else:
            lm_head = "lm_head.weight"  # missing: refused below
        wanted = [("shared.weight", (embedding,), Split.REPLICATED, None),
                  ("shared.weight_T", (embedding,), Split.REPLICATED, None),
                  ("lm_head.weight", (lm_head,), Split.REPLICATED, None)]
        mlp_in = MLP_IN[params.gated]
        for part, layers, table, mlp_layer in (("encoder", params.encoder_num_layers, ENCODER_LAYER, 1),
                                               ("decoder", params.decoder_num_layers, DECODER_LAYER, 2)):
            unit = 0 if part == "encoder" else params.encoder_num_layers
            wanted += [(f"{part}.final_layer_norm.weight", (f"{part}.final_layer_norm.weight",), Split.REPLICATED,
                        None),
                       (f"{part}.{RELATIVE_BIAS}", (f"{part}.{RELATIVE_BIAS}",), Split.ROW, None)]
            for i in range(layers):
                block = f"{part}.block.{i}."
                rows = dict(table)
                rows.update({f"layer.{mlp_layer}.DenseReluDense.{ft}.weight":
                             (f"layer.{mlp_layer}.DenseReluDense.{hf}.weight", Split.COLUMN)
                             for ft, hf in mlp_in.items()})
                wanted += [(block + stem, (block + source,), split, unit + i) for stem, (source, split) in rows.items()]
                if part == "decoder":
                    wanted.append((block + DECODER_QKV, tuple(f"{block}layer.0.SelfAttention.{n}.weight"
                                                              for n in "qkv"), Split.COLUMN, unit + i))
        return wanted

    def plan(self) -> Plan:
        """Every FT file stem with its full shape; refuses missing and unknown HF tensors."""
        params = self.params()
        wanted = self._names(params)
        available = set(self.checkpoint.names())
        used = {source for _, sources, _, _ in wanted for source in sources}
        missing = sorted(used - available)
        if missing:
            raise CheckpointError(f"checkpoint {self.checkpoint.path} lacks tensors: {missing}")
        unknown = sorted(available - used - set(IGNORED))
        if unknown:
            raise CheckpointError(f"checkpoint {self.checkpoint.path} has tensors the T5 mapping does not know: "
                                  f"{unknown}")
        specs = [TensorSpec(stem, sources, self.ft_shape(stem, [self.checkpoint.shape(name) for name in sources]),
                            split, unit) for stem, sources, split, unit in wanted]
        return Plan(params, specs)

    def ft_shape(self, ft_name: str, source_shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
        first = tuple(source_shapes[0])
        if ft_name.endswith(DECODER_QKV):  # 3 x [inner, d_model] -> [d_model, 3, inner]
            return (first[1], 3, first[0])
        if ft_name in ("shared.weight_T", "lm_head.weight"):  # FT's converter transposes these twice
            return first
        return tuple(reversed(first))  # 2-D: transposed; 1-D: unchanged

    def to_ft(self, ft_name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        if ft_name.endswith(DECODER_QKV):  # [d_model, q | k | v] viewed as [d_model, 3, inner]
            return torch.cat([tensor.t() for tensor in tensors], dim=-1).reshape(self.ft_shape(
                ft_name, [tuple(tensors[0].shape)]))
        tensor = tensors[0]
        if ft_name in ("shared.weight_T", "lm_head.weight") or tensor.dim() != 2:
            return tensor
        return tensor.t()
