"""The parallel layout, described once, and the pure functions that split full FT tensors per tensor-parallel rank.

FT file naming: a replicated tensor is `<name>.bin`; a split tensor is `<name>.<rank>.bin`. The pipeline stage rule
lives in the serving runtime (`templates/ft_python/ft_checkpoint.py:stage_layers`) so both sides use the same one.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from templates.ft_python.ft_checkpoint import CheckpointError, first_kv_head, qkv_rank_heads, stage_layers


class ShardingError(ValueError):
    """The model cannot be laid out for the requested parallelism."""


class Split(enum.Enum):
    REPLICATED = "replicated"  # every rank reads the same file
    COLUMN = "column"  # last dim split: [in, out] -> [in, out/tp]; also [h, 3, h] -> [h, 3, h/tp], bias [3, h]
    ROW = "row"  # first dim split: [in, out] -> [in/tp, out]
    # Last dim = q | k | v blocks (grouped-query attention: fewer kv heads): a rank gets [q_r | k_r | v_r], its q
    # heads and the kv heads they read (split whole, or one replicated kv head when tp > kv heads).
    # [h, (n_q + 2 n_kv) d] -> [h, (n_q/tp + 2 n_kv_r) d]; bias likewise. See qkv_rank_heads.
    QKV = "qkv"


@dataclass(frozen=True)
class ParallelLayout:
    """Tensor and pipeline parallel sizes for `num_layers` transformer layers."""

    tensor_parallel: int
    pipeline_parallel: int
    num_layers: int

    def check(self, head_num: int, kv_head_num: int | None = None, inter_size: int | None = None) -> None:
        """Every divisibility FT and the runtime need; raises naming the first that fails (nothing written yet)."""
        tp, pp = self.tensor_parallel, self.pipeline_parallel
        if tp < 1 or pp < 1:
            raise ShardingError("tensor and pipeline parallel sizes must be >= 1")
        if head_num % tp:
            raise ShardingError(f"head_num {head_num} is not divisible by tensor_para_size {tp}")
        if kv_head_num is not None and kv_head_num % tp and tp % kv_head_num:
            raise ShardingError(
                f"kv_head_num {kv_head_num} and tensor_para_size {tp}: one must divide the other (each rank must "
                f"hold whole key/value heads, split or replicated)"
            )
        if inter_size is not None and inter_size % tp:
            raise ShardingError(f"inter_size {inter_size} is not divisible by tensor_para_size {tp}")
        if pp > self.num_layers:
            raise ShardingError(f"pipeline_para_size {pp} exceeds the model's {self.num_layers} layers")
        empty = [stage for stage in range(pp) if not len(self.stage_layers(stage))]
        if empty:
            sizes = [len(self.stage_layers(stage)) for stage in range(pp)]
            raise ShardingError(
                f"pipeline_para_size {pp} with {self.num_layers} layers: FT's rule (ceil(layers / pp) per stage) "
                f"gives stages of {sizes} layers, leaving stage(s) {empty} empty; choose a pp that divides better"
            )

    def stage_layers(self, stage: int) -> range:
        """Global layer indices run by pipeline stage `stage`, by FT's C++ rule (ceil(layers / pp) per stage)."""
        return stage_layers(self.num_layers, self.pipeline_parallel, stage)


def _qkv_heads(sections: tuple[int, ...], tensor_parallel: int, name: str) -> tuple[int, int, int, int, int]:
    """(heads, kv heads, head dim, q heads per rank, kv heads per rank) of a Split.QKV tensor."""
    heads, kv_heads, head_dim = sections
    try:
        q_rank, kv_rank = qkv_rank_heads(heads, kv_heads, tensor_parallel)
    except CheckpointError as error:
        raise ShardingError(f"{name}: {error}") from None
    return heads, kv_heads, head_dim, q_rank, kv_rank


def rank_shape(
    shape: tuple[int, ...], split: Split, tensor_parallel: int, name: str = "tensor", sections: tuple[int, ...] = ()
) -> tuple[int, ...]:
    """Shape of one rank's piece; raises ShardingError naming the tensor when the split dim does not divide.

    Split.QKV: `sections` = (heads, kv heads, head dim) of the [..., (heads + 2 kv heads) * head dim] tensor."""
    if split is Split.REPLICATED:
        return shape
    if split is Split.QKV:
        heads, kv_heads, head_dim, q_rank, kv_rank = _qkv_heads(sections, tensor_parallel, name)
        if shape[-1] != (heads + 2 * kv_heads) * head_dim:
            raise ShardingError(f"{name}: shape {list(shape)} is not q|k|v of {heads} + 2 x {kv_heads} heads of "
                                f"{head_dim}")
        return (*shape[:-1], (q_rank + 2 * kv_rank) * head_dim)
    dim = 0 if split is Split.ROW else -1
    size = shape[dim]
    if size % tensor_parallel:
        raise ShardingError(
            f"{name}: dimension {dim} of shape {list(shape)} is not divisible by tensor_para_size {tensor_parallel}"
        )
    out = list(shape)
    out[dim] = size // tensor_parallel
    return tuple(out)


def split_tensor(
    tensor: torch.Tensor, split: Split, tensor_parallel: int, sections: tuple[int, ...] = ()
) -> list[torch.Tensor]:
    """One piece per rank (views, except QKV pieces which are concatenated copies)."""
    if split is Split.REPLICATED:
        return [tensor]
    if split is Split.QKV:
        heads, kv_heads, d, q_rank, kv_rank = _qkv_heads(sections, tensor_parallel, "qkv")
        transposed = tensor.dim() == 2 and not tensor.is_contiguous() and tensor.t().is_contiguous()
        # A transposed nn.Linear [out, in]: cut contiguous row blocks there and hand back transposed views (the
        # writer's cast does the one strided copy) instead of gathering columns twice.
        source = tensor.t() if transposed else tensor.movedim(-1, 0)
        q, k, v = torch.split(source, [heads * d, kv_heads * d, kv_heads * d], dim=0)
        pieces = []
        for rank in range(tensor_parallel):
            kv_start = first_kv_head(kv_heads, tensor_parallel, rank) * d
            rows = (q[rank * q_rank * d:(rank + 1) * q_rank * d], k[kv_start:kv_start + kv_rank * d],
                    v[kv_start:kv_start + kv_rank * d])
            piece = torch.cat(rows, dim=0)
            pieces.append(piece.t() if transposed else piece.movedim(0, -1))
        return pieces
    dim = -1 if split is Split.COLUMN else 0
    return list(torch.chunk(tensor, tensor_parallel, dim=dim))


def file_names(ft_name: str, split: Split, tensor_parallel: int) -> list[str]:
    if split is Split.REPLICATED:
        return [f"{ft_name}.bin"]
    return [f"{ft_name}.{rank}.bin" for rank in range(tensor_parallel)]
