"""Outputs appear whole or not at all: written beside their final place and renamed into it."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def write_text_atomic(path: Path, text: str, mode: int = 0o644) -> Path:
    """Write `text` to a temporary sibling of `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(text)
        os.chmod(temporary, mode)  # mkstemp makes it 0600
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


class AtomicDirectory:
    """Context manager: yields a temporary sibling of `final`; on success renames it to `final` (replacing an
    older one), on failure removes it."""

    def __init__(self, final: Path):
        self.final = Path(final)
        self.temporary: Path | None = None

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.temporary = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.partial-", dir=self.final.parent))
        return self.temporary

    def __exit__(self, exc_type, exc, traceback) -> None:
        assert self.temporary is not None
        if exc_type is not None:
            shutil.rmtree(self.temporary, ignore_errors=True)
            return
        os.chmod(self.temporary, 0o755)  # mkdtemp makes it 0700
        if self.final.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.old-", dir=self.final.parent))
            os.replace(self.final, retired / self.final.name)
            os.replace(self.temporary, self.final)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(self.temporary, self.final)
