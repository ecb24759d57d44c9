"""Lazy access to a NeMo Megatron GPT checkpoint, presented as one tensor-parallel-merged, unstacked state dict.

Input: a directory staged by `nemo_archive.stage` (from a `.nemo` file or an extracted one). Weight layouts:

- legacy `model_weights.ckpt`: one torch.save'd state dict;
- `mp_rank_XX/model_weights.ckpt` (tensor parallel) and `tp_rank_XX_pp_rank_XXX/model_weights.ckpt` (tensor and
  pipeline parallel): one state dict per rank. Each file's pickle is read once with `torch.load(map_location="meta",
  weights_only=True)`; a tensor is read rank by rank with positioned reads straight into its place in the merged
  tensor, from the file or in place inside the .nemo (see `_RankFile`), by Megatron's split rule for its name;
  layers of pipeline stage p are renumbered by the layers of stages < p;
- `model_weights/`: a distributed checkpoint (see nemo_dist.py), global shapes, layers stacked on a leading dimension;
  each layer is read as its own region.

Names stay as NeMo stores them (`model.decoder.layers.3.self_attention.linear_qkv.weight`, or legacy
`model.language_model.encoder.layers.3.self_attention.query_key_value.weight`), with stacked distributed-checkpoint
tensors split into per-layer names. Non-tensor entries (`_extra_state`) are left out. Memory: one merged tensor.
"""

from __future__ import annotations

import io
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Iterator

from templates.ft_python.ft_checkpoint import CheckpointError

from ..lazy import torch
from . import nemo_archive
from .hf import Scratch

if TYPE_CHECKING:
    from .nemo_dist import DistCheckpoint

log = logging.getLogger(__name__)

# Megatron tensor-parallel split rules, by name suffix. Column-parallel layers hold a slice of the output rows
# (dim 0 of the [out, in] weight and of the bias); row-parallel layers a slice of the input columns (dim 1).
COLUMN_PARALLEL = re.compile(
    r".*(word_embeddings\.weight|output_layer\.weight|linear_qkv\.(weight|bias)|query_key_value\.(weight|bias)"
    r"|linear_fc1\.(weight|bias)|dense_h_to_4h(_2)?\.(weight|bias))"
)
ROW_PARALLEL = re.compile(r".*(linear_proj\.weight|linear_fc2\.weight|self_attention\.dense\.weight"
                          r"|dense_4h_to_h\.weight)")
GLU_ACTIVATIONS = ("swiglu", "geglu", "reglu", "fast-swiglu", "fast-geglu", "fast-reglu")
LAYER_NAME = re.compile(r"(.*\.layers\.)(\d+)(\..*)")
RANK_DIR = re.compile(r"(?:mp_rank_(\d+)|tp_rank_(\d+)_pp_rank_(\d+))")


def gated_fc1(name: str, activation: str) -> bool:
    """Whether `name` is a fused gated MLP input [gate; up] (each TP rank then holds its own [gate_r; up_r]):
    Megatron-core's linear_fc1 with any GLU activation, legacy dense_h_to_4h with a fused `fast-*glu` one
    (legacy plain `swiglu` keeps the up projection in dense_h_to_4h_2)."""
    if activation not in GLU_ACTIVATIONS:
        return False
    if re.fullmatch(r".*linear_fc1\.(weight|bias)", name):
        return True
    return activation.startswith("fast-") and bool(re.fullmatch(r".*dense_h_to_4h\.(weight|bias)", name))


@dataclass(frozen=True)
class _Pieces:
    """Where one merged tensor comes from in a rank-sharded checkpoint."""

    files: tuple[Path, ...]  # one per TP rank, in rank order (the stage that holds it)
    local_name: str
    dim: int | None  # concatenation dim; None: replicated, rank 0's copy is used
    gated: bool  # fc1 of a gated MLP: ranks hold [gate_r; up_r]


@dataclass(frozen=True)
class _Region:
    """Where one tensor comes from in a distributed checkpoint."""

    fqn: str
    layer: int | None  # index into a stacked [layers, ...] tensor


