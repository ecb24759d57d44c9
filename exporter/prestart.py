"""The first sub-stage's interpreter, started while main.py composes and plans, so its imports overlap that work.

A local run (cluster_type=interactive) runs each sub-stage as `python -m exporter.run_substage <config> <stage>
<sub_stage>` in a fresh interpreter, which then spends 2-3 s importing torch and the converter, after main.py has
spent 1-1.5 s importing Hydra, composing the config and planning. main.py therefore starts that interpreter first
(`start`, before it imports Hydra): `python -m exporter.prestart` imports what a sub-stage imports and waits on its
stdin for the command. When the launcher comes to run the first sub-stage, `take` hands it the command line,
directory and environment; the waiting interpreter becomes `exporter.run_substage` with those arguments, and the
launcher tees its stdout/stderr into the logs as it would a fresh one's. The launcher script and launcher_cmd.log
still show the command, which reruns the sub-stage exactly.

Where the waiting interpreter could differ from a fresh one it execs the command instead (same process, same
pipes; the start-up is then as before): another directory, or an environment that differs from the one it started
with beyond what its own imports set the same way (exporter/progress.py's TQDM_DISABLE, OMP_WAIT_POLICY) and
CUDA_VISIBLE_DEVICES (read when CUDA starts, which nothing has done). The launcher starts a fresh interpreter when
the command is not this interpreter's sub-stage (a container's python) or the waiting one is gone. None is started
with EXPORTER_PRESTART=0, with EXPORTER_FORK=1 (the fork has the imports already: launch/forked.py), or when
main.py's arguments ask for something that runs no sub-stage here (another cluster_type, a dry run, Hydra's
--help/--cfg, a multirun). One that is not taken is killed when main.py ends (`discard`), and exits by itself at the
end of its stdin if main.py dies first. Its stdin is /dev/null once it has the command (sub-stages read no input).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Sequence

ENV = "EXPORTER_PRESTART"
ENTRY = ("-m", "exporter.run_substage")
PROJECT_ROOT = Path(__file__).resolve().parents[1]  # holds the `exporter` package: put on PYTHONPATH in jobs
# The GPUs a job may use: set per sub-stage (launch/interactive.py, slurm.py), read by nothing before CUDA starts.
DEVICES_VARIABLE = "CUDA_VISIBLE_DEVICES"
# main.py's arguments that mean no sub-stage runs here (Hydra's own flags, another launcher, a dry run).
_HYDRA_FLAGS = ("-h", "--help", "--hydra-help", "--info", "-i", "--cfg", "-c", "--resolve", "--shell-completion",
                "-sc", "--version", "-m", "--multirun", "--experimental-rerun")

_waiting: "Prestarted | None" = None


def substage_environment() -> dict[str, str]:
    """The environment a local sub-stage runs in: this one, the project first on PYTHONPATH, and EXPORTER_PROGRESS
    as this process's stderr calls for (bars on a terminal; the sub-stage's own output is piped)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("EXPORTER_PROGRESS", "bar" if sys.stderr.isatty() else "log")
    return env


