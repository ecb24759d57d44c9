"""The parallel layout, described once: how FT tensors split over tensor-parallel ranks (`Split`), and which ranks,
pipeline stages and shard directory a conversion targets (`ParallelLayout`).

Below both `arch/` (whose name tables say how each tensor splits) and `ft/` (which splits and writes them), so
neither imports the other for it. The pure split functions live in `ft/sharding.py`; the rules the serving runtime
shares (FT's pipeline-stage rule, the shard directory name) live in `templates/ft_python/ft_checkpoint.py`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from templates.ft_python.ft_checkpoint import shard_dir_name, stage_layers


class ShardingError(ValueError):
    """The model cannot be laid out for the requested parallelism."""


class Split(enum.Enum):
    REPLICATED = "replicated"  # every rank reads the same file
    COLUMN = "column"  # last dim split: [in, out] -> [in, out/tp]; also [h, 3, h] -> [h, 3, h/tp], bias [3, h]
    ROW = "row"  # first dim split: [in, out] -> [in/tp, out]
    # Last dim = q | k | v blocks (grouped-query attention: fewer kv heads): a rank gets [q_r | k_r | v_r], its q
    # heads and the kv heads they read (split whole, or one replicated kv head when tp > kv heads).
    # [h, (n_q + 2 n_kv) d] -> [h, (n_q/tp + 2 n_kv_r) d]; bias likewise. See ft_checkpoint.qkv_rank_heads.
    QKV = "qkv"


@dataclass(frozen=True)
class ParallelLayout:
    """Tensor and pipeline parallel sizes, and (once bound with `with_layers`) the model's transformer layers."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    num_layers: int | None = None  # None until the model is known

    @property
    def shard_dir_name(self) -> str:
        """`<tp>-gpu`: the directory every rank's shards (of every pipeline stage) are written to."""
        return shard_dir_name(self.tensor_parallel)

    def with_layers(self, num_layers: int) -> ParallelLayout:
        """This layout for a model of `num_layers` layers."""
        return replace(self, num_layers=num_layers)

    def check(self, head_num: int, kv_head_num: int | None = None, inter_size: int | None = None) -> None:
        """Every divisibility FT and the runtime need; raises naming the first that fails (nothing written yet).

        The layer checks need `num_layers`; an unbound layout checks the tensor-parallel split only."""
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
        if self.num_layers is None:
            return
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
        if self.num_layers is None:
            raise ValueError("the layout has no layer count yet: bind the model's with with_layers()")
        return stage_layers(self.num_layers, self.pipeline_parallel, stage)
