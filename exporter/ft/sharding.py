"""The parallel layout, described once, and the pure functions that split full FT tensors per tensor-parallel rank.

FT file naming: a replicated tensor is `<name>.bin`; a split tensor is `<name>.<rank>.bin`.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch


class ShardingError(ValueError):
    """The model cannot be laid out for the requested parallelism."""


class Split(enum.Enum):
    REPLICATED = "replicated"  # every rank reads the same file
    COLUMN = "column"  # last dim split: [in, out] -> [in, out/tp]; also [h, 3, h] -> [h, 3, h/tp], bias [3, h]
    ROW = "row"  # first dim split: [in, out] -> [in/tp, out]


@dataclass(frozen=True)
class ParallelLayout:
    """Tensor and pipeline parallel sizes for `num_layers` transformer layers."""

    tensor_parallel: int
    pipeline_parallel: int
    num_layers: int

    def check(self, head_num: int) -> None:
        if self.tensor_parallel < 1 or self.pipeline_parallel < 1:
            raise ShardingError("tensor and pipeline parallel sizes must be >= 1")
        if head_num % self.tensor_parallel:
            raise ShardingError(
                f"head_num {head_num} is not divisible by tensor_para_size {self.tensor_parallel}"
            )
        if self.pipeline_parallel > self.num_layers:
            raise ShardingError(
                f"pipeline_para_size {self.pipeline_parallel} exceeds the model's {self.num_layers} layers"
            )

    def stage_layers(self, stage: int) -> range:
        """Global layer indices run by pipeline stage `stage`, by FT's C++ rule (ceil(layers / pp) per stage)."""
        per_stage = math.ceil(self.num_layers / self.pipeline_parallel)
        return range(per_stage * stage, min(per_stage * (stage + 1), self.num_layers))


def rank_shape(shape: tuple[int, ...], split: Split, tensor_parallel: int, name: str = "tensor") -> tuple[int, ...]:
    """Shape of one rank's piece; raises ShardingError naming the tensor when the split dim does not divide."""
    if split is Split.REPLICATED:
        return shape
    dim = -1 if split is Split.COLUMN else 0
    size = shape[dim]
    if size % tensor_parallel:
        raise ShardingError(
            f"{name}: dimension {dim} of shape {list(shape)} is not divisible by tensor_para_size {tensor_parallel}"
        )
    out = list(shape)
    out[dim] = size // tensor_parallel
    return tuple(out)


def split_tensor(tensor: torch.Tensor, split: Split, tensor_parallel: int) -> list[torch.Tensor]:
    """One piece per rank (views; the writer makes each contiguous as it writes it)."""
    if split is Split.REPLICATED:
        return [tensor]
    dim = -1 if split is Split.COLUMN else 0
    return list(torch.chunk(tensor, tensor_parallel, dim=dim))


def file_names(ft_name: str, split: Split, tensor_parallel: int) -> list[str]:
    if split is Split.REPLICATED:
        return [f"{ft_name}.bin"]
    return [f"{ft_name}.{rank}.bin" for rank in range(tensor_parallel)]
