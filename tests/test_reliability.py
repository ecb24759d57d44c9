"""A conversion killed outright or stopped by a full disk: what it leaves, and what the next run does with it."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from exporter import atomic
from exporter.atomic import AtomicDirectory, NoSpaceError, megabytes, reclaim_stale
from exporter.ft import writer
from exporter.ft.convert import convert_checkpoint
from exporter.parallel import ParallelLayout
from exporter.runtimes import ModelSettings
from exporter.stages.export import build_repository

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ModelSettings(name="gpt2", runtime="python", max_batch_size=4, layout=ParallelLayout(1, 1),
                         data_type="fp32", device="cpu")

# A conversion that blocks in its writer thread after two pieces are on disk, having said so in a marker file.
HANGING_CONVERSION = """
import sys, time
from pathlib import Path
from exporter.ft import writer
from exporter.parallel import ParallelLayout
from exporter.runtimes import ModelSettings
from exporter.stages.export import build_repository

repository, checkpoint, marker = map(Path, sys.argv[1:4])
original, calls = writer.write_tensor, []

def hanging(tensor, path, append=False):
    original(tensor, path, append)
    calls.append(path)
    if len(calls) == 2:
        marker.write_text(str(path))
        time.sleep(600)

writer.write_tensor = hanging
settings = ModelSettings(name="gpt2", runtime="python", max_batch_size=4, layout=ParallelLayout(1, 1),
                         data_type="fp32", device="cpu")
build_repository(repository, checkpoint, settings, "fp32")
"""


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), EXPORTER_PROGRESS="off")


def _start_hanging_conversion(repository: Path, checkpoint: Path, marker: Path) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", HANGING_CONVERSION, str(repository), str(checkpoint),
                                str(marker)], cwd=ROOT, env=_env(), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not marker.exists():
        if process.poll() is not None:
            pytest.fail(f"the conversion ended before it hung: {process.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("the conversion did not reach its second write in 300 s")
        time.sleep(0.2)
    return process


def _files(directory: Path) -> dict[str, int]:
    return {str(path.relative_to(directory)): path.stat().st_size for path in directory.rglob("*") if path.is_file()}


def _du(directory: Path) -> int:
    return sum(os.lstat(Path(root) / name).st_size for root, _, names in os.walk(directory) for name in names)


def _siblings(final: Path) -> list[str]:
    return sorted(path.name for path in final.parent.iterdir() if path.name.startswith(f".{final.name}."))


def test_killed_conversion_is_reclaimed_and_a_live_one_left_alone(tiny_gpt2, tmp_path, caplog):
    """Bug: a conversion killed with SIGKILL left its hidden `.model_repo.partial-*` directory forever. The next run
    reclaims it (and says how much space), but never a partial directory whose writer is still alive."""
    repository = tmp_path / "model_repo"
    process = _start_hanging_conversion(repository, tiny_gpt2, tmp_path / "marker")
    try:
        (live,) = tmp_path.glob(".model_repo.partial-*")
        being_written = _files(live)
        assert any(name.endswith(".bin") for name in being_written)

        # Another conversion while that one writes: finishes, and leaves the live directory as it was.
        with caplog.at_level(logging.INFO, logger="exporter.atomic"):
            build_repository(repository, tiny_gpt2, SETTINGS, "fp32")
        assert (repository / "gpt2" / "1" / "1-gpu" / "config.ini").is_file()
        assert live.is_dir() and _files(live) == being_written
        assert not any("reclaimed" in record.getMessage() for record in caplog.records)

        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        process.kill()
        process.wait()
    left = _du(live)
    assert left > 0 and _siblings(repository) == [live.name]  # what SIGKILL leaves: the partial directory only

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="exporter.atomic"):
        build_repository(repository, tiny_gpt2, SETTINGS, "fp32")
    assert _siblings(repository) == []
    assert (repository / "gpt2" / "1" / "1-gpu" / "config.ini").is_file()
    reclaimed = [record.getMessage() for record in caplog.records if str(live) in record.getMessage()]
    assert len(reclaimed) == 1
    assert str(process.pid) in reclaimed[0] and megabytes(left) in reclaimed[0]


# Replaces a finished directory and is killed between moving the old one aside and moving the new one in.
KILLED_MID_SWAP = """
import os, signal, sys
from pathlib import Path
from exporter import atomic

final = Path(sys.argv[1])
rename = os.replace

def dying_rename(source, destination):
    rename(source, destination)
    if Path(destination).parent.name.startswith(f".{final.name}.old-"):
        os.kill(os.getpid(), signal.SIGKILL)

atomic.os.replace = dying_rename
with atomic.AtomicDirectory(final) as partial:
    (partial / "version").write_text("new")
