"""`torch`, imported on first use.

The launcher (main.py) composes the config, opens the checkpoint's config to plan the jobs, and starts the sub-stages;
none of that computes with tensors, yet the modules it reads (the architectures, the readers) are the converter's,
which do. Importing torch there cost a second import of it (2-3 s on a quiet machine) in every command, beside the
sub-stage's own. Those modules take `torch` from here instead: the name works as the module does (`torch.cat`,
`torch.Tensor`, `isinstance(x, torch.Tensor)`), and the real import happens at the first attribute read, in the
sub-stage that converts.

`imports_without_gc()` is for the imports that bring torch in: Python's cyclic garbage collector runs ~400 times
(three of them full collections) while torch builds its ~180 000 objects, nearly none of them garbage: 0.2-0.3 s of
an import of 1.8-2.5 s on this project's 2-core machine. Afterwards those objects are frozen out of the collector's
reach, so that the collections to come do not walk them (~120 ms for each full one in a process that holds torch
and the runtime). The price: the few cycles that became garbage during the import are frozen with the rest and
never freed (7 000 objects, 0.65 MB, for torch and the runtime).
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import sys
from types import ModuleType


@contextlib.contextmanager
def imports_without_gc(heavy: str = "torch"):
    """Pause the cyclic garbage collector for the imports inside, then freeze every object there is (gc.freeze)
    and resume the collector as it was; all this only if the module `heavy` they bring in is not imported yet (a
    process that has it, e.g. a test session, keeps its collector as it is: what a freeze would pin there is not
    only the import's)."""
    if heavy in sys.modules:
        yield
        return
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


class LazyModule:
    """A stand-in for the module `name` that imports it when one of its attributes is first read."""

    def __init__(self, name: str):
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attribute: str):
        module = self._module
        if module is None:
            with imports_without_gc(self._name):
                module = self._module = importlib.import_module(self._name)
        return getattr(module, attribute)

    def __repr__(self) -> str:
        state = "imported" if self._module is not None else "not imported yet"
        return f"<lazy module {self._name!r} ({state})>"


torch = LazyModule("torch")

__all__ = ["LazyModule", "imports_without_gc", "torch"]
