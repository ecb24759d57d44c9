"""Source architectures: the registry (registry.py), every family file (imported here so each registers), and the two
ways in from a checkpoint path: `open_architecture` (to convert it) and `describe_source` (to check it up front)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..parallel import ParallelLayout
from ..readers import nemo_archive
from ..readers.gguf import GGUFCheckpoint
from ..readers.hf import CONFIG_NAME, HFCheckpoint
from ..readers.source import SourceKind, source_kind
from . import gemma, gpt2, gptj, gptneox, llama, mistral, nemo_gpt, opt, phi3, qwen2, qwen3, t5  # noqa: F401  (each registers itself)
from .base import Architecture, TensorSpec
from .nemo_gpt import nemo_architecture, nemo_model_class, open_nemo
from .registry import architecture_for, register, registered


def open_architecture(path: str | Path, layout: ParallelLayout = ParallelLayout()) -> Architecture:
    """The registered architecture over a checkpoint its reader opens in place: an HF directory, a GGUF file (read
    under HF names) or a staged NeMo checkpoint (convert.py stages a .nemo source first)."""
    kind = source_kind(path)
    if kind is SourceKind.NEMO:
        return open_nemo(path, layout)
    checkpoint = GGUFCheckpoint(path) if kind is SourceKind.GGUF else HFCheckpoint(path)
    return architecture_for(checkpoint.config, _config_origin(path, kind))(checkpoint, layout)


@dataclass(frozen=True)
class SourceModel:
    """What a checkpoint holds, from its config alone (nothing staged, no weights read)."""

    kind: SourceKind
    name: str  # HF config.json architectures[0] (for GGUF: the one its metadata maps to), or the NeMo model class
    section: str  # the config.ini section its export gets
    ft_model_type: str | None  # the FT Triton backend model_type that serves it; None: the python runtime only
    ft_unsupported: str | None = None  # why FT's backend would compute another model than this (None: it would not)
    model_kind: str = "decoder"  # exporter.runtimes.ModelKind's value: what its converter writes


def describe_source(path: str | Path) -> SourceModel:
    """The model at `path`. Raises CheckpointError when `path` is no checkpoint this project reads or a NeMo model no
    architecture is registered for, or a damaged file (config.json, a weights header) or unregistered HF
    architecture."""
    path = Path(path)
    kind = source_kind(path)
    if kind is SourceKind.NEMO:
        config = nemo_archive.source_config(path)
        name = nemo_model_class(config)
        architecture = nemo_architecture(config, path)
    else:
        config = (GGUFCheckpoint(path) if kind is SourceKind.GGUF else HFCheckpoint(path)).config
        architecture = architecture_for(config, _config_origin(path, kind))
        name = config["architectures"][0]
    return SourceModel(kind, name, architecture.section, architecture.ft_model_type_of(config),
                       architecture.ft_unsupported(config), architecture.model_kind)


__all__ = ["Architecture", "SourceModel", "TensorSpec", "architecture_for", "describe_source", "open_architecture",
           "register", "registered"]


def _config_origin(path: str | Path, kind: SourceKind) -> str:
    """Where the hyper-parameters an error names came from: a GGUF file's metadata, or the HF config.json."""
    return str(path) if kind is SourceKind.GGUF else str(Path(path) / CONFIG_NAME)