class _Window(io.RawIOBase):
    """A read-only file object over bytes [offset, offset + size) of a file (a member inside a .nemo tar)."""

    def __init__(self, handle: BinaryIO, offset: int, size: int):
        self.handle, self.offset, self.size, self.position = handle, offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, position: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = base + position
        return self.position

    def readinto(self, buffer) -> int:  # type: ignore[override]
        count = max(0, min(len(buffer), self.size - self.position))
        got = os.preadv(self.handle.fileno(), [memoryview(buffer)[:count]], self.offset + self.position) if count else 0
        self.position += got
        return got


class _RankFile:
    """One rank's torch.save file: its pickle read once with `torch.load(map_location="meta", weights_only=True)`
    for names, shapes, dtypes and where each storage's bytes lie (torch records the offset of every storage's zip
    entry, stored uncompressed); the bytes are then read with positioned reads straight into their place. The file
    may be a member inside a .nemo (nemo_archive.weights_location): read in place, never copied out. Nothing is
    mapped, so nothing stays resident."""

    def __init__(self, path: Path):
        self.path = path
        self.file, self.base, size = nemo_archive.weights_location(path)
        with open(self.file, "rb", buffering=0) as handle:
            self.state = NemoCheckpoint._open(io.BufferedReader(_Window(handle, self.base, size), 1 << 20),
                                              str(path))
        unplaced = [name for name, tensor in self.state.items()
                    if isinstance(tensor, torch.Tensor) and tensor.untyped_storage()._checkpoint_offset is None]
        if unplaced:
            raise CheckpointError(f"{path}: torch did not locate the data of {unplaced[:3]} in the file (torch "
                                  f"{torch.__version__}); use torch >= 2.5")

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Copy tensor `name` into `out` (same shape and dtype; any strides)."""
        tensor = self.state[name]
        storage = tensor.untyped_storage()
        offset = self.base + storage._checkpoint_offset
        if tensor.is_contiguous() and out.is_contiguous():
            offset += tensor.storage_offset() * tensor.element_size()
            target, whole = out, None
        else:  # a view of a larger storage: read the storage, then take the view
            whole = torch.empty(storage.nbytes(), dtype=torch.uint8)
            target = whole
        buffer = memoryview(target.reshape(-1).view(torch.uint8).numpy())
        if len(buffer):
            with open(self.file, "rb", buffering=0) as handle:
                if os.preadv(handle.fileno(), [buffer], offset) != len(buffer):
                    raise CheckpointError(f"{self.path} is truncated: cannot read {name}")
        if whole is not None:
            out.copy_(whole.view(tensor.dtype).as_strided(tensor.shape, tensor.stride(), tensor.storage_offset()))


class NemoCheckpoint:
    """One staged NeMo checkpoint. `names/shape/dtype` read no weights; `load` reads one merged tensor."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.origin = nemo_archive.origin_of(self.path)
        config_path = self.path / nemo_archive.CONFIG_NAME
        if not config_path.is_file():
            raise CheckpointError(f"{self.origin}: no {nemo_archive.CONFIG_NAME}")
        self.config: dict = nemo_archive.read_config(config_path.read_text(), Path(self.origin))
        if self.config.get("virtual_pipeline_model_parallel_size"):
            raise CheckpointError(f"{self.origin}: interleaved (virtual) pipeline checkpoints are not supported")
        self.activation = str(self.config.get("activation", "gelu"))
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._sources: dict[str, _Pieces | _Region] = {}
        self.dist: DistCheckpoint | None = None
        if (self.path / nemo_archive.DIST_WEIGHTS).is_dir():
            self.layout = "distributed"
            self._index_dist(self.path / nemo_archive.DIST_WEIGHTS)
        else:
            self._index_shards()

    # -- discovery -------------------------------------------------------------------------------------------
    def _rank_files(self) -> dict[tuple[int, int], Path]:
        """{(tp_rank, pp_rank): file}, checked to be a complete grid."""
        single = self.path / nemo_archive.LEGACY_WEIGHTS
        if nemo_archive.weights_exist(single):
            self.layout = "legacy"
            return {(0, 0): single}
        files: dict[tuple[int, int], Path] = {}
        for entry in sorted(self.path.iterdir()):
            match = RANK_DIR.fullmatch(entry.name)
            if not match:
                continue
            tp, pp = (int(match.group(1)), 0) if match.group(1) is not None else (int(match.group(2)), int(match.group(3)))
            file = entry / nemo_archive.LEGACY_WEIGHTS
            if not nemo_archive.weights_exist(file):
                raise CheckpointError(f"{self.origin}: {entry.name}/ has no {nemo_archive.LEGACY_WEIGHTS}")
            files[(tp, pp)] = file
        if not files:
            raise CheckpointError(f"{self.origin}: no weights found")
        self.layout = "rank-sharded"
        tps = 1 + max(tp for tp, _ in files)
        pps = 1 + max(pp for _, pp in files)
        missing = [f"tp {tp} pp {pp}" for tp in range(tps) for pp in range(pps) if (tp, pp) not in files]
        if missing:
            raise CheckpointError(f"{self.origin}: rank directories missing for {missing}")
        return files

    def _index_shards(self) -> None:
        files = self._rank_files()
        self.tensor_parallel = 1 + max(tp for tp, _ in files)
        self.pipeline_parallel = 1 + max(pp for _, pp in files)
        for key, expected in (("tensor_model_parallel_size", self.tensor_parallel),
                              ("pipeline_model_parallel_size", self.pipeline_parallel)):
            stated = self.config.get(key, 1) or 1
            if stated != expected:
                raise CheckpointError(f"{self.origin}: model_config.yaml {key} is {stated} but the checkpoint has "
                                      f"{expected} rank(s)")
        layer_offset = 0
        self._files = {file: _RankFile(file) for file in files.values()}
        for stage in range(self.pipeline_parallel):
            states = [self._files[files[(tp, stage)]].state for tp in range(self.tensor_parallel)]
            stage_layers = 0
            for local_name, tensor in states[0].items():
                if not isinstance(tensor, torch.Tensor):
                    continue  # _extra_state: None
                name = local_name
                match = LAYER_NAME.fullmatch(local_name)
                if match:
                    local_layer = int(match.group(2))
                    stage_layers = max(stage_layers, local_layer + 1)
                    name = f"{match.group(1)}{layer_offset + local_layer}{match.group(3)}"
                if name in self._sources:
                    raise CheckpointError(f"{self.origin}: tensor {name!r} appears in more than one pipeline stage")
                self._add_pieces(name, local_name, states, [files[(tp, stage)] for tp in range(self.tensor_parallel)])
            log.info("pipeline stage %d of %s: %d layers from global layer %d", stage, self.origin, stage_layers,
                     layer_offset)
            layer_offset += stage_layers
            del states

    def _add_pieces(self, name: str, local_name: str, states: list[dict], files: list[Path]) -> None:
        shapes = []
        for rank, state in enumerate(states):
            tensor = state.get(local_name)
            if not isinstance(tensor, torch.Tensor):
                raise CheckpointError(f"{self.origin}: tensor-parallel rank {rank} lacks {local_name!r}")
            shapes.append(tuple(tensor.shape))
        dim = None
        if len(states) > 1:
            if COLUMN_PARALLEL.fullmatch(name):
                dim = 0
            elif ROW_PARALLEL.fullmatch(name):
                dim = 1
        if dim is None:
            if len(set(shapes)) != 1:
                raise CheckpointError(f"{self.origin}: {local_name} is not split across ranks but its shapes differ: "
                                      f"{shapes}")
            shape = shapes[0]
        else:
            other = {s[:dim] + s[dim + 1:] for s in shapes}
            if len(other) != 1:
                raise CheckpointError(f"{self.origin}: {local_name} rank pieces do not line up on dim {dim}: {shapes}")
            shape = list(shapes[0])
            shape[dim] = sum(s[dim] for s in shapes)
            shape = tuple(shape)
        gated = dim == 0 and gated_fc1(name, self.activation)
        if gated and any(s[0] % 2 for s in shapes):
            raise CheckpointError(f"{self.origin}: gated MLP input {local_name} has an odd row count: {shapes}")
        self._shapes[name] = shape
        self._dtypes[name] = states[0][local_name].dtype
        self._sources[name] = _Pieces(tuple(files), local_name, dim, gated)

    def _index_dist(self, directory: Path) -> None:
        from .nemo_dist import DistCheckpoint  # torch.distributed.checkpoint takes ~1.5 s to import: only if needed

        self.dist = DistCheckpoint(directory)
        self.tensor_parallel = self.pipeline_parallel = 1  # stored merged: global shapes
        num_layers = self.config.get("num_layers")
        for fqn, entry in self.dist.tensors.items():
            shape = tuple(entry.size)
            match = re.fullmatch(r"(.*\.layers)\.(?!\d+\.)(.*)", fqn)
            if match:
                if num_layers is not None and shape[0] != num_layers:
                    raise CheckpointError(f"{self.origin}: stacked {fqn} has {shape[0]} layers, model_config.yaml "
                                          f"num_layers is {num_layers}")
                for layer in range(shape[0]):
                    name = f"{match.group(1)}.{layer}.{match.group(2)}"
                    self._shapes[name] = shape[1:]
                    self._dtypes[name] = entry.properties.dtype
                    self._sources[name] = _Region(fqn, layer)
            else:
                self._shapes[fqn] = shape
                self._dtypes[fqn] = entry.properties.dtype
                self._sources[fqn] = _Region(fqn, None)

    @staticmethod
    def _open(file: BinaryIO, name: str) -> dict:
        # map_location="meta": no tensor data is read; weights_only=True: no code from the pickle.
        try:
            state = torch.load(file, map_location="meta", weights_only=True)
        except Exception as error:  # torch raises RuntimeError/UnpicklingError/...; name the file either way
            raise CheckpointError(f"cannot load {name} with torch.load(weights_only=True): {error}") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise CheckpointError(f"{name} does not hold a state dict")
        return state

    # -- access ----------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._sources)

    def _known(self, name: str) -> None:
        if name not in self._sources:
            raise CheckpointError(f"tensor {name!r} is not in checkpoint {self.origin}")

    def shape(self, name: str) -> tuple[int, ...]:
        self._known(name)
        return self._shapes[name]

    def dtype(self, name: str) -> torch.dtype:
        self._known(name)
        return self._dtypes[name]

    def load(self, name: str, scratch: Scratch | None = None) -> torch.Tensor:
        """One merged tensor in memory (with `scratch`: valid until the scratch buffer's next use)."""
        self._known(name)
        shape, dtype = self._shapes[name], self._dtypes[name]
        numel = torch.Size(shape).numel()
        out = (scratch.take(numel * dtype.itemsize).view(dtype) if scratch is not None
               else torch.empty(numel, dtype=dtype)).view(shape)
        source = self._sources[name]
        if isinstance(source, _Region):
            assert self.dist is not None
            return self.dist.read(source.fqn, source.layer, out)
        return self._merge(name, source, out)

    def _merge(self, name: str, source: _Pieces, out: torch.Tensor) -> torch.Tensor:
        """Copy each rank's piece into its place in `out`."""
        files = source.files if source.dim is not None else source.files[:1]
        offset = 0
        for file in files:
            rank_file = self._files[file]
            shape = rank_file.state[source.local_name].shape
            if source.dim is None:
                rank_file.read_into(source.local_name, out)
            elif source.gated:
                # [gate_r; up_r] -> gate_r into the gate half, up_r into the up half: [gate_0 .. ; up_0 ..]
                half, total = shape[0] // 2, out.shape[0] // 2
                piece = torch.empty(shape, dtype=out.dtype)
                rank_file.read_into(source.local_name, piece)
                out.narrow(0, offset, half).copy_(piece[:half])
                out.narrow(0, total + offset, half).copy_(piece[half:])
                offset += half
            else:
                width = shape[source.dim]
                rank_file.read_into(source.local_name, out.narrow(source.dim, offset, width))
                offset += width
        return out

    def tokenizer_files(self) -> Iterator[Path]:
        for staged in nemo_archive.TOKENIZER_KEYS.values():
            candidate = self.path / staged
            if candidate.is_file():
                yield candidate
