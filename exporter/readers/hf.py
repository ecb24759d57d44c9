"""Lazy access to a HuggingFace checkpoint directory: names and shapes without loading, one tensor at a time.

Formats: `model.safetensors`, sharded safetensors (`model.safetensors.index.json`), `pytorch_model.bin` and
sharded `pytorch_model.bin.index.json`. Safetensors files are memory-mapped; pickles are opened with
`torch.load(mmap=True, weights_only=True)`, so no format ever materialises the whole state dict.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open


class CheckpointError(ValueError):
    """The checkpoint cannot be read or does not match what the exporter expects."""


SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"

# Tokenizer files copied next to the FT shards (whichever exist).
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
)


class HFCheckpoint:
    """One HF checkpoint directory. `shape()`/`dtype()` read headers only; `load()` reads one tensor."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"checkpoint path does not exist: {self.path}")
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint path is not a directory: {self.path}")
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"no config.json in {self.path}: not a HuggingFace checkpoint directory")
        self.config: dict[str, Any] = json.loads(config_path.read_text())
        self._handles: dict[Path, Any] = {}
        self._file_of: dict[str, Path] = self._index_tensors()

    # -- discovery -------------------------------------------------------------------------------------------
    def _index_tensors(self) -> dict[str, Path]:
        """Map each tensor name to the file that holds it, reading headers/indices only."""
        for index_name in (SAFETENSORS_INDEX, PICKLE_INDEX):
            index_path = self.path / index_name
            if index_path.is_file():
                weight_map = json.loads(index_path.read_text())["weight_map"]
                files = {name: self.path / file for name, file in weight_map.items()}
                missing = sorted({str(f.name) for f in files.values() if not f.is_file()})
                if missing:
                    raise CheckpointError(f"{index_path} names shard files that do not exist: {missing}")
                return files
        single = self.path / SAFETENSORS_SINGLE
        if single.is_file():
            with safe_open(single, framework="pt") as handle:
                return {name: single for name in handle.keys()}
        single = self.path / PICKLE_SINGLE
        if single.is_file():
            return {name: single for name in self._pickle(single).keys()}
        raise CheckpointError(
            f"no weights in {self.path}: expected {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, "
            f"{PICKLE_SINGLE} or {PICKLE_INDEX}"
        )

    def _pickle(self, file: Path) -> dict[str, torch.Tensor]:
        # mmap=True: tensors stay on disk until touched; weights_only=True: no arbitrary code from the pickle.
        handle = self._handles.get(file)
        if handle is None:
            handle = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            self._handles[file] = handle
        return handle

    def _safetensors(self, file: Path):
        handle = self._handles.get(file)
        if handle is None:
            handle = safe_open(file, framework="pt")
            self._handles[file] = handle
        return handle

    # -- access ----------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def _file(self, name: str) -> Path:
        try:
            return self._file_of[name]
        except KeyError:
            raise CheckpointError(f"tensor {name!r} is not in checkpoint {self.path}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        file = self._file(name)
        if file.suffix == ".safetensors":
            return tuple(self._safetensors(file).get_slice(name).get_shape())
        return tuple(self._pickle(file)[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        file = self._file(name)
        if file.suffix == ".safetensors":
            dtype = self._safetensors(file).get_slice(name).get_dtype()
            return _SAFETENSORS_DTYPES.get(dtype, dtype)
        return self._pickle(file)[name].dtype

    def load(self, name: str) -> torch.Tensor:
        """Read one tensor into memory (a copy, safe to modify)."""
        file = self._file(name)
        if file.suffix == ".safetensors":
            return self._safetensors(file).get_tensor(name)
        return self._pickle(file)[name].clone()

    def tokenizer_files(self) -> Iterator[Path]:
        for name in TOKENIZER_FILES:
            candidate = self.path / name
            if candidate.is_file():
                yield candidate

    def close(self) -> None:
        self._handles.clear()


_SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
