"""Write a plan of FT tensors as `<tp>-gpu/*.bin` + `config.ini` (convert.py does so inside an AtomicDirectory).

A failed or interrupted run leaves only a hidden `.<tp>-gpu.partial-*` directory (removed on the way out when the
process survives), never something that looks like a finished export.
"""

from __future__ import annotations

import configparser
import logging
import multiprocessing
import time
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..arch.base import Architecture, ModelParams, Plan, TensorSpec
from ..readers.hf import Scratch
from .sharding import file_names, split_tensor
from .verify import TORCH_DTYPES

log = logging.getLogger(__name__)


def config_ini(
    params: ModelParams, section: str, tensor_parallel: int, weight_data_type: str, pipeline_parallel: int = 1
) -> configparser.ConfigParser:
    """Every key FT's loaders (GPT, GPT-J, GPT-NeoX, and its Triton backend) read from config.ini, plus this
    project's keys for what FT has no key for (exporter/arch/layout.md)."""

    def flag(value: bool) -> str:
        return "1" if value else "0"

    config = configparser.ConfigParser()
    config[section] = {
        "model_name": params.model_name,
        "head_num": str(params.head_num),
        "size_per_head": str(params.size_per_head),
        "inter_size": str(params.inter_size),
        "num_layer": str(params.num_layer),
        "max_pos_seq_len": str(params.max_pos_seq_len),
        "vocab_size": str(params.vocab_size),
        "start_id": str(params.start_id),
        "end_id": str(params.end_id),
        "weight_data_type": weight_data_type,
        "tensor_para_size": str(tensor_parallel),
        "pipeline_para_size": str(pipeline_parallel),
        "layernorm_eps": repr(float(params.layernorm_eps)),
        "layernorm_type": params.layernorm_type,
        "activation_type": params.activation_type,
        "gelu_approximation": params.gelu_approximation,
        "has_positional_encoding": flag(params.has_positional_encoding),
        "has_pre_decoder_layernorm": "0",
        "has_post_decoder_layernorm": flag(params.has_post_decoder_layernorm),
        "has_adapters": "0",
        "adapter_inter_size": "0",
        "use_attention_linear_bias": "0",
        "int8_mode": "0",
        "rotary_embedding": str(params.rotary_embedding),
        "rotary_style": params.rotary_style,
        "rope_theta": repr(float(params.rope_theta)),
        "use_gptj_residual": flag(params.use_gptj_residual),
        "kv_head_num": str(params.kv_heads),
        "norm_type": params.norm_type,
        "attention_bias": flag(params.attention_bias),
        "mlp_bias": flag(params.mlp_bias),
        "lm_head_bias": flag(params.lm_head_bias),
    }
    # FT's loader also looks up the mixture-of-experts structure; a dense model has none.
    config["structure"] = {"gpt_with_moe": "0", "expert_num": "0", "moe_layers": "[]"}
    return config


CHUNK_BYTES = 16 << 20  # converted output is written in pieces of about this size


def write_tensor(tensor: torch.Tensor, path: Path, append: bool = False) -> None:
    """Raw row-major little-endian bytes, nothing else (FT's loadWeightFromBin reads exactly this)."""
    with open(path, "ab" if append else "wb", buffering=0) as handle:
        handle.write(memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy()))


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


def write_specs(
    arch: Architecture, specs: Sequence[TensorSpec], out_dir: Path, tensor_parallel: int, weight_data_type: str
) -> int:
    """Load, split, convert and write each spec in turn; returns bytes written.

    Memory: one source tensor (read into a reused buffer) plus two output chunks. The scratch buffer may be
    reused as soon as `writer.write` returns: the writer thread only reads its own output buffers.
    """
    writer = _ChunkWriter(TORCH_DTYPES[weight_data_type])
    scratch = Scratch()
    written = 0
    try:
        for spec in specs:
            tensor = arch.load(spec, scratch)
            for piece, name in zip(
                split_tensor(tensor, spec.split, tensor_parallel, spec.sections),
                file_names(spec.ft_name, spec.split, tensor_parallel),
            ):
                written += writer.write(piece, out_dir / name)
    finally:
        writer.close()
    return written


# Worker processes re-open the checkpoint themselves (memory maps and file handles are not shared).
_worker_arch: Architecture | None = None


def _worker_init(make_arch: Callable[[], Architecture]) -> None:
    global _worker_arch
    torch.set_num_threads(1)
    _worker_arch = make_arch()


def _worker_write(specs: list[TensorSpec], out_dir: Path, tensor_parallel: int, weight_data_type: str) -> int:
    assert _worker_arch is not None
    return write_specs(_worker_arch, specs, out_dir, tensor_parallel, weight_data_type)


def _unit_name(layer: int | None, num_layers: int) -> str:
    return "embeddings and final layernorm" if layer is None else f"layer {layer + 1}/{num_layers}"


def write_plan(
    arch: Architecture,
    make_arch: Callable[[], Architecture],
    plan: Plan,
    out_dir: Path,
    tensor_parallel: int,
    weight_data_type: str,
    processes: int = 1,
) -> int:
    """Write every tensor of `plan` into `out_dir`, `processes` workers in parallel; worker errors propagate."""
    units = plan.by_layer()
    started = time.monotonic()
    total = 0
    num_layers = plan.params.num_layer

    def report(layer: int | None, done: int) -> None:
        elapsed = time.monotonic() - started
        log.info(
            "wrote %s (%d/%d units, %.1f MB so far, %.1fs)",
            _unit_name(layer, num_layers),
            done,
            len(units),
            total / 1e6,
            elapsed,
        )

    if processes <= 1:
        for done, (layer, specs) in enumerate(units.items(), start=1):
            total += write_specs(arch, specs, out_dir, tensor_parallel, weight_data_type)
            report(layer, done)
        return total

    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(processes, mp_context=context, initializer=_worker_init, initargs=(make_arch,)) as pool:
        futures = {
            pool.submit(_worker_write, specs, out_dir, tensor_parallel, weight_data_type): layer
            for layer, specs in units.items()
        }
        try:
            for done, future in enumerate(as_completed(futures), start=1):
                total += future.result()  # re-raises a worker's exception here
                report(futures[future], done)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return total
