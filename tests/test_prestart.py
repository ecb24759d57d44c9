"""main.py starts the first sub-stage's interpreter before it imports Hydra (exporter/prestart.py), so that the
sub-stage's imports overlap the launcher's work. The command it is handed runs as a fresh `python -m
exporter.run_substage` would: same status and log lines; where its directory or environment differs from the
early interpreter's, it becomes a fresh one (exec) and says so on stderr."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from exporter import prestart
from exporter.launch import forked
from exporter.launch.common import run_teeing

FRESH_NOTE = "exporter.prestart: running the sub-stage in a fresh interpreter"


@pytest.fixture
def waiting(monkeypatch):
    """An early interpreter started as main.py starts it (the fork not asked for); killed at the end if left."""
    monkeypatch.delenv(forked.ENV, raising=False)
    monkeypatch.delenv(prestart.ENV, raising=False)
    started = prestart.start([])
    assert started is not None and started.process.poll() is None
    yield started
    prestart.discard()
    if started.process.poll() is None:
        started.process.kill()
        started.process.wait()


def _without_times(text: str) -> str:
    return re.sub(r"^\[[0-9-]+ [0-9:,]+\]", "[time]", text, flags=re.M)


def _run(tmp_path, name, argv, cwd, env) -> tuple[int, str, str]:
    out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    code = run_teeing(argv, out, err, cwd=cwd, env=env)
    return code, out.read_text(), err.read_text()


def test_main_py_arguments_that_run_no_sub_stage_here_start_none():
    env = {}
    assert prestart.wanted([], env)
    assert prestart.wanted(["stages=[export]", "cluster_type=interactive", "dry_run=false"], env)
    for argv in (["cluster_type=bcm"], ["cluster_type=k8s"], ["dry_run=true"], ["dry_run=True"], ["--cfg", "job"],
                 ["--help"], ["-m", "export.model.processes=1,2"], ["hydra.mode=MULTIRUN"]):
        assert not prestart.wanted(argv, env), argv
    assert not prestart.wanted([], {prestart.ENV: "0"})
    assert not prestart.wanted([], {forked.ENV: "1"})  # the fork has the imports already


def test_only_variables_its_own_imports_set_the_same_way_may_differ():
    started = {"A": "1", "EXPORTER_PROGRESS": "log"}
    now = {**started, "OMP_WAIT_POLICY": "PASSIVE", "TQDM_DISABLE": "1"}  # set by its imports (setdefault)
    assert prestart._differs(started, now, {"A": "1", "EXPORTER_PROGRESS": "log", "TQDM_DISABLE": "1"}) == []
    assert prestart._differs(started, now, {**started, prestart.DEVICES_VARIABLE: "0"}) == []
    assert prestart._differs(started, now, {**started, "OMP_WAIT_POLICY": "ACTIVE"}) == ["OMP_WAIT_POLICY"]
    assert prestart._differs(started, now, {"A": "2", "EXPORTER_PROGRESS": "log"}) == ["A"]
    assert prestart._differs(started, now, {"EXPORTER_PROGRESS": "log", "B": "1"}) == ["A", "B"]
    # a variable it started with and still has, which the command's environment lacks
    assert prestart._differs({"A": "1"}, {"A": "1"}, {}) == ["A"]


def test_the_handed_sub_stage_runs_and_fails_as_a_fresh_interpreter_does(tmp_path, waiting):
    """A sub-stage that fails (its config is missing: exit 2, one logged line) reports the same status and log
    lines in the early interpreter as in a fresh one, and the early one ran it itself (no note, no exec)."""
    argv = [sys.executable, "-m", "exporter.run_substage", "missing.yaml", "export", "convert"]
    env, cwd = waiting.env, Path.cwd()  # the environment main.py's launcher would give it
    taken = _run(tmp_path, "taken", argv, cwd, env)
    assert waiting.process.returncode == 2 and prestart._waiting is None  # it was this one, and it is used up
    fresh = _run(tmp_path, "fresh", argv, cwd, env)
    assert taken[0] == fresh[0] == 2
    assert "configuration error: missing.yaml: no such config file" in taken[1]
    assert _without_times(taken[1]) == _without_times(fresh[1])
    assert FRESH_NOTE not in taken[2] and "Traceback" not in taken[1] + taken[2]


def test_another_directory_or_environment_runs_in_a_fresh_interpreter(tmp_path, waiting):
    """Handed a command whose environment has a variable the early interpreter did not start with, it execs the
    command (the variable then reaches it, as it reaches a fresh interpreter) and says why."""
    config = tmp_path / "config.yaml"
    config.write_text("a: 1\n")
    argv = [sys.executable, "-m", "exporter.run_substage", str(config), "export", "convert"]
    env = {**waiting.env, "EXPORTER_TEST_MARKER": "1"}
    code, out, err = _run(tmp_path, "env", argv, Path.cwd(), env)
    assert waiting.process.returncode == code == 2  # the config is not a whole export config
    assert f"{FRESH_NOTE}: its environment (EXPORTER_TEST_MARKER)" in err
    assert "configuration error" in out

    again = prestart.start([])
    code, out, err = _run(tmp_path, "cwd", [*argv[:3], "missing.yaml", *argv[4:]], tmp_path, again.env)
    assert again.process.returncode == code == 2
    assert f"{FRESH_NOTE}: its directory" in err
    assert "configuration error: missing.yaml: no such config file" in out  # resolved in tmp_path


def test_one_not_taken_is_killed_or_ends_with_its_stdin(waiting):
    waiting.process.stdin.close()  # main.py gone: the end of its stdin
    assert waiting.process.wait(timeout=120) == 0
    assert waiting.process.stdout.read() == b"" and waiting.process.stderr.read() == b""
    prestart._waiting = None

    again = prestart.start([])
    prestart.discard()
    assert again.process.returncode is not None and prestart._waiting is None


def test_another_interpreter_gets_a_fresh_process(tmp_path, waiting):
    """A command for another interpreter (a container's python3) is not handed over: the early one is killed and
    the command runs as given."""
    code, out, _ = _run(tmp_path, "other", ["python3", "-c", "print('other interpreter')"], Path.cwd(), waiting.env)
    assert code == 0 and out.strip() == "other interpreter"
    assert waiting.process.returncode is not None and waiting.process.returncode < 0  # killed


def _processes_with(marker: str) -> list[int]:
    """The processes whose environment holds `marker` (a unique NAME=value)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # gone, or not ours to read
            pass
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").is_file(), reason="needs /proc to find the processes")
def test_main_py_leaves_no_early_interpreter_behind(tmp_path):
    """A command whose config fails before any sub-stage runs kills the interpreter it started early: once main.py
    has exited, no process it started is left."""
    marker = f"EXPORTER_TEST_RUN={os.getpid()}-{tmp_path.name}"
    env = {key: value for key, value in os.environ.items() if key not in (forked.ENV, prestart.ENV)}
    env[marker.split("=")[0]] = marker.split("=")[1]
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "main.py"), "export.model.tensor_model_parallel_size=0",
                           f"base_results_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'hydra'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "tensor_model_parallel_size: must be >= 1" in done.stdout + done.stderr
    assert _processes_with(marker) == []
