"""Write a plan of FT tensors as `<tp>-gpu/*.bin`, and `config.ini` (convert.py does so inside an AtomicDirectory).

A failed or interrupted run leaves only a hidden `.<tp>-gpu.partial-*` directory (removed on the way out when the
process survives; reclaimed by the next run once its writer is gone, exporter/atomic.py), never something that
looks like a finished export.
"""

from __future__ import annotations

import logging
import multiprocessing
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Callable, Sequence

import torch

from templates.ft_python.ft_checkpoint import TORCH_DTYPES, FTConfig

from ..arch.base import Architecture, Plan, TensorSpec
from ..parallel import ParallelLayout
from ..progress import Progress
from ..readers.hf import Scratch
from .sharding import file_names, split_tensor

log = logging.getLogger(__name__)


def write_config(config: FTConfig, out_dir: Path) -> None:
    """`<out_dir>/config.ini`: every key FT's loaders (GPT, GPT-J, GPT-NeoX, and its Triton backend) read, plus this
    project's keys for what FT has no key for (exporter/arch/layout.md)."""
    (Path(out_dir) / "config.ini").write_text(config.to_ini())


CHUNK_BYTES = 16 << 20  # converted output is cast in chunks of about this size
# ... and handed to the kernel in write() calls of at most this many bytes. One 16 MB write per chunk made the
# writer thread of a GPT-2-medium conversion spend 1.24-1.40 s writing its 0.7 GB where 1 MB writes spent
# 0.58-0.75 s (4 runs each, alternating; 10 alternating whole conversions: 1.45 against 2.18 s, median), perhaps
# because the page cache takes larger folios for larger writes on this kernel (not verified). That was where `cp`
# is fast (0.6-0.7 s for 1.4 GB); where it is slow (2-2.7 s) GPT-2 showed no difference and OPT-350m 3-12 % more
# with 1 MB writes (3.90 against 3.48 s, 3.95 against 3.80), still within 2x `cp` there.
WRITE_BYTES = 1 << 20


def write_tensor(tensor: torch.Tensor, path: Path, append: bool = False) -> None:
    """Raw row-major little-endian bytes, nothing else (FT's loadWeightFromBin reads exactly this)."""
    data = memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy())
    with open(path, "ab" if append else "wb", buffering=0) as handle:
        for start in range(0, len(data), WRITE_BYTES):
            piece = data[start : start + WRITE_BYTES]
            written = handle.write(piece)
            while written < len(piece):  # a raw file may write less than asked (a signal, a nearly full disk)
                written += handle.write(piece[written:])


