"""End a finished command's process without tearing its interpreter down.

An interpreter that imported torch spends 0.5-0.8 s on this machine finalising its modules and objects at exit
(measured: `python -c "import torch"` 2.68 s, the same ending in os._exit 2.17 s), after the work is done and the
results are written. `quick_exit` does what an orderly exit must (runs the atexit handlers, logging's flush and
close and tempfile's clean-ups among them, and flushes stdout and stderr), then ends the process. With other threads
still running, or a profiler or debugger attached, it exits the ordinary way instead.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading


def _observed() -> bool:
    """A profiler, tracer or debugger is attached (`python -m cProfile -o ...` writes its file after the script
    returns, which os._exit would skip)."""
    if sys.getprofile() is not None or sys.gettrace() is not None:
        return True
    monitoring = getattr(sys, "monitoring", None)  # Python >= 3.12: cProfile and coverage may use it instead
    return monitoring is not None and any(monitoring.get_tool(tool) is not None for tool in range(6))


def quick_exit(code: int) -> None:
    """Exit with status `code` (never returns)."""
    if threading.active_count() > 1 or _observed():
        sys.exit(code)
    atexit._run_exitfuncs()  # what the interpreter runs at exit before it finalises; registered order, reversed
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or a broken pipe: nothing left to say
            pass
    os._exit(code)
