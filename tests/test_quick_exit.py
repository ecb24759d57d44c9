"""exporter/quick_exit.py: a finished command ends without the interpreter's teardown, yet as an orderly exit
would: its atexit handlers run, its buffered output and log files are written, its status is the one given; with
another thread still running it waits for that thread, as an ordinary exit does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROGRAM = """
import atexit, logging, sys, threading, time
sys.path.insert(0, {root!r})
from exporter.quick_exit import quick_exit
log = logging.getLogger("probe")
log.addHandler(logging.FileHandler({log!r}, delay=False))
log.setLevel(logging.INFO)
log.info("logged before exit")
atexit.register(lambda: open({marker!r}, "w").write("atexit ran"))
sys.stdout.write("buffered, no newline")  # left in the buffer: a bare os._exit would lose it
if {thread}:
    def late():
        time.sleep(0.5)
        open({thread_marker!r}, "w").write("thread finished")
    threading.Thread(target=late).start()
quick_exit(3)
print("never here")
"""


def _run(tmp_path, thread: bool):
    paths = {name: str(tmp_path / name) for name in ("log", "marker", "thread_marker")}
    code = PROGRAM.format(root=str(ROOT), thread=thread, **paths)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    return done, {name: Path(path) for name, path in paths.items()}


def test_quick_exit_keeps_what_an_orderly_exit_does(tmp_path):
    done, paths = _run(tmp_path, thread=False)
    assert done.returncode == 3, done.stderr
    assert done.stdout == "buffered, no newline"
    assert paths["marker"].read_text() == "atexit ran"
    assert paths["log"].read_text() == "logged before exit\n"


def test_quick_exit_waits_for_running_threads(tmp_path):
    done, paths = _run(tmp_path, thread=True)
    assert done.returncode == 3, done.stderr
    assert paths["thread_marker"].read_text() == "thread finished"
    assert paths["marker"].read_text() == "atexit ran"


def test_quick_exit_lets_a_profiler_write_its_output(tmp_path):
    """`python -m cProfile -o FILE script` writes FILE after the script returns; os._exit would skip that."""
    script = tmp_path / "script.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nfrom exporter.quick_exit import quick_exit\n"
                      "quick_exit(0)\n")
    profile = tmp_path / "out.prof"
    done = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(profile), str(script)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert profile.is_file() and profile.stat().st_size > 0
    import pstats
    assert pstats.Stats(str(profile)).total_calls > 0