class _ChunkWriter:
    """Casts pieces into two alternating reused buffers and writes each on a background thread, so reading and
    converting the next chunk overlaps the write of the previous one. Memory: two chunks, whatever the model."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.buffers = [torch.empty(0, dtype=dtype), torch.empty(0, dtype=dtype)]
        self.turn = 0
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.pending: Future | None = None

    def write(self, piece: torch.Tensor, path: Path) -> int:
        """Append `piece` (any strides, any dtype) to `path` as contiguous `dtype`, in row chunks."""
        if piece.dim() == 2 and piece.dtype != self.dtype and piece.stride(0) == 1 and piece.stride(1) > 1:
            # (A slice of) a transposed nn.Linear weight: cast in its own row-major layout first, then gather the
            # transpose in the narrower type (~3.5x faster than a strided cast; one extra copy of the piece).
            piece = piece.t().to(self.dtype).t()
        rows = piece.shape[0] if piece.dim() else 1
        row_bytes = max(1, piece.numel() // max(rows, 1)) * self.dtype.itemsize
        step = max(1, CHUNK_BYTES // row_bytes)
        flat = piece.reshape(1) if piece.dim() == 0 else piece
        for start in range(0, max(rows, 1), step):
            chunk = flat[start : start + step]
            buffer = self._buffer(chunk.numel())
            out = buffer[: chunk.numel()].view(chunk.shape)
            out.copy_(chunk)  # cast + gather of a strided split in one pass
            self.wait()
            self.pending = self.pool.submit(write_tensor, out, path, start > 0)
        return piece.numel() * self.dtype.itemsize

    def _buffer(self, numel: int) -> torch.Tensor:
        self.turn ^= 1
        if self.buffers[self.turn].numel() < numel:
            self.buffers[self.turn] = torch.empty(numel, dtype=self.dtype)
        return self.buffers[self.turn]

    def wait(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()  # re-raises a write error

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.pool.shutdown()


def _source_bytes(spec: TensorSpec) -> int:
    """Bytes of the full FT tensor of `spec` in fp32 (what a load holds, about)."""
    numel = 1
    for dim in spec.shape:
        numel *= dim
    return numel * 4


def write_specs(
    arch: Architecture, specs: Sequence[TensorSpec], out_dir: Path, layout: ParallelLayout, weight_data_type: str,
    on_written: Callable[[TensorSpec, int], None] | None = None,
) -> int:
    """Load, split, convert and write each spec in turn; returns bytes written (`on_written(spec, bytes)` after
    each one).

    Three stages overlap: a reader thread loads (reads, fuses, folds) the next spec while this thread casts the
    current one into output chunks and the writer thread writes the previous chunk. Memory: the current source
    tensor; the next one, loaded ahead only when it is at most a quarter of the largest (two such buffers
    alternate); two output chunks: below 1.5x the largest tensor plus the chunks. A scratch buffer is reused as
    soon as `writer.write` returns: the writer thread only reads its own output buffers.
    """
    writer = _ChunkWriter(TORCH_DTYPES[weight_data_type])
    scratch, ahead = Scratch(), (Scratch(), Scratch())
    limit = max((_source_bytes(spec) for spec in specs), default=0) // 4
    reader = ThreadPoolExecutor(max_workers=1)
    written = 0
    try:
        loaded: Future | None = None
        for index, spec in enumerate(specs):
            tensor = loaded.result() if loaded is not None else arch.load(spec, scratch)
            following = index + 1
            # Loaded ahead into the buffer the current tensor is not in (ahead[index % 2] may hold it).
            loaded = (reader.submit(arch.load, specs[following], ahead[following % 2])
                      if following < len(specs) and _source_bytes(specs[following]) <= limit else None)
            nbytes = 0
            for piece, name in zip(
                split_tensor(tensor, spec.split, layout.tensor_parallel, spec.sections),
                file_names(spec.ft_name, spec.split, layout.tensor_parallel),
            ):
                nbytes += writer.write(piece, out_dir / name)
            written += nbytes
            if on_written is not None:
                on_written(spec, nbytes)
    finally:
        reader.shutdown(wait=True)
        writer.close()
    return written


# Worker processes re-open the checkpoint themselves (memory maps and file handles are not shared).
_worker_arch: Architecture | None = None


def _worker_init(make_arch: Callable[[], Architecture]) -> None:
    global _worker_arch
    torch.set_num_threads(1)
    _worker_arch = make_arch()


def _worker_write(specs: list[TensorSpec], out_dir: Path, layout: ParallelLayout, weight_data_type: str) -> int:
    assert _worker_arch is not None
    return write_specs(_worker_arch, specs, out_dir, layout, weight_data_type)


def _unit_name(layer: int | None, num_layers: int) -> str:
    return "embeddings and final layernorm" if layer is None else f"layer {layer + 1}/{num_layers}"


def write_plan(
    arch: Architecture,
    make_arch: Callable[[], Architecture],
    plan: Plan,
    out_dir: Path,
    layout: ParallelLayout,
    weight_data_type: str,
    processes: int = 1,
    total_bytes: int | None = None,
) -> int:
    """Write every tensor of `plan` into `out_dir`, `processes` workers in parallel; worker errors propagate.

    Progress (exporter/progress.py) counts bytes written when `total_bytes` is given, else layers."""
    units = plan.by_layer()
    total = 0
    num_layers = plan.params.num_layer
    description = "writing FT shards"
    progress = Progress(total_bytes, description, unit="B") if total_bytes else Progress(len(units), description,
                                                                                         unit="layer")

    def report(layer: int | None, nbytes: int) -> None:
        log.debug("wrote %s (%.1f MB)", _unit_name(layer, num_layers), nbytes / 1e6)
        progress.update(nbytes if total_bytes else 1)

    with progress:
        if processes <= 1:
            # One pass over every spec, unit after unit, so loading ahead crosses layer boundaries.
            ordered = [spec for specs in units.values() for spec in specs]
            last = {id(specs[-1]): layer for layer, specs in units.items()}
            unit_bytes = 0

            def written_one(spec: TensorSpec, nbytes: int) -> None:
                nonlocal unit_bytes
                unit_bytes += nbytes
                if total_bytes:
                    progress.update(nbytes)
                if id(spec) in last:
                    log.debug("wrote %s (%.1f MB)", _unit_name(last[id(spec)], num_layers), unit_bytes / 1e6)
                    if not total_bytes:
                        progress.update(1)
                    unit_bytes = 0

            return write_specs(arch, ordered, out_dir, layout, weight_data_type, written_one)

        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(processes, mp_context=context, initializer=_worker_init,
                                 initargs=(make_arch,)) as pool:
            futures = {
                pool.submit(_worker_write, specs, out_dir, layout, weight_data_type): layer
                for layer, specs in units.items()
            }
            try:
                for future in as_completed(futures):
                    written = future.result()  # re-raises a worker's exception here
                    total += written
                    report(futures[future], written)
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
    return total
