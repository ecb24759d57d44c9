"""Every file FT's loader opens exists with its exact byte size.

The rule table lives in the serving runtime (`templates/ft_python/ft_checkpoint.py`), which must work inside a
generated repository without this package; the exporter checks its own output against that same table.
"""

from __future__ import annotations

from pathlib import Path

from templates.ft_python.ft_checkpoint import (
    DTYPE_BYTES,
    CheckpointError,
    expected_files,
    read_config,
    verify,
)

__all__ = ["DTYPE_BYTES", "CheckpointError", "expected_files", "read_config", "verify_shards"]


def verify_shards(shard_dir: Path) -> None:
    """Raises CheckpointError naming every missing or wrongly sized file."""
    verify(Path(shard_dir))
