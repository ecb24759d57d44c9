"""`torch`, imported on first use.

The launcher (main.py) composes the config, opens the checkpoint's config to plan the jobs, and starts the sub-stages;
none of that computes with tensors, yet the modules it reads (the architectures, the readers) are the converter's,
which do. Importing torch there cost a second import of it (2-3 s on a quiet machine) in every command, beside the
sub-stage's own. Those modules take `torch` from here instead: the name works as the module does (`torch.cat`,
`torch.Tensor`, `isinstance(x, torch.Tensor)`), and the real import happens at the first attribute read, in the
sub-stage that converts.

`imports_without_gc()` (templates/ft_python/ft_imports.py, shared with the served model) is for the imports that
bring torch in: the garbage collector paused meanwhile, and what they built frozen out of its later walks;
`openmp_threads_sleep_when_idle()` (the same file) is called by a sub-stage's process before torch loads.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from templates.ft_python.ft_imports import imports_without_gc, openmp_threads_sleep_when_idle


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

__all__ = ["LazyModule", "imports_without_gc", "openmp_threads_sleep_when_idle", "torch"]
