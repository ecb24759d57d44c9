"""STUB for the lead's branch only (replaced by the lower-layers branch at merge)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelLayout:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    num_layers: int | None = None

    @property
    def shard_dir_name(self) -> str:
        return f"{self.tensor_parallel}-gpu"
