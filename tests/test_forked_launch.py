"""The interactive launcher runs this interpreter's own sub-stage command as a fork of the launcher (launch/forked.py):
the same exit status and logs as the command run by a fresh interpreter (EXPORTER_FORK=0). Without the fork, the
launcher never imports torch: the sub-stage that converts imports it, once per command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from exporter.launch import forked
from exporter.launch.common import run_teeing


def _run(tmp_path, argv, fork: bool, name: str) -> tuple[int, str, str]:
    out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    env = {**os.environ, forked.ENV: "1" if fork else "0", "MARKER": name}
    code = run_teeing(argv, out, err, cwd=tmp_path, env=env)
    return code, out.read_text(), err.read_text()


@pytest.fixture
def single_threaded(monkeypatch):
    """This test process runs threads started after the launcher module was imported (torch's OpenMP pool, once
    earlier tests ran torch ops), which rightly stops the launcher from forking: the tests of everything else
    pretend it has none, as main.py has none."""
    monkeypatch.setattr(forked, "_no_new_threads", lambda: True)


def test_a_process_running_other_threads_is_not_forked(monkeypatch):
    """Regression: a conversion forked from a pytest process that had run torch ops hung forever in its first
    tensor copy (the OpenMP pool's locks, held by threads the fork does not copy). With another thread running,
    the command runs in a fresh interpreter instead."""
    import threading

    command = [sys.executable, "-m", "exporter.run_substage", "config.yaml", "export", "convert"]
    monkeypatch.setenv(forked.ENV, "1")
    monkeypatch.setattr(forked, "_THREADS_AT_IMPORT", forked._threads())  # as counted by a launcher with the fork on
    assert forked._no_new_threads()
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        assert not forked._no_new_threads()
        assert not forked.can_fork(command)
    finally:
        stop.set()
        other.join()


def test_only_this_interpreters_sub_stage_command_is_forked(monkeypatch, single_threaded):
    command = [sys.executable, "-m", "exporter.run_substage", "config.yaml", "export", "convert"]
    monkeypatch.delenv(forked.ENV, raising=False)
    assert not forked.can_fork(command)  # opt-in
    monkeypatch.setenv(forked.ENV, "1")
    assert forked.can_fork(command)
    assert not forked.can_fork(["python3", *command[1:]])  # a container's interpreter
    assert not forked.can_fork([sys.executable, "-m", "other.module"])
    monkeypatch.setenv(forked.ENV, "0")
    assert not forked.can_fork(command)


@pytest.mark.parametrize("fork", [True, False])
def test_forked_and_fresh_sub_stage_fail_alike(tmp_path, monkeypatch, fork, single_threaded):
    """A sub-stage that fails (its config is missing: exit 2, one logged line) reports the same status and log
    line, in the same working directory, whether it ran forked or as a fresh interpreter."""
    monkeypatch.setenv(forked.ENV, "1" if fork else "0")
    argv = [sys.executable, "-m", "exporter.run_substage", "missing.yaml", "export", "convert"]
    assert forked.can_fork(argv) is fork
    code, out, err = _run(tmp_path, argv, fork, "forked" if fork else "fresh")
    assert code == 2
    assert "configuration error: missing.yaml: no such config file" in out
    assert "Traceback" not in out + err


def test_forked_sub_stage_sees_its_environment_and_directory(tmp_path, monkeypatch, single_threaded):
    """The fork runs with the environment and working directory given to the command, not the launcher's, and a
    sub-stage that dies on a signal reports it as Popen does (negative status)."""
    monkeypatch.setenv(forked.ENV, "1")

    def probe(argv):
        print(f"cwd={os.getcwd()} marker={os.environ.get('MARKER')}", flush=True)
        if argv[-1] == "die":
            os.kill(os.getpid(), 9)
        return 0

    monkeypatch.setattr("exporter.run_substage.main", probe)
    code, out, _ = _run(tmp_path, [sys.executable, "-m", "exporter.run_substage", "x.yaml", "export", "ok"], True,
                        "probe")
    assert code == 0 and out.strip() == f"cwd={tmp_path} marker=probe"
    code, _, _ = _run(tmp_path, [sys.executable, "-m", "exporter.run_substage", "x.yaml", "export", "die"], True,
                      "die")
    assert code == -9


# main.py in a process where importing torch fails: an import anywhere in the launcher (Hydra, config validation,
# planning, which opens the checkpoint's config and safetensors headers, launching) fails the command.
WITHOUT_TORCH = """
import runpy, sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "grpc") or name.startswith("tritonclient.grpc"):
            raise ImportError(f"the launcher imported {name}")
sys.meta_path.insert(0, NoTorch())
root = sys.argv.pop(1)
sys.path.insert(0, root)
sys.argv[0] = root + "/main.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_the_launcher_runs_an_export_without_importing_torch(tiny_gpt2, tmp_path, monkeypatch):
    """torch takes 2-3 s to import here; a command importing it in the launcher and again in the sub-stage paid that
    twice. The whole export of an HF checkpoint runs with torch refused in the launcher's process (the sub-stage, a
    fresh interpreter, converts with it), and tritonclient's protobuf classes too, which bring grpc (0.15 s; the
    sub-stage renders the configs), and the guard itself bites: the same run with the fork asked for, whose
    launcher imports torch for its children, fails."""
    root = Path(__file__).resolve().parents[1]
    argv = [sys.executable, "-c", WITHOUT_TORCH, str(root), f"export.model.checkpoint_path={tiny_gpt2}",
            "export.accuracy.enabled=false", f"base_results_dir={tmp_path / 'results'}",
            f"hydra.run.dir={tmp_path / 'hydra'}"]
    env = {**os.environ, forked.ENV: "0", "EXPORTER_PROGRESS": "off"}
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(list((tmp_path / "results").rglob("model_repo/*/1/1-gpu/config.ini"))) == 1

    env[forked.ENV] = "1"
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "the launcher imported torch" in done.stdout + done.stderr