"""


def test_export_killed_mid_swap_is_restored(tmp_path):
    """Bug: a run killed after moving the previous export aside and before renaming its own in left no export at
    all. The next run puts the previous one back."""
    final = tmp_path / "model_repo"
    with AtomicDirectory(final) as partial:
        (partial / "version").write_text("old")
    result = subprocess.run([sys.executable, "-c", KILLED_MID_SWAP, str(final)], cwd=ROOT, env=_env(), timeout=120)
    assert result.returncode == -signal.SIGKILL
    assert not final.exists() and len(list(tmp_path.glob(".model_repo.old-*"))) == 1

    reclaim_stale(final)
    assert (final / "version").read_text() == "old"
    assert _siblings(final) == []


def test_partial_directory_of_a_live_writer_in_this_process_is_left_alone(tmp_path):
    """The writer's lock belongs to its open file, not to its process (flock, not lockf): a reclaim in the writing
    process itself does not take it."""
    final = tmp_path / "out"
    with AtomicDirectory(final) as partial:
        (partial / "data").write_bytes(b"x" * 1000)
        assert reclaim_stale(final) == 0
        assert (partial / "data").is_file()
    assert (final / "data").is_file() and _siblings(final) == []


def test_partial_directories_not_known_to_be_stale_are_left_alone(tmp_path):
    """Without a writer lock (an older exporter's), or locked on another host, a partial directory may still be
    being written: left alone."""
    final = tmp_path / "out"
    unlocked = tmp_path / ".out.partial-older"
    unlocked.mkdir()
    (unlocked / "data.bin").write_bytes(b"x" * 100)
    elsewhere = tmp_path / ".out.partial-elsewhere"
    elsewhere.mkdir()
    (elsewhere / atomic.LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "another-node.invalid"}))
    assert reclaim_stale(final) == 0
    assert _siblings(final) == [".out.partial-elsewhere", ".out.partial-older"]


def test_disk_full_in_a_worker_process_removes_the_partial_output(tiny_gpt2, tmp_path, monkeypatch):
    """ENOSPC raised while a worker process writes: NoSpaceError naming the target, the partial directory removed,
    the previous export untouched."""
    shard_dir = convert_checkpoint(tiny_gpt2, tmp_path, ParallelLayout(1))
    before = {name: hashlib.sha256((shard_dir / name).read_bytes()).digest() for name in _files(shard_dir)}
    original = writer.write_tensor

    def full(tensor, path, append=False):
        if Path(path).name.startswith("model.layers.1."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        original(tensor, path, append)

    monkeypatch.setattr(writer, "write_tensor", full)
    with pytest.raises(NoSpaceError) as raised:
        convert_checkpoint(tiny_gpt2, tmp_path, ParallelLayout(1), processes=2)
    assert raised.value.path == shard_dir and raised.value.written is not None and raised.value.needed > 0
    assert {name: hashlib.sha256((shard_dir / name).read_bytes()).digest() for name in _files(shard_dir)} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["1-gpu"]


# Inside its own mount namespace, on a tmpfs with room for one export of the tiny model but not two.
FULL_DISK = """
import hashlib, json, sys
from pathlib import Path
from exporter import atomic
from exporter.parallel import ParallelLayout
from exporter.runtimes import ModelSettings
from exporter.stages.export import build_repository

mount, checkpoint = map(Path, sys.argv[1:3])
repository = mount / "model_repo"
settings = ModelSettings(name="gpt2", runtime="python", max_batch_size=4, layout=ParallelLayout(1, 1),
                         data_type="fp32", device="cpu")

def digest():
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(repository.rglob("*")) if p.is_file()}

def attempt():
    try:
        build_repository(repository, checkpoint, settings, "fp32")
    except atomic.NoSpaceError as error:
        return {"message": str(error), "path": str(error.path), "needed": error.needed, "free": error.free,
                "written": error.written, "intact": digest() == before,
                "listing": sorted(p.name for p in mount.iterdir())}
    return None

build_repository(repository, checkpoint, settings, "fp32")
before = digest()
out = {"shard_bytes": sum(p.stat().st_size for p in repository.rglob("*.bin"))}
out["refused"] = attempt()  # the check up front: room for one export, not for a second beside it
atomic.check_free_space = lambda *args: None
out["filled"] = attempt()  # without it: the kernel's ENOSPC mid-write
print(json.dumps(out))
"""


def _tmpfs_command(mount: Path, megabytes_size: int) -> list[str]:
    return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
            f'mount -t tmpfs -o size={megabytes_size}m tmpfs "$0" && exec "$@"', str(mount)]


def test_full_disk_on_a_real_small_file_system(tiny_gpt2, tmp_path):
    """A full disk, on a real tmpfs mounted in a user namespace: refused up front with the space needed, and when
    the disk fills mid-write (the check disabled) a clear error; the previous export intact, no partial left."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    probe = subprocess.run(_tmpfs_command(mount, 1) + ["true"], capture_output=True, text=True)
    if shutil.which("unshare") is None or probe.returncode != 0:
        pytest.skip(f"needs `unshare --user --mount` (util-linux, user namespaces) to mount a tmpfs: "
                    f"{probe.stderr.strip() or 'no unshare'}")
    # One repository of the tiny GPT-2 (fp32) is about 26 MB, its shard directory about 19: 36 MB hold one, and not
    # the shard directory of a second beside it.
    result = subprocess.run(_tmpfs_command(mount, 36) + [sys.executable, "-c", FULL_DISK, str(mount), str(tiny_gpt2)],
                            cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    repository = str(mount / "model_repo")
    for case in ("refused", "filled"):
        error = out[case]
        assert error is not None, f"{case}: no NoSpaceError"
        assert error["path"] == repository and repository in error["message"] and ".partial" not in error["message"]
        assert error["intact"] and error["listing"] == ["model_repo"]
        assert error["needed"] >= out["shard_bytes"] and megabytes(error["needed"]) in error["message"]
    assert out["refused"]["written"] is None and out["refused"]["free"] < out["refused"]["needed"]
    assert out["filled"]["written"] > 0
