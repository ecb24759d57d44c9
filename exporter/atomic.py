"""Outputs appear whole or not at all: written beside their final place and renamed into it.

A directory being written is a hidden sibling `.<name>.partial-*` (an older one being replaced moves to
`.<name>.old-*` for the moment of the swap). Its writer holds an exclusive `flock` on the `.writer.lock` file inside
it for as long as it writes: the kernel drops that lock when the writer dies, SIGKILL included, so the next
`AtomicDirectory` on the same target can tell a stale directory (lock free: reclaimed, the space logged) from one
still being written (lock held: left alone). flock rather than a pid in a file: no pid reuse after a reboot or a
wrap, and no clock to compare; rather than fcntl/lockf locks, which belong to the process (it could "take" its own
lock) and vanish when any descriptor of the file closes. The lock file also names the writer's host: locks on a
shared file system may be local to each node, so a directory written from another host is left alone.

Before writing, a known output size is checked against the file system's free space; a full disk while writing
(ENOSPC, EDQUOT) removes the partial directory and raises NoSpaceError naming the target and the space needed.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_NAME = ".writer.lock"
_FULL = (errno.ENOSPC, errno.EDQUOT)


class NoSpaceError(RuntimeError):
    """The file system of an output has not enough free space for it."""

    def __init__(self, path: Path, needed: int | None, free: int, written: int | None = None, kept: bool = False,
                 at_least: bool = False):
        """needed: bytes the output needs (None: unknown; `at_least`: a part of it, e.g. a nested directory's)."""
        self.path, self.needed, self.free, self.written = Path(path), needed, free, written
        if needed:
            need = f"needs {'more than' if at_least else 'about'} {megabytes(needed)}"
        else:
            need = f"needs more than the {megabytes(written)} written"
        if written is None:  # refused before writing
            text = f"not enough space for {self.path}: it {need}, its file system has {megabytes(free)} free"
        else:
            text = (f"the disk filled while writing {self.path} after {megabytes(written)}: it {need}, "
                    f"{megabytes(free)} free now that its partial output is removed")
        if kept:
            text += "; the previous export there is untouched"
        super().__init__(text + " (free some space, or write it elsewhere)")


def megabytes(nbytes: int | None) -> str:
    return "?" if nbytes is None else f"{nbytes / 1e6:.1f} MB"


def check_free_space(directory: Path, needed: int, target: Path) -> None:
    """Refuse (NoSpaceError) before writing `needed` bytes for `target` into `directory`'s file system."""
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise NoSpaceError(target, needed, free)


def tree_bytes(path: Path) -> int:
    """Bytes of the regular files under `path` (what removing it frees)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


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


def _locked_directory(final: Path, kind: str) -> tuple[Path, int]:
    """A new empty `.<name>.<kind>-*` sibling of `final` holding its `.writer.lock`, flocked: (path, lock fd).

    Made as `.<name>.starting-*` and renamed once locked, so no `.<kind>-*` directory is ever seen without its lock.
    """
    starting_prefix = f".{final.name}.starting-"
    starting = Path(tempfile.mkdtemp(prefix=starting_prefix, dir=final.parent))
    descriptor = os.open(starting / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.write(descriptor, json.dumps(owner).encode())
        directory = final.parent / f".{final.name}.{kind}-{starting.name[len(starting_prefix):]}"
        os.rename(starting, directory)
    except BaseException:
        os.close(descriptor)
        shutil.rmtree(starting, ignore_errors=True)
        raise
    return directory, descriptor


def reclaim_stale(final: Path) -> int:
    """Remove the `.<name>.partial-*` and `.<name>.old-*` siblings of `final` whose writer is gone (restoring an
    older export whose replacement was killed mid-swap); leave those still being written. Returns bytes freed."""
    final = Path(final)
    if not final.parent.is_dir():
        return 0
    freed = 0
    for kind in ("partial", "old"):
        for candidate in sorted(final.parent.glob(f".{glob.escape(final.name)}.{kind}-*")):
            if candidate.is_dir() and not candidate.is_symlink():
                freed += _reclaim(candidate, final, kind)
    return freed


def _reclaim(candidate: Path, final: Path, kind: str) -> int:
    lock_path = candidate / LOCK_NAME
    try:
        descriptor = os.open(lock_path, os.O_RDWR)
    except FileNotFoundError:
        if candidate.exists():
            log.warning("left %s (%s): it has no writer lock (written by an older exporter, or being renamed into "
                        "place); remove it by hand if no conversion is writing it", candidate,
                        megabytes(tree_bytes(candidate)))
        return 0
    except OSError as error:
        log.warning("left %s: cannot open its writer lock (%s)", candidate, error)
        return 0
    try:
        try:
            owner = json.loads(os.read(descriptor, 4096) or b"{}")
        except ValueError:
            owner = {}
        host = owner.get("host")
        if host and host != socket.gethostname():
            log.warning("left %s: written from host %s, whose lock this host may not see; remove it by hand if that "
                        "run is over", candidate, host)
            return 0
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("%s is being written by process %s: left alone", candidate, owner.get("pid", "?"))
            return 0
        except OSError as error:  # a file system without flock: the writer cannot be known gone
            log.warning("left %s: cannot lock %s (%s)", candidate, lock_path, error)
            return 0
        try:
            if os.stat(lock_path).st_ino != os.fstat(descriptor).st_ino:
                return 0  # the writer finished and renamed it away between our open and our lock
        except FileNotFoundError:
            return 0
        retired = candidate / final.name
        if kind == "old" and not final.exists() and retired.is_dir():
            os.replace(retired, final)
            log.warning("restored %s from %s: the run replacing it (process %s) died mid-swap", final, candidate,
                        owner.get("pid", "?"))
        freed = tree_bytes(candidate)
        shutil.rmtree(candidate, ignore_errors=True)
        log.warning("reclaimed %s: left by process %s (started %s), which is gone; %s freed", candidate,
                    owner.get("pid", "?"), owner.get("started", "?"), megabytes(freed))
        return freed
    finally:
        os.close(descriptor)


class AtomicDirectory:
    """Context manager: yields a temporary sibling of `final`; on success renames it to `final` (replacing an
    older one), on failure removes it.

    On entry, stale partial directories of `final` are reclaimed, then `needed_bytes` (when known) is checked
    against the free space; a full disk while writing raises NoSpaceError."""

    def __init__(self, final: Path, needed_bytes: int | None = None):
        self.final = Path(final)
        self.needed_bytes = needed_bytes
        self.temporary: Path | None = None
        self._lock: int | None = None

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        reclaim_stale(self.final)
        if self.needed_bytes:
            check_free_space(self.final.parent, self.needed_bytes, self.final)
        self.temporary, self._lock = _locked_directory(self.final, "partial")
        return self.temporary

    def __exit__(self, exc_type, exc, traceback) -> None:
        assert self.temporary is not None and self._lock is not None
        if exc_type is not None:
            written = tree_bytes(self.temporary)
            shutil.rmtree(self.temporary, ignore_errors=True)
            os.close(self._lock)
            if isinstance(exc, NoSpaceError):  # from a nested AtomicDirectory: said again of this target
                written = None if exc.written is None else exc.written + written
                raise NoSpaceError(self.final, exc.needed, shutil.disk_usage(self.final.parent).free, written,
                                   self.final.exists(), at_least=True) from exc
            if isinstance(exc, OSError) and exc.errno in _FULL:
                raise NoSpaceError(self.final, self.needed_bytes, shutil.disk_usage(self.final.parent).free,
                                   written, self.final.exists()) from exc
            return
        os.chmod(self.temporary, 0o755)  # mkdtemp makes it 0700
        try:
            if self.final.exists():
                self._swap()
            else:
                self._unlock()
                os.replace(self.temporary, self.final)
        except BaseException:
            if self._lock is not None:
                os.close(self._lock)
                self._lock = None
            shutil.rmtree(self.temporary, ignore_errors=True)
            raise

    def _unlock(self) -> None:
        """Unlink the lock file while still holding it, then drop it: a directory seen without a lock is never
        reclaimed, so nothing can take the lock between here and the rename that follows."""
        assert self.temporary is not None and self._lock is not None
        lock, self._lock = self._lock, None
        try:
            (self.temporary / LOCK_NAME).unlink(missing_ok=True)
        finally:
            os.close(lock)

    def _swap(self) -> None:
        """Replace the finished `final` by the temporary directory; the older one waits in a locked `.old-*`
        directory meanwhile, from which a later run restores it should this process die between the renames."""
        assert self.temporary is not None
        retired, retired_lock = _locked_directory(self.final, "old")
        try:
            os.replace(self.final, retired / self.final.name)
            try:
                self._unlock()
                os.replace(self.temporary, self.final)
            except BaseException:
                os.replace(retired / self.final.name, self.final)
                raise
            shutil.rmtree(retired, ignore_errors=True)
        finally:
            os.close(retired_lock)
