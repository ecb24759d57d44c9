"""Lazy access to a HuggingFace checkpoint directory: names and shapes without loading, one tensor at a time.

Formats: `model.safetensors`, sharded safetensors (`model.safetensors.index.json`), `pytorch_model.bin` and
sharded `pytorch_model.bin.index.json`. Safetensors files are memory-mapped; pickles are opened with
`torch.load(mmap=True, weights_only=True)` (readers/pickles.py), so no format ever materialises the whole state
dict (except torch's legacy non-zip pickles, which cannot be mapped: loaded whole once). A damaged or hostile file (truncated, not JSON, a pickle calling more than tensors) is refused as one
CheckpointError naming it, when the checkpoint is opened: every header is read then. Headers stay
open for names and shapes; each tensor is read on its own and nothing stays mapped (see `load`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from safetensors import SafetensorError, safe_open

from templates.ft_python.ft_checkpoint import CheckpointError

from ..lazy import torch
from .pickles import is_mappable, load_state_dict

CONFIG_NAME = "config.json"
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
    "chat_template.jinja",  # the chat template transformers 4.43+ saves beside tokenizer_config.json
    "tokenizer.model",
)


def require_hf_directory(path: Path) -> None:
    """Raises CheckpointError saying what `path` is when it is not an HF checkpoint directory (one with config.json)."""
    if not path.exists():
        raise CheckpointError(f"checkpoint path does not exist: {path}")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint path is not a directory: {path}")
    if not (path / CONFIG_NAME).is_file():
        raise CheckpointError(f"no config.json in {path}: not a HuggingFace checkpoint directory")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from the checkpoint (config.json, an index); CheckpointError naming the file when it is not one."""
    try:
        value = json.loads(path.read_bytes())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON ({error.msg}: line {error.lineno} column {error.colno}); "
                              f"repair it or copy it again from where the checkpoint came from") from None
    except UnicodeDecodeError as error:
        raise CheckpointError(f"{path} is not JSON text ({error.reason} at byte {error.start}); "
                              f"copy it again from where the checkpoint came from") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds a JSON {type(value).__name__}, not an object; "
                              f"copy it again from where the checkpoint came from")
    return value


