"""The parallel layout, described once, and the pure functions that split full FT tensors per tensor-parallel rank.

FT file naming: a replicated tensor is `<name>.bin`; a split tensor is `<name>.<rank>.bin`. The pipeline stage rule
lives in the serving runtime (`templates/ft_python/ft_checkpoint.py:stage_layers`) so both sides use the same one.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from templates.ft_python.ft_checkpoint import stage_layers


class ShardingError(ValueError):
    """The model cannot be laid out for the requested parallelism."""


class Split(enum.Enum):
    REPLICATED = "replicated"  # every rank reads the same file
    COLUMN = "column"  # last dim split: [in, out] -> [in, out/tp]; also [h, 3, h] -> [h, 3, h/tp], bias [3, h]
    ROW = "row"  # first dim split: [in, out] -> [in/tp, out]
    # Last dim = q | k | v blocks of different sizes (grouped-query attention): each block column split, a rank
    # gets [q_r | k_r | v_r]. [h, q + 2kv] -> [h, (q + 2kv)/tp]; bias [q + 2kv] -> [(q + 2kv)/tp].
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
        if kv_head_num is not None and kv_head_num % tp:
            raise ShardingError(
                f"kv_head_num {kv_head_num} is not divisible by tensor_para_size {tp}: each rank must own whole "
                f"key/value head groups"
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


def rank_shape(
    shape: tuple[int, ...], split: Split, tensor_parallel: int, name: str = "tensor", sections: tuple[int, ...] = ()
) -> tuple[int, ...]:
    """Shape of one rank's piece; raises ShardingError naming the tensor when the split dim does not divide."""
    if split is Split.REPLICATED:
        return shape
    dim = 0 if split is Split.ROW else -1
    parts = sections if split is Split.QKV else (shape[dim],)
    if split is Split.QKV and sum(sections) != shape[-1]:
        raise ShardingError(f"{name}: q|k|v sections {list(sections)} do not add up to shape {list(shape)}")
    for part in parts:
        if part % tensor_parallel:
            raise ShardingError(
                f"{name}: dimension {dim} of shape {list(shape)} is not divisible by tensor_para_size {tensor_parallel}"
            )
    out = list(shape)
    out[dim] = shape[dim] // tensor_parallel
    return tuple(out)


def split_tensor(
    tensor: torch.Tensor, split: Split, tensor_parallel: int, sections: tuple[int, ...] = ()
) -> list[torch.Tensor]:
    """One piece per rank (views, except QKV pieces which are concatenated copies)."""
    if split is Split.REPLICATED:
        return [tensor]
    if split is Split.QKV:
        if tensor.dim() == 2 and not tensor.is_contiguous() and tensor.t().is_contiguous():
            # A transposed nn.Linear [out, in]: cut contiguous row blocks there and hand back transposed views (the
            # writer's cast does the one strided copy) instead of gathering columns twice.
            rows = [torch.chunk(block, tensor_parallel, dim=0) for block in torch.split(tensor.t(), list(sections), 0)]
            return [torch.cat([block[rank] for block in rows], dim=0).t() for rank in range(tensor_parallel)]
        blocks = [torch.chunk(block, tensor_parallel, dim=-1) for block in torch.split(tensor, list(sections), -1)]
        return [torch.cat([block[rank] for block in blocks], dim=-1) for rank in range(tensor_parallel)]
    dim = -1 if split is Split.COLUMN else 0
    return list(torch.chunk(tensor, tensor_parallel, dim=dim))


def file_names(ft_name: str, split: Split, tensor_parallel: int) -> list[str]:
    if split is Split.REPLICATED:
        return [f"{ft_name}.bin"]
    return [f"{ft_name}.{rank}.bin" for rank in range(tensor_parallel)]
