"""Which kind of checkpoint a path holds, decided in one place: the converter, the architectures and the serving
checks ask `source_kind`. A new source format adds its kind here and its reader beside this file."""

from __future__ import annotations

import enum
from pathlib import Path

from . import nemo_archive
from .gguf import is_gguf
from .hf import require_hf_directory


class SourceKind(enum.Enum):
    HF = "HuggingFace checkpoint directory"  # config.json + safetensors or pytorch_model.bin (readers/hf.py)
    NEMO = "NeMo checkpoint"  # a .nemo archive, or an extracted or staged NeMo directory (readers/nemo*.py)
    GGUF = "GGUF file"  # llama.cpp's single-file format (readers/gguf.py)


def source_kind(path: str | Path) -> SourceKind:
    """The kind of checkpoint at `path`; raises CheckpointError saying what is there when it is none of them."""
    path = Path(path)
    if is_gguf(path):
        return SourceKind.GGUF
    if nemo_archive.is_nemo_source(path) or nemo_archive.is_staged(path):
        return SourceKind.NEMO
    require_hf_directory(path)
    return SourceKind.HF
