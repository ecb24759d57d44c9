"""The pure functions that split full FT tensors per tensor-parallel rank (the layout itself: exporter/parallel.py).

FT file naming: a replicated tensor is `<name>.bin`; a split tensor is `<name>.<rank>.bin`.
"""

from __future__ import annotations

import torch

from templates.ft_python.ft_checkpoint import CheckpointError, first_kv_head, qkv_rank_heads

from ..parallel import ShardingError, Split


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