class HFCheckpoint:
    """One HF checkpoint directory. `shape()`/`dtype()` read headers only; `load()` reads one tensor."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        require_hf_directory(self.path)
        self.config: dict[str, Any] = read_json(self.path / CONFIG_NAME)
        self._handles: dict[Path, Any] = {}
        self._file_of: dict[str, Path] = self._index_tensors()

    # -- discovery -------------------------------------------------------------------------------------------
    def _index_tensors(self) -> dict[str, Path]:
        """Map each tensor name to the file that holds it, reading headers/indices only (every file's, so a damaged
        one is refused now, before anything is written)."""
        for index_name in (SAFETENSORS_INDEX, PICKLE_INDEX):
            index_path = self.path / index_name
            if index_path.is_file():
                weight_map = read_json(index_path).get("weight_map")
                if not isinstance(weight_map, dict):
                    raise CheckpointError(f"{index_path} has no weight_map (tensor name -> file); "
                                          f"copy it again from where the checkpoint came from")
                files = {name: self.path / file for name, file in weight_map.items()}
                missing = sorted({str(f.name) for f in files.values() if not f.is_file()})
                if missing:
                    raise CheckpointError(f"{index_path} names shard files that do not exist: {missing}; "
                                          f"copy the missing files into {self.path}")
                held = {file: set(self._names_in(file)) for file in set(files.values())}
                absent = sorted(f"{name} ({file.name})" for name, file in files.items() if name not in held[file])
                if absent:
                    raise CheckpointError(f"{index_path} places tensors in files that do not hold them: "
                                          f"{absent[:5]}{' ...' if len(absent) > 5 else ''}; the index and the "
                                          f"shard files come from different copies: copy them again together")
                return files
        for single in (self.path / SAFETENSORS_SINGLE, self.path / PICKLE_SINGLE):
            if single.is_file():
                return {name: single for name in self._names_in(single)}
        raise CheckpointError(
            f"no weights in {self.path}: expected {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, "
            f"{PICKLE_SINGLE} or {PICKLE_INDEX}"
        )

    def _names_in(self, file: Path) -> list[str]:
        if file.suffix == ".safetensors":
            return list(self._header(file)[1])
        return list(self._pickle(file).keys())

    def _pickle(self, file: Path) -> dict[str, torch.Tensor]:
        # mmap where the format allows: tensors stay on disk until touched; weights_only=True: no code from the pickle.
        handle = self._handles.get(file)
        if handle is None:
            handle = load_state_dict(file)
            if not isinstance(handle, dict):
                raise CheckpointError(f"{file} holds a {type(handle).__name__}, not a state dict (tensor name -> "
                                      f"tensor); save the model's state_dict(), or as safetensors")
            self._handles[file] = handle
        return handle

    def _header(self, file: Path) -> tuple[int, dict[str, dict]]:
        """(offset of the data section, {name: {dtype, shape, data_offsets}}) of a safetensors file."""
        header = self._handles.get(file)
        if header is None:
            # Let the safetensors library validate the file once (header, offsets, size); then keep only its header.
            # framework="numpy": opening only validates (no tensor is read), and "pt" would import torch in the
            # launcher, which reads headers to plan.
            try:
                with safe_open(file, framework="numpy"):
                    pass
            except SafetensorError as error:
                raise CheckpointError(f"{file} is not a readable safetensors file ({error}): it is probably "
                                      f"truncated or damaged; copy or download it again") from None
            with open(file, "rb") as handle:
                size = int.from_bytes(handle.read(8), "little")
                entries = json.loads(handle.read(size))
            entries.pop("__metadata__", None)
            header = (8 + size, entries)
            self._handles[file] = header
        return header

    # -- access ----------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._file_of)

    def _file(self, name: str) -> Path:
        try:
            return self._file_of[name]
        except KeyError:
            raise CheckpointError(f"tensor {name!r} is not in checkpoint {self.path}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        file = self._file(name)
        if file.suffix == ".safetensors":
            return tuple(self._header(file)[1][name]["shape"])
        return tuple(self._pickle(file)[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        file = self._file(name)
        if file.suffix == ".safetensors":
            dtype = self._header(file)[1][name]["dtype"]
            if dtype not in _SAFETENSORS_DTYPES:
                raise CheckpointError(f"{name}: unsupported safetensors dtype {dtype}")
            return getattr(torch, _SAFETENSORS_DTYPES[dtype])
        return self._pickle(file)[name].dtype

    def load(self, name: str, scratch: "Scratch | None" = None) -> torch.Tensor:
        """Read one tensor into memory (a copy, safe to modify; with `scratch`, valid until its next use).

        Safetensors: one positioned read of the tensor's bytes straight into its buffer (no memory map: pages
        touched through a map stay in the resident set until it is unmapped, and faulting them in one by one is
        slower than a read). Pickles: the file is mapped afresh for each tensor and unmapped right after.
        """
        file = self._file(name)
        if file.suffix == ".safetensors":
            data_start, entries = self._header(file)
            entry = entries[name]
            begin, end = entry["data_offsets"]
            dtype = self.dtype(name)
            numel = 1
            for dim in entry["shape"]:
                numel *= dim
            if numel * dtype.itemsize != end - begin:
                raise CheckpointError(f"{file}: {name} has {end - begin} bytes for shape {entry['shape']}")
            raw = scratch.take(end - begin) if scratch is not None else torch.empty(end - begin, dtype=torch.uint8)
            tensor = raw.view(dtype).view(entry["shape"])
            buffer = memoryview(raw.numpy())
            with open(file, "rb", buffering=0) as handle:
                handle.seek(data_start + begin)
                if handle.readinto(buffer) != end - begin:
                    raise CheckpointError(f"{file} is truncated: cannot read {name}")
            return tensor
        if not is_mappable(file):  # legacy format: loaded whole once, at open
            return self._pickle(file)[name].clone()
        state = load_state_dict(file)
        tensor = state[name].clone()
        del state
        return tensor

    def tokenizer_files(self) -> Iterator[Path]:
        for name in TOKENIZER_FILES:
            candidate = self.path / name
            if candidate.is_file():
                yield candidate


class Scratch:
    """A byte buffer reused across reads: fresh pages cost a fault and zeroing each, reused ones do not."""

    def __init__(self) -> None:
        self._buffer = torch.empty(0, dtype=torch.uint8)

    def take(self, nbytes: int) -> torch.Tensor:
        if self._buffer.numel() < nbytes:
            self._buffer = torch.empty(0, dtype=torch.uint8)  # release the old one first
            self._buffer = torch.empty(nbytes, dtype=torch.uint8)
        return self._buffer[:nbytes]


# safetensors dtype -> torch dtype name (looked up on torch when read: torch is imported on first use, exporter/lazy.py)
_SAFETENSORS_DTYPES = {
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F64": "float64",
    "I64": "int64",
    "I32": "int32",
    "U8": "uint8",
    "BOOL": "bool",
}
