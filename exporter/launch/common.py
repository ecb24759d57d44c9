"""What every launcher does with a planned sub-stage: its folder, its saved config, the argv of its steps, logs.

Commands are argv lists; where a script needs one as text it is `shlex.join`ed, so every word is quoted.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Sequence

from omegaconf import DictConfig, OmegaConf

from ..atomic import write_text_atomic
from ..jobs import Step, SubStage
from ..prestart import DEVICES_VARIABLE, PROJECT_ROOT
from ..prestart import take as take_prestarted
from .forked import can_fork, run_forked
from .refusals import explain

CONTAINER_PYTHON = "python3"  # inside a container, its own interpreter; on the host, the one running main.py
SCRIPT_NAME = "launcher.sh"
COMMAND_LOG = "launcher_cmd.log"


class LaunchError(RuntimeError):
    """A job could not be submitted, or a sub-stage run here failed."""


def python_for(cfg: DictConfig) -> str:
    return CONTAINER_PYTHON if cfg.cluster.container else sys.executable


def prepare(cfg: DictConfig, sub_stage: SubStage) -> Path:
    """Create ${results_dir}/<sub_stage>/ and save the resolved config the job runs from; returns its path."""
    sub_stage.results_dir.mkdir(parents=True, exist_ok=True)
    config_path = (sub_stage.results_dir / f"{sub_stage.config_name}_hydra.yaml").resolve()
    write_text_atomic(config_path, OmegaConf.to_yaml(cfg))
    return config_path


def step_argv(step: Step, python: str, config_path: Path) -> list[str]:
    if step.entry:
        return [python, "-m", "exporter.run_substage", str(config_path), *step.entry]
    return list(step.argv)


def job_name(cfg: DictConfig, sub_stage: SubStage) -> str:
    return f"{cfg.cluster.job_name_prefix}{sub_stage.job_name}"


def log_paths(sub_stage: SubStage, name: str, job_id: str = "%j") -> tuple[Path, Path]:
    """stdout and stderr logs, NeMo-Launcher's names: log-<job name>_<job id>.out / .err."""
    base = sub_stage.results_dir.resolve() / f"log-{name}_{job_id}"
    return base.with_suffix(".out"), base.with_suffix(".err")


def pythonpath_line() -> str:
    return f"export PYTHONPATH={shlex.quote(str(PROJECT_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}"


def device_lines(sub_stage: SubStage, note: str = "") -> list[str]:
    """The script lines that show the job only the GPUs it uses of each node, when it uses part of one."""
    devices = sub_stage.resources.device_list
    if devices is None:
        return []
    return [f"# The job uses {sub_stage.resources.gpus_per_node} GPU(s) of each node: its processes see only these"
            + (f"; {note}" if note else "."), f"export {DEVICES_VARIABLE}={devices}"]


def notes_lines(step: Step) -> list[str]:
    return [f"# {note}" for note in step.notes]


def write_script(sub_stage: SubStage, lines: Sequence[str]) -> Path:
    path = sub_stage.results_dir / SCRIPT_NAME
    write_text_atomic(path, "\n".join(lines) + "\n", mode=0o755)
    return path


def record_command(sub_stage: SubStage, argv: Sequence[str]) -> str:
    """launcher_cmd.log: the command line that submits or runs this sub-stage."""
    line = shlex.join(argv)
    write_text_atomic(sub_stage.results_dir / COMMAND_LOG, line + "\n")
    return line


def _copy(source: IO[bytes], *sinks: IO[bytes]) -> None:
    for chunk in iter(lambda: source.read1(65536), b""):
        for sink in sinks:
            sink.write(chunk)
            sink.flush()


def _binary(stream) -> IO[bytes]:
    buffer = getattr(stream, "buffer", None)
    if buffer is not None:
        return buffer

    class _Text:  # a text-only stream (e.g. replaced by a test harness): decode for it
        def write(self, chunk: bytes) -> None:
            stream.write(chunk.decode(errors="replace"))

        def flush(self) -> None:
            stream.flush()

    return _Text()  # type: ignore[return-value]


def run_teeing(argv: Sequence[str], out_path: Path, err_path: Path, *, cwd: Path, env: dict[str, str]) -> int:
    """Run `argv` here; its stdout/stderr go both to this process's and to the two log files (appended).

    Returns the exit code. This interpreter's own `python -m exporter.run_substage` runs as a fork of this process,
    its imports already done, when asked (launch/forked.py), or in the interpreter main.py started ahead for it
    (exporter/prestart.py).
    """
    with open(out_path, "ab") as out_log, open(err_path, "ab") as err_log:
        if can_fork(argv):
            return run_forked(argv, _copy, _binary(sys.stdout), _binary(sys.stderr), out_log, err_log, cwd=cwd,
                              env=env)
        # main.py's interpreter started ahead for this command (exporter/prestart.py), else a fresh one.
        process = take_prestarted(argv, cwd, env) or subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                                                      stderr=subprocess.PIPE)
        copiers = [
            threading.Thread(target=_copy, args=(process.stdout, _binary(sys.stdout), out_log), daemon=True),
            threading.Thread(target=_copy, args=(process.stderr, _binary(sys.stderr), err_log), daemon=True),
        ]
        for copier in copiers:
            copier.start()
        try:
            code = process.wait()
        except BaseException:  # Ctrl-C: do not leave the sub-stage running
            process.terminate()
            process.wait()
            raise
        for copier in copiers:
            copier.join()
    return code


def run_logged(sub_stage: SubStage, argvs: Sequence[Sequence[str]], out: Path, err: Path, *, cwd: Path,
               env: dict[str, str]) -> None:
    """Run a sub-stage's commands here in order, into fresh logs; LaunchError (with the logs' ends) on a failure."""
    for path in (out, err):
        path.write_bytes(b"")
    for argv in argvs:
        code = run_teeing(argv, out, err, cwd=cwd, env=env)
        if code != 0:
            raise failure(sub_stage, code, out, err)


def tail(path: Path, lines: int = 10) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def failure(sub_stage: SubStage, code: int, out: Path, err: Path) -> LaunchError:
    """The sub-stage's exit code and the end of both logs (its one-line error is logged to stdout), with what a
    recognised error in them means."""
    return LaunchError(f"sub-stage {sub_stage.name} failed (exit {code})\n-- end of {out}:\n{tail(out)}"
                       f"\n-- end of {err}:\n{tail(err, 5)}" + explain(tail(out, 200) + "\n" + tail(err, 200)))
