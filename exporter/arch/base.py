"""What every architecture shares: name tables -> a plan of FT tensors, and the checks on that plan.

An architecture file supplies data (two name tables, ignored names) and overrides a hook only for what is really
different about its family (`ft_shape` / `to_ft` for a layout change such as fusing or reshaping q/k/v).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..ft.sharding import Split
from ..readers.hf import CheckpointError, HFCheckpoint, Scratch


@dataclass(frozen=True)
class ModelParams:
    """Hyper-parameters FT's config.ini needs."""

    model_name: str
    head_num: int
    size_per_head: int
    inter_size: int
    num_layer: int
    max_pos_seq_len: int
    vocab_size: int
    start_id: int
    end_id: int
    layernorm_eps: float
    tied_embeddings: bool = True
    activation_type: str = "Gelu"
    layernorm_type: str = "pre_layernorm"

    @property
    def hidden_size(self) -> int:
        return self.head_num * self.size_per_head


@dataclass(frozen=True)
class TensorSpec:
    """One FT tensor: its name, the source tensor it comes from, its full FT shape and how it is split."""

    ft_name: str  # e.g. "model.layers.0.attention.query_key_value.weight"
    source: str  # source checkpoint tensor name
    shape: tuple[int, ...]  # full (unsplit) FT shape
    split: Split
    layer: int | None = None  # None for global tensors


@dataclass
class Plan:
    params: ModelParams
    specs: list[TensorSpec] = field(default_factory=list)

    def by_layer(self) -> dict[int | None, list[TensorSpec]]:
        groups: dict[int | None, list[TensorSpec]] = {}
        for spec in self.specs:
            groups.setdefault(spec.layer, []).append(spec)
        return groups


class Architecture:
    """Base class: subclasses fill the tables and `params()`; hooks default to "no change"."""

    # FT section name in config.ini.
    section: ClassVar[str] = "gpt"
    # FT name -> (source name without prefix, split); `{i}` is the layer index in per-layer tables.
    global_tensors: ClassVar[dict[str, tuple[str, Split]]] = {}
    layer_tensors: ClassVar[dict[str, tuple[str, Split]]] = {}
    # Source names (regular expressions, without prefix) that carry no weights FT needs.
    ignored: ClassVar[tuple[str, ...]] = ()
    # Prefixes the source names may carry (e.g. "transformer." for GPT2LMHeadModel, "" for GPT2Model).
    prefixes: ClassVar[tuple[str, ...]] = ("",)

    def __init__(self, checkpoint: HFCheckpoint):
        self.checkpoint = checkpoint
        self.config: dict[str, Any] = checkpoint.config
        self.prefix = self._detect_prefix()

    # -- hooks for the quirks -------------------------------------------------------------------------------
    def params(self) -> ModelParams:
        raise NotImplementedError

    def ft_shape(self, ft_name: str, source_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Full FT shape of `ft_name` given its source shape (default: unchanged)."""
        return source_shape

    def to_ft(self, ft_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Source tensor -> full FT layout (default: unchanged)."""
        return tensor

    def extra_ignored(self) -> tuple[str, ...]:
        """Ignored names that depend on the config (e.g. a tied lm_head)."""
        return ()

    # -- shared machinery -----------------------------------------------------------------------------------
    def _detect_prefix(self) -> str:
        names = self.checkpoint.names()
        anchor = next(iter(self.global_tensors.values()))[0]
        for prefix in self.prefixes:
            if prefix + anchor in names:
                return prefix
        raise CheckpointError(
            f"missing tensor {anchor!r} (tried prefixes {list(self.prefixes)}) in {self.checkpoint.path}"
        )

    def plan(self) -> Plan:
        """Every FT tensor to write, with full shapes; errors name missing and unknown source tensors."""
        params = self.params()
        specs: list[TensorSpec] = []
        wanted: list[tuple[str, str, Split, int | None]] = [
            (ft_name, source, split, None) for ft_name, (source, split) in self.global_tensors.items()
        ]
        for layer in range(params.num_layer):
            for suffix, (source, split) in self.layer_tensors.items():
                wanted.append((f"model.layers.{layer}.{suffix}", source.format(i=layer), split, layer))
        available = set(self.checkpoint.names())
        missing = [self.prefix + source for _, source, _, _ in wanted if self.prefix + source not in available]
        if missing:
            raise CheckpointError(f"checkpoint {self.checkpoint.path} lacks tensors: {missing}")
        used = {self.prefix + source for _, source, _, _ in wanted}
        ignored = re.compile("|".join(f"(?:{pattern})" for pattern in self.ignored + self.extra_ignored()) or "(?!)")
        unknown = sorted(
            name for name in available - used if not ignored.fullmatch(name.removeprefix(self.prefix))
        )
        if unknown:
            raise CheckpointError(
                f"checkpoint {self.checkpoint.path} has tensors the {type(self).__name__} mapping does not know: "
                f"{unknown}"
            )
        for ft_name, source, split, layer in wanted:
            full_source = self.prefix + source
            shape = self.ft_shape(ft_name, self.checkpoint.shape(full_source))
            specs.append(TensorSpec(ft_name, full_source, shape, split, layer))
        return Plan(params, specs)

    def load(self, spec: TensorSpec, scratch: Scratch | None = None) -> torch.Tensor:
        tensor = self.to_ft(spec.ft_name, self.checkpoint.load(spec.source, scratch))
        if tuple(tensor.shape) != spec.shape:
            raise CheckpointError(f"{spec.source}: produced shape {list(tensor.shape)}, planned {list(spec.shape)}")
        return tensor
