"""What every architecture shares: name tables -> a plan of FT tensors, and the checks on that plan.

The FT shard layout every architecture targets (FT's own files where FT has them; this project's conventions for
gated MLP, RMSNorm, rotary, grouped-query attention and untied output layers) is documented in `layout.md` next to
this file; the authoritative file table is `templates/ft_python/ft_checkpoint.py:tensor_table`, and the exporter
checks each plan against it before writing (`ft/convert.py:check_plan`).

An architecture file supplies data (name tables, ignored names, `params()`: the config.ini hyper-parameters as an
`FTConfig`, the one schema, in `ft_checkpoint.py`) and overrides a hook only for what is really different about its
family (`to_ft` for fusing or reshaping, `tables` when the names depend on the config).
A table value names one source tensor, or a tuple of them when an FT tensor is built from several (q, k, v fused;
an embedding folded with a projection); `to_ft` then receives them all.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Union

from templates.ft_python.ft_checkpoint import CheckpointError, FTConfig

from ..lazy import torch
from ..parallel import ParallelLayout, Split
from ..readers.hf import HFCheckpoint, Scratch

log = logging.getLogger(__name__)

# What a family's converter writes (exporter.runtimes.ModelKind's values: arch/ does not import runtimes/).
DECODER, ENCODER_DECODER = "decoder", "encoder-decoder"

Sources = Union[str, tuple[str, ...]]
Table = dict[str, tuple[Sources, Split]]


@dataclass(frozen=True)
class TensorSpec:
    """One FT tensor: its name, the source tensor(s) it comes from, its full FT shape and how it is split."""

    ft_name: str  # e.g. "model.layers.0.attention.query_key_value.weight"
    source: tuple[str, ...]  # full source checkpoint tensor names
    shape: tuple[int, ...]  # full (unsplit) FT shape
    split: Split
    layer: int | None = None  # None for global tensors
    sections: tuple[int, ...] = ()  # Split.QKV: (heads, kv heads, head dim) of the q | k | v last dim


@dataclass
class Plan:
    # The model's hyper-parameters and section; the layout and weight type are the writer's. Encoder-decoder
    # architectures (model_kind ENCODER_DECODER) give ft_t5_checkpoint.T5Config instead.
    params: FTConfig
    specs: list[TensorSpec] = field(default_factory=list)

    def by_layer(self) -> dict[int | None, list[TensorSpec]]:
        groups: dict[int | None, list[TensorSpec]] = {}
        for spec in self.specs:
            groups.setdefault(spec.layer, []).append(spec)
        return groups


# Where HF *ForCausalLM models store their output layer (unprefixed); a tied model may store its one embedding
# table there alone (`Architecture._tied_aliases`).
TIED_OUTPUT_NAMES = ("lm_head.weight", "embed_out.weight")


def _as_tuple(sources: Sources) -> tuple[str, ...]:
    return (sources,) if isinstance(sources, str) else tuple(sources)


class Architecture:
    """Base class: subclasses fill the tables and `params()`; hooks default to "no change"."""

    # FT section name in config.ini.
    section: ClassVar[str] = "gpt"
    # FT Triton backend `model_type` that serves this section; None: FT has no backend for it (python runtime only).
    ft_model_type: ClassVar[str | None] = "GPT"
    # DECODER (GPT layout, FTConfig) or ENCODER_DECODER (FT's T5 layout, ft_t5_checkpoint.T5Config).
    model_kind: ClassVar[str] = DECODER
    # FT name -> (source name(s) without prefix, split); `{i}` is the layer index in per-layer tables.
    global_tensors: ClassVar[Table] = {}
    layer_tensors: ClassVar[Table] = {}
    # Source names (regular expressions, without prefix) that carry no weights FT needs.
    ignored: ClassVar[tuple[str, ...]] = ()
    # Prefixes the source names may carry (e.g. "transformer." for GPT2LMHeadModel, "" for GPT2Model).
    prefixes: ClassVar[tuple[str, ...]] = ("",)
    # Source names used verbatim, outside the base model's prefix (HF *ForCausalLM output layers).
    unprefixed: ClassVar[tuple[str, ...]] = ("lm_head.weight", "lm_head.bias", "embed_out.weight", "embed_out.bias")

    def __init__(self, checkpoint: HFCheckpoint, layout: ParallelLayout = ParallelLayout()):
        self.checkpoint = checkpoint
        self.config: dict[str, Any] = checkpoint.config
        self.layout = layout  # for layouts whose file contents depend on it (FT NeoX biases)
        self.prefix = self._detect_prefix()

    @classmethod
    def ft_model_type_of(cls, config: dict[str, Any]) -> str | None:
        """The FT backend `model_type` that serves a source with this config (config.json, model_config.yaml): the
        class's, unless the family's config decides (NeMo GPT)."""
        return cls.ft_model_type

    @classmethod
    def ft_unsupported(cls, config: dict[str, Any]) -> str | None:
        """Why FT's backend, which serves this family, would not compute this checkpoint's model (None: it would)."""
        return None

    def full_name(self, source: str) -> str:
        return source if source in self.unprefixed else self.prefix + source

    def head_shape(self, hidden_key: str, heads_key: str) -> tuple[int, int, int]:
        """(hidden, heads, head_dim) from config.json; refused when the heads do not divide the hidden size."""
        hidden, heads = self.config[hidden_key], self.config[heads_key]
        if hidden % heads:
            raise CheckpointError(f"config.json {hidden_key} {hidden} is not divisible by {heads_key} {heads}")
        return hidden, heads, hidden // heads

    # -- hooks for the quirks -------------------------------------------------------------------------------
    def params(self) -> FTConfig:
        """The model's config.ini hyper-parameters (section, layout and weight type are filled in by plan / convert)."""
        raise NotImplementedError

    def tables(self, params: FTConfig) -> tuple[Table, Table]:
        """(global, per-layer) name tables; override when the tensor set depends on the config."""
        return self.global_tensors, self.layer_tensors

    def ft_shape(self, ft_name: str, source_shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
        """Full FT shape of `ft_name` given its source shape(s) (default: the single source's shape)."""
        return source_shapes[0]

    def to_ft(self, ft_name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Source tensor(s) -> full FT layout (default: the single source unchanged)."""
        return tensors[0]

    def sections(self, ft_name: str, params: FTConfig) -> tuple[int, ...]:
        """Split.QKV tensors: (heads, kv heads, head dim) of the full tensor's q | k | v last dim."""
        return (params.head_num, params.kv_head_num, params.size_per_head)

    def extra_ignored(self) -> tuple[str, ...]:
        """Ignored names that depend on the config (e.g. a tied lm_head)."""
        return ()

    # -- shared machinery -----------------------------------------------------------------------------------
    def _detect_prefix(self) -> str:
        """The first of `prefixes` under which the checkpoint holds any tensor of the tables (any: a tied model may
        store its embedding only as the output layer, see `_tied_aliases`)."""
        names = set(self.checkpoint.names())
        candidates = [source for sources, _ in self.global_tensors.values() for source in _as_tuple(sources)]
        candidates += [source.format(i=0) for sources, _ in self.layer_tensors.values()
                       for source in _as_tuple(sources)]
        candidates = [source for source in candidates if source not in self.unprefixed]
        for prefix in self.prefixes:
            if any(prefix + source in names for source in candidates):
                return prefix
        raise CheckpointError(
            f"missing tensor {candidates[0]!r} (tried prefixes {list(self.prefixes)}) in {self.checkpoint.path}"
        )

    def _tied_aliases(self, global_table: Table, layer_table: Table) -> dict[str, str]:
        """{name the tables read: name the checkpoint stores it under} for a tied model's one embedding table, which
        a checkpoint may store under either name; {} when nothing needs renaming.

        - Only the output layer stored (`lm_head.weight`, no `embed_tokens.weight` / `wte.weight`) while the tables
          read no output layer (the family found the model tied): the input embedding is read from it.
        - Only the input embedding stored while the tables read an output layer and config.json says
          `tie_word_embeddings: true`: the output layer is read from the input embedding.
        transformers loads both by tying in whichever direction the checkpoint allows; so does this.
        """
        if "model.wte" not in global_table:
            return {}
        names = set(self.checkpoint.names())
        embedding = self.full_name(_as_tuple(global_table["model.wte"][0])[0])
        read = {self.full_name(source) for table in (global_table, layer_table) for sources, _ in table.values()
                for source in _as_tuple(sources)}
        outputs_read = read & set(TIED_OUTPUT_NAMES)
        aliases: dict[str, str] = {}
        if embedding not in names and not outputs_read:
            stored = [name for name in TIED_OUTPUT_NAMES if name in names]
            if len(stored) == 1:
                aliases[embedding] = stored[0]
        elif embedding in names and self.config.get("tie_word_embeddings") is True:
            aliases.update({output: embedding for output in outputs_read if output not in names})
        for name, stored_as in aliases.items():
            log.info("%s: tied embedding stored as %s only: reading %s from it", self.checkpoint.path, stored_as,
                     name)
        return aliases

    def plan(self) -> Plan:
        """Every FT tensor to write, with full shapes; errors name missing and unknown source tensors."""
        params = replace(self.params(), section=self.section)
        global_table, layer_table = self.tables(params)
        aliases = self._tied_aliases(global_table, layer_table)

        def full_name(source: str) -> str:
            name = self.full_name(source)
            return aliases.get(name, name)

        wanted: list[tuple[str, tuple[str, ...], Split, int | None]] = [
            (ft_name, _as_tuple(sources), split, None) for ft_name, (sources, split) in global_table.items()
        ]
        for layer in range(params.num_layer):
            for suffix, (sources, split) in layer_table.items():
                names = tuple(source.format(i=layer) for source in _as_tuple(sources))
                wanted.append((f"model.layers.{layer}.{suffix}", names, split, layer))
        available = set(self.checkpoint.names())
        used = {full_name(source) for _, sources, _, _ in wanted for source in sources}
        missing = sorted(used - available)
        if missing:
            raise CheckpointError(f"checkpoint {self.checkpoint.path} lacks tensors: {missing}")
        ignored = re.compile("|".join(f"(?:{pattern})" for pattern in self.ignored + self.extra_ignored()) or "(?!)")
        unknown = sorted(
            name
            for name in available - used
            if not ignored.fullmatch(name.removeprefix(self.prefix)) and not ignored.fullmatch(name)
        )
        if unknown:
            raise CheckpointError(
                f"checkpoint {self.checkpoint.path} has tensors the {type(self).__name__} mapping does not know: "
                f"{unknown}"
            )
        specs: list[TensorSpec] = []
        for ft_name, sources, split, layer in wanted:
            full = tuple(full_name(source) for source in sources)
            shape = tuple(self.ft_shape(ft_name, [self.checkpoint.shape(name) for name in full]))
            sections = self.sections(ft_name, params) if split is Split.QKV else ()
            specs.append(TensorSpec(ft_name, full, shape, split, layer, sections))
        return Plan(params, specs)

    def load(self, spec: TensorSpec, scratch: Scratch | None = None) -> torch.Tensor:
        """The full FT tensor of `spec` (one source read into `scratch`; several each into their own buffer)."""
        if len(spec.source) == 1:
            tensors = [self.checkpoint.load(spec.source[0], scratch)]
        else:
            tensors = [self.checkpoint.load(name) for name in spec.source]
        tensor = self.to_ft(spec.ft_name, tensors)
        if tuple(tensor.shape) != spec.shape:
            raise CheckpointError(f"{spec.source}: produced shape {list(tensor.shape)}, planned {list(spec.shape)}")
        return tensor


class LinearArchitecture(Architecture):
    """HF families built from nn.Linear ([out, in] weights): transposes to FT's [in, out], fuses separate q, k, v
    projections into q | k | v blocks (Split.QKV; with as many kv as q heads these are FT's [h, 3, h/tp] bytes)."""

    QKV_WEIGHT = "attention.query_key_value.weight"
    QKV_BIAS = "attention.query_key_value.bias"
    # FT matrices whose source is an nn.Linear weight.
    LINEAR = ("attention.dense.weight", "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h_2.weight",
              "mlp.dense_4h_to_h.weight")

    def ft_shape(self, ft_name: str, source_shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
        if ft_name.endswith(self.QKV_WEIGHT):  # [out_i, in] each -> [in, sum out_i]
            return (source_shapes[0][1], sum(shape[0] for shape in source_shapes))
        if ft_name.endswith(self.QKV_BIAS):
            return (sum(shape[0] for shape in source_shapes),)
        if ft_name.endswith(self.LINEAR):
            return tuple(reversed(source_shapes[0]))
        return source_shapes[0]

    def to_ft(self, ft_name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        if ft_name.endswith(self.QKV_WEIGHT):
            return torch.cat(tensors, dim=0).t()  # [q + 2kv, in] -> [in, q | k | v]
        if ft_name.endswith(self.QKV_BIAS):
            return torch.cat(tensors, dim=0)
        if ft_name.endswith(self.LINEAR):
            return tensors[0].t()
        return tensors[0]


def rope_theta(config: dict[str, Any], key: str = "rope_theta", default: float = 10000.0) -> float:
    """The rotary base from an HF config (transformers 4 `rope_theta`/`rotary_emb_base`, 5 `rope_parameters`);
    refuses scaled RoPE variants, whose maths the runtime does not implement."""
    parameters = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    rope_type = parameters.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise CheckpointError(f"config.json rope type {rope_type!r} is not supported (only unscaled RoPE)")
    return float(parameters.get("rope_theta") or config.get(key) or default)

