"""exporter/lazy.py: torch imported on first use, and the heavy imports made with the garbage collector paused."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A fresh interpreter (the pause and the freeze act on the whole process: not on the test session's).
PROBE = """
import gc, json, sys
sys.path.insert(0, {root!r})
from exporter.lazy import imports_without_gc
seen = {{"frozen_before": gc.get_freeze_count()}}
try:
    with imports_without_gc("fractions"):
        seen["enabled_inside"] = gc.isenabled()
        import fractions
        raise KeyError("inside")
except KeyError:
    pass
seen["enabled_after"] = gc.isenabled()
seen["frozen_after"] = gc.get_freeze_count()
print(json.dumps(seen))
"""


def test_heavy_import_runs_with_the_collector_paused_then_frozen_and_resumed():
    done = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT))], capture_output=True, text=True,
                          check=True)
    seen = json.loads(done.stdout)
    assert seen["enabled_inside"] is False
    assert seen["enabled_after"] is True  # resumed although the block raised
    assert seen["frozen_after"] > seen["frozen_before"]  # what the import built is out of the collector's walks


def test_a_process_that_has_the_module_keeps_its_collector_as_it_is():
    from exporter.lazy import imports_without_gc

    assert "json" in sys.modules
    frozen = gc.get_freeze_count()
    with imports_without_gc("json"):
        assert gc.isenabled()
    assert gc.isenabled() and gc.get_freeze_count() == frozen


def test_lazy_module_imports_on_first_attribute_read():
    from exporter.lazy import LazyModule

    probe = LazyModule("json")
    assert "not imported yet" in repr(probe)
    assert probe.dumps({"a": 1}) == json.dumps({"a": 1})
    assert "imported" in repr(probe) and "not" not in repr(probe)


# A sub-stage's process as exporter/run_substage.py starts it, its work replaced by loading torch; libgomp itself
# reports the wait policy it read when it loaded (OMP_DISPLAY_ENV=VERBOSE, on stderr).
SUBSTAGE_PROBE = """
import sys
sys.path.insert(0, {root!r})
import exporter.run_substage as run_substage
from exporter.lazy import torch
run_substage.run = lambda args: torch.zeros(1)
sys.exit(run_substage.main(["unused.yaml", "export", "convert"]))
"""


def _openmp_settings(env: dict[str, str]) -> dict[str, str]:
    done = subprocess.run([sys.executable, "-c", SUBSTAGE_PROBE.format(root=str(ROOT))], capture_output=True,
                          text=True, check=True, env=env)
    settings = {}
    for line in done.stderr.splitlines():
        name, equals, value = line.strip().partition(" = ")
        if equals:
            settings[name] = value.strip("'")
    return settings


def test_a_sub_stage_loads_openmp_with_threads_that_sleep_when_idle():
    import os

    env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    env["OMP_DISPLAY_ENV"] = "VERBOSE"
    settings = _openmp_settings(env)
    # libgomp's own default spins 300 000 times before a pool thread sleeps; PASSIVE never spins.
    assert settings["OMP_WAIT_POLICY"] == "PASSIVE"
    assert settings["GOMP_SPINCOUNT"] == "0"
    settings = _openmp_settings({**env, "OMP_WAIT_POLICY": "ACTIVE"})  # the user's choice is kept
    assert settings["OMP_WAIT_POLICY"] == "ACTIVE"
    assert settings["GOMP_SPINCOUNT"] != "0"
