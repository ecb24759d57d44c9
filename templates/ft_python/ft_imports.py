"""Imports that bring torch in, made with Python's cyclic garbage collector paused, then frozen.

The collector runs ~400 times (three of them full collections) while torch builds its ~180 000 objects, nearly
none of them garbage: 0.2-0.3 s of an import of 1.5-2.5 s on this project's 2-core machine. Afterwards those
objects are frozen out of the collector's reach (gc.freeze), so that the collections to come do not walk them
(~120 ms for each full one in a process that holds torch and the runtime). The price: the few cycles that became
garbage during the import are frozen with the rest and never freed (7 000 objects, 0.65 MB, for torch and the
runtime).

Used by a served model's process (model.py, model_t5.py: the stub imports this from the model's directory before
torch) and by the exporter's sub-stages (exporter/lazy.py). Self-contained: stdlib only.
"""

import contextlib
import gc
import sys


@contextlib.contextmanager
def imports_without_gc(heavy="torch"):
    """Pause the collector for the imports inside, then freeze every object there is and resume the collector as
    it was; all this only if the module `heavy` they bring in is not imported yet (a process that has it, e.g. a
    test session, keeps its collector as it is: what a freeze would pin there is not only the import's)."""
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
