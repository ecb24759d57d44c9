"""Imports that bring torch in, made with Python's cyclic garbage collector paused, then frozen.

The collector runs ~400 times (three of them full collections) while torch builds its ~180 000 objects, nearly
none of them garbage: 0.2-0.3 s of an import of 1.5-2.5 s on this project's 2-core machine. Afterwards those
objects are frozen out of the collector's reach (gc.freeze), so that the collections to come do not walk them
(~120 ms for each full one in a process that holds torch and the runtime). The price: the few cycles that became
garbage during the import are frozen with the rest and never freed (7 000 objects, 0.65 MB, for torch and the
runtime).

Used by a served model's process (model.py, model_t5.py: the stub imports this from the model's directory before
torch) and by the exporter's sub-stages (exporter/lazy.py). Self-contained: stdlib only.

`openmp_threads_sleep_when_idle()` is for the same processes, before torch loads: see there.
"""

import contextlib
import gc
import os
import sys


def openmp_threads_sleep_when_idle():
    """Ask OpenMP (read once, when torch loads it) for pool threads that sleep between parallel regions instead of
    spinning, unless the environment already says OMP_WAIT_POLICY. On this project's 2-core machine the spinning
    thread competes with the process's own other threads and with its neighbours: a served model shares its cores
    with Triton, the other models and the clients (decoding was 5-10x slower on a busy machine,
    benchmarks/serving.py --omp-wait-policy); the converter's reader and writer threads run beside the casts, whose
    pool spent ~0.8 CPU-s spinning in a GPT-2-medium conversion of 1.6 s (benchmarks/convert_gpt2_medium.py). Set
    the variable to ACTIVE to spin on dedicated cores. Does nothing once torch is loaded."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


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