def wanted(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> bool:
    """Whether main.py, called with `argv` (its arguments), should start a sub-stage's interpreter early."""
    environ = os.environ if environ is None else environ
    if environ.get(ENV, "1") == "0" or environ.get("EXPORTER_FORK", "0") == "1":  # (launch/forked.py's ENV)
        return False
    for arg in argv:
        key, _, value = arg.partition("=")
        key = key.lstrip("+~")
        if arg in _HYDRA_FLAGS or arg.startswith("--cfg") or arg.startswith("--info"):
            return False
        if key == "cluster_type" and value.strip() != "interactive":
            return False
        if key == "dry_run" and value.strip().lower() in ("true", "yes", "1", "on"):
            return False
        if key == "hydra.mode" and "MULTIRUN" in value.upper():
            return False
    return True


class Prestarted:
    """An interpreter running `python -m exporter.prestart`, waiting for its command."""

    def __init__(self, process: subprocess.Popen, env: dict[str, str]):
        self.process, self.env = process, env  # env: the environment it started with

    def fits(self, argv: Sequence[str]) -> bool:
        """`argv` is this interpreter's sub-stage command, and the waiting interpreter is still there."""
        return list(argv[:3]) == [sys.executable, *ENTRY] and self.process.poll() is None

    def hand_over(self, argv: Sequence[str], cwd: Path, env: Mapping[str, str]) -> bool:
        """Send the command; False when the interpreter is gone (the caller starts a fresh one)."""
        line = json.dumps({"argv": list(argv), "cwd": str(cwd), "env": dict(env)}) + "\n"
        try:
            self.process.stdin.write(line.encode())
            self.process.stdin.close()
        except (BrokenPipeError, OSError, ValueError):
            self.kill()
            return False
        return True

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        try:
            self.process.stdin.close()
        except (BrokenPipeError, OSError, ValueError):
            pass
        self.process.wait()
        for stream in (self.process.stdout, self.process.stderr):
            stream.close()


def start(argv: Sequence[str] | None = None) -> Prestarted | None:
    """Start the waiting interpreter when main.py's arguments `argv` call for one (see `wanted`)."""
    global _waiting
    argv = sys.argv[1:] if argv is None else argv
    if _waiting is not None or not wanted(argv) or not sys.executable:  # (no path to this interpreter: none)
        return _waiting
    env = substage_environment()
    try:
        process = subprocess.Popen([sys.executable, "-m", "exporter.prestart"], env=env, stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError:
        return None  # the sub-stage starts fresh later, and reports what is wrong itself
    _waiting = Prestarted(process, env)
    return _waiting


def take(argv: Sequence[str], cwd: Path, env: Mapping[str, str]) -> subprocess.Popen | None:
    """The waiting interpreter, running `argv` in `cwd` with `env`, or None (run a fresh one): see the module doc.
    It is taken once; one that does not fit is killed."""
    global _waiting
    waiting, _waiting = _waiting, None
    if waiting is None:
        return None
    if not waiting.fits(argv):
        waiting.kill()
        return None
    return waiting.process if waiting.hand_over(argv, cwd, env) else None


def discard() -> None:
    """Kill the waiting interpreter if nothing took it (main.py, at its end)."""
    global _waiting
    waiting, _waiting = _waiting, None
    if waiting is not None:
        waiting.kill()


def _differs(started: Mapping[str, str], now: Mapping[str, str], wanted: Mapping[str, str]) -> list[str]:
    """The variables in which a fresh interpreter started with `wanted` would differ from this one, which started
    with `started` and has `now` after its imports (what they set by default, a fresh one sets the same way)."""
    return sorted(key for key in set(now) | set(wanted) if key != DEVICES_VARIABLE and now.get(key) != wanted.get(key)
                  and not (key in now and key not in started and key not in wanted))


def _serve() -> int:
    """In the waiting interpreter: import, wait for the command, run it as `python -m exporter.run_substage`."""
    started = dict(os.environ)
    cwd = os.getcwd()
    from .lazy import imports_without_gc, openmp_threads_sleep_when_idle

    openmp_threads_sleep_when_idle()  # as run_substage.main does, before torch loads
    with imports_without_gc():
        import torch

        from . import run_substage
        from .ft import convert  # noqa: F401  (the conversion's and rendering's modules, as a sub-stage's)
        from .stages import RUNNERS  # noqa: F401
        from .triton import render  # noqa: F401
    line = sys.stdin.buffer.readline()
    if not line.strip():  # main.py ended without a sub-stage for us
        return 0
    command = json.loads(line)
    argv, env = command["argv"], command["env"]
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.chdir(command["cwd"])
    differ = _differs(started, os.environ, env)
    if env.get(DEVICES_VARIABLE) != started.get(DEVICES_VARIABLE) and torch.cuda.is_initialized():
        differ.append(DEVICES_VARIABLE)
    if os.getcwd() != cwd or differ:  # not what a fresh start would be: be one
        what = f"environment ({', '.join(differ)})" if differ else f"directory (this one started in {cwd})"
        print(f"exporter.prestart: running the sub-stage in a fresh interpreter: its {what} is not the one this "
              "early interpreter started with", file=sys.stderr, flush=True)
        os.execve(argv[0], argv, env)
    os.environ.clear()
    os.environ.update(env)
    sys.argv = [run_substage.__file__, *argv[3:]]
    return run_substage.main(argv[3:])


if __name__ == "__main__":
    from .quick_exit import quick_exit

    quick_exit(_serve())
