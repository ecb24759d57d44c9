"""Run `python -m exporter.run_substage ...` here as a fork of this process instead of a fresh interpreter.

With the fork asked for, the launcher's process imports what a sub-stage needs (torch, omegaconf, tritonclient:
2-3 s of imports on a quiet machine, several times that on a busy one) before it plans; a fork starts with them
loaded. Without it the launcher never imports torch (exporter/lazy.py), and the sub-stage imports it once.
The child is still its own process, as the command it stands for: it runs `exporter.run_substage.main` with the
same arguments, in the same directory and environment, its stdout/stderr teed into the same logs, and its exit
status is the command's (a signal kills the child, never the launcher; Ctrl-C stops it). The launcher script and
launcher_cmd.log still show the command, which reruns the sub-stage exactly.

Not forked (a fresh interpreter runs the command instead): where there is no fork, when the command names another
interpreter (a container's), when this process has initialised CUDA (a forked child cannot use it), when this
process has started threads since it imported torch (a fork copies only the calling thread, and the
locks the others held stay held in the child: torch's OpenMP pool, once started, hangs the child), and when
EXPORTER_FORK was not 1 as this module was imported (nothing was imported for the children). Opt-in:
EXPORTER_FORK=1 (a process that ran torch work before launching could hang its child if the check above missed a
thread, so the default stays the fresh interpreter).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Callable, IO, Sequence

from ..lazy import imports_without_gc, openmp_threads_sleep_when_idle
from ..prestart import ENTRY  # `python -m exporter.run_substage`, the command both stand in for

ENV = "EXPORTER_FORK"


def can_fork(argv: Sequence[str]) -> bool:
    """`argv` is this interpreter running a sub-stage, and a fork of this process can run it."""
    if list(argv[1:3]) != list(ENTRY) or argv[0] != sys.executable:
        return False
    if not hasattr(os, "fork") or os.environ.get(ENV, "0") != "1":
        return False
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return False
    return _no_new_threads()


def _threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:  # no /proc: the Python threads we know of
        return threading.active_count()


# With the fork asked for, the launcher imports torch here, once, for its children (the fork's whole point), and
# counts the threads it then has (the BLAS pool numpy starts) before it runs anything. Without it the launcher never
# imports torch: the fresh interpreter that runs the sub-stage does, once.
_THREADS_AT_IMPORT = None
if os.environ.get(ENV, "0") == "1":
    openmp_threads_sleep_when_idle()  # as a sub-stage's own interpreter does (exporter/run_substage.py)
    with imports_without_gc():
        import torch  # noqa: E402, F401  (imported by every sub-stage anyway)

    _THREADS_AT_IMPORT = _threads()


def _no_new_threads() -> bool:
    """No thread started since this module was imported. A fork copies one thread and every lock as it was:
    torch's OpenMP pool, once a parallel op has started it, hangs the child's first parallel op (seen: a
    conversion forked from a test process that had run torch before waited forever in a tensor copy). False when
    the count was not taken (EXPORTER_FORK was not 1 when this module was imported)."""
    return _THREADS_AT_IMPORT is not None and _threads() <= _THREADS_AT_IMPORT


def _child(argv: Sequence[str], out: int, err: int, cwd: Path, env: dict[str, str]) -> None:
    """In the fork: become the command and never return (os._exit)."""
    code = 1
    try:
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.close(out)
        os.close(err)
        # Fresh line-buffered streams on fds 1/2 (the parent's may be a test harness's capture objects).
        sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
        sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        sys.argv = [argv[2], *argv[3:]]
        # The launcher's log handlers (Hydra's console and main.log) are not the sub-stage's: it sets up its own.
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for logger in logging.Logger.manager.loggerDict.values():
            if isinstance(logger, logging.Logger):
                logger.handlers.clear()
                logger.propagate = True
                logger.disabled = False
        from exporter.run_substage import main

        code = main(list(argv[3:]))
    except SystemExit as error:
        code = error.code if isinstance(error.code, int) else (0 if error.code is None else 1)
    except BaseException:  # noqa: BLE001 - the child must exit with a status, whatever happened
        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - exiting anyway
                pass
        os._exit(code)


def run_forked(argv: Sequence[str], copy: Callable[..., None], stdout: IO[bytes], stderr: IO[bytes],
               out_log: IO[bytes], err_log: IO[bytes], *, cwd: Path, env: dict[str, str]) -> int:
    """Run the sub-stage command `argv` in a fork; its output goes to `stdout`/`stderr` and the logs through `copy`
    (launch/common.py's tee). Returns its exit code (negative: the signal that killed it), as Popen would."""
    out_read, out_write = os.pipe()
    err_read, err_write = os.pipe()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()  # nothing buffered here is written twice
    pid = os.fork()
    if pid == 0:
        os.close(out_read)
        os.close(err_read)
        _child(argv, out_write, err_write, cwd, env)
    os.close(out_write)
    os.close(err_write)
    readers = [open(out_read, "rb"), open(err_read, "rb")]
    copiers = [threading.Thread(target=copy, args=(readers[0], stdout, out_log), daemon=True),
               threading.Thread(target=copy, args=(readers[1], stderr, err_log), daemon=True)]
    for copier in copiers:
        copier.start()
    try:
        _, status = os.waitpid(pid, 0)
    except BaseException:  # Ctrl-C: do not leave the sub-stage running
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
        raise
    for copier in copiers:
        copier.join()
    for reader in readers:
        reader.close()
    return os.waitstatus_to_exitcode(status)
