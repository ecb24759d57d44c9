"""A NeMo 2 / Megatron-core distributed checkpoint (`model_weights/` with `.metadata` and `*.distcp`), read with
torch.distributed.checkpoint one region at a time: no process group, no nemo_toolkit, no megatron.

Tensors are stored in global (tensor-parallel-merged) shapes, cut into chunks; `read(fqn, index)` reads the region
`fqn[index]` (e.g. one layer of a stacked `[layers, ...]` tensor) and only the chunks that overlap it.

`.metadata` is a pickle. torch's own FileSystemReader unpickles it with `pickle.load`, which would run any code an
untrusted checkpoint carries; here it is unpickled with an allow-list of torch.distributed.checkpoint's metadata
classes. Megatron's own planner objects stored beside them (MCoreSavePlan) are replaced by an inert placeholder.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, ChunkStorageMetadata, Metadata
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from templates.ft_python.ft_checkpoint import CheckpointError

METADATA_FILE = ".metadata"

# (module, name) pairs the metadata pickle may name; anything else is refused.
_ALLOWED_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.planner",
    "torch.distributed.checkpoint.filesystem",
)
_ALLOWED_TORCH = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("torch", "strided")}
_MEGATRON_PREFIX = "megatron."


class _Ignored:
    """Stands in for Megatron's planner bookkeeping in the metadata pickle; holds its state, runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module in _ALLOWED_MODULES or (module, name) in _ALLOWED_TORCH:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.startswith(_MEGATRON_PREFIX):
            return type(name, (_Ignored,), {})
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's {METADATA_FILE}")


class _SafeReader(FileSystemReader):
    """FileSystemReader whose metadata is unpickled with the allow-list above."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self.path) / METADATA_FILE
        try:
            with open(path, "rb") as handle:
                metadata = _MetadataUnpickler(handle).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError) as error:
            raise CheckpointError(f"{path}: unreadable distributed-checkpoint metadata: {error}") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path}: holds a {type(metadata).__name__}, not checkpoint Metadata")
        return metadata


class _RegionPlanner(LoadPlanner):
    """Copies each read item into its place in one destination tensor (the requested region)."""

    def __init__(self, destination: torch.Tensor):
        self.destination = destination

    def set_up_planner(self, *args: Any, **kwargs: Any) -> None:
        pass

    def create_local_plan(self) -> LoadPlan:
        raise NotImplementedError  # plans are built directly in DistCheckpoint.read

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        raise CheckpointError(f"{read_item.storage_index.fqn}: expected a tensor, found bytes")

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        view = self.destination
        for dim, (offset, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            view = view.narrow(dim, offset, length)
        return view

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass


class DistCheckpoint:
    """Names, global shapes and region reads of one distributed checkpoint directory."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        if not (self.directory / METADATA_FILE).is_file():
            raise CheckpointError(f"{self.directory} has no {METADATA_FILE}: not a distributed checkpoint")
        self._reader = _SafeReader(self.directory)
        metadata = self._reader.read_metadata()
        self._reader.set_up_storage_reader(metadata, is_coordinator=True)
        self.tensors: dict[str, TensorStorageMetadata] = {}
        self.other: list[str] = []  # non-tensor entries (TransformerEngine `_extra_state` bytes)
        for fqn, entry in metadata.state_dict_metadata.items():
            if isinstance(entry, TensorStorageMetadata):
                self.tensors[fqn] = entry
            elif isinstance(entry, BytesStorageMetadata):
                self.other.append(fqn)
            else:
                raise CheckpointError(f"{self.directory}: entry {fqn!r} is a {type(entry).__name__}")

    def shape(self, fqn: str) -> tuple[int, ...]:
        return tuple(self.tensors[fqn].size)

    def dtype(self, fqn: str) -> torch.dtype:
        return self.tensors[fqn].properties.dtype

    def read(self, fqn: str, leading_index: int | None, out: torch.Tensor) -> torch.Tensor:
        """Fill `out` with `fqn` (or with `fqn[leading_index]` of a stacked tensor) and return it."""
        entry = self.tensors[fqn]
        size = list(entry.size)
        offsets = [0] * len(size)
        if leading_index is not None:
            offsets[0], size[0] = leading_index, 1
        region = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(size))
        items = create_read_items_for_chunk_list(fqn, entry, [region])
        covered = sum(int(torch.Size(item.lengths).numel()) for item in items)
        if covered != torch.Size(size).numel():
            raise CheckpointError(f"{self.directory}: the saved chunks of {fqn} do not cover region "
                                  f"offsets {offsets} sizes {size}")
        destination = out.view(size)
        self._reader.read_data(LoadPlan(items), _RegionPlanner(destination)).wait()
        return out
