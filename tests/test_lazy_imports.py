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
