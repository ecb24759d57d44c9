"""Progress of long work as people expect it: done/total, rate and time left.

On a terminal (stderr is a TTY) a tqdm bar, with log records routed around it. Elsewhere (a Slurm job's log file,
a sub-stage whose output the launcher tees) a bar's carriage-return redraws would pile up in the file, so the same
figures go out as one log line at most every LOG_INTERVAL_S seconds, and one when the work ends.

EXPORTER_PROGRESS=bar|log|off overrides the choice; the interactive launcher, which pipes a sub-stage's output,
passes on whether its own stderr is a terminal.
"""

from __future__ import annotations

import logging
import os
import sys
import time

ENV = "EXPORTER_PROGRESS"
MODES = ("bar", "log", "off")
LOG_INTERVAL_S = 30.0
_FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]"


def mode() -> str:
    chosen = os.environ.get(ENV, "").strip().lower()
    if chosen in MODES:
        return chosen
    return "bar" if sys.stderr.isatty() else "log"


if mode() != "bar":
    # Other libraries' bars (transformers de-quantising a GGUF: 272 redraws) would pile up in a log file too; tqdm
    # reads this when first imported, so it quiets those imported after this module.
    os.environ.setdefault("TQDM_DISABLE", "1")

from tqdm import tqdm  # noqa: E402
from tqdm.contrib.logging import logging_redirect_tqdm  # noqa: E402


def duration(seconds: float) -> str:
    """[h:]mm:ss, as the bars show it."""
    return tqdm.format_interval(seconds)


class Progress:
    """`with Progress(total, "what", unit="B") as progress: ... progress.update(n)`; unit "B" shows bytes (MB)."""

    def __init__(self, total: int, description: str, unit: str = "it", logger: logging.Logger | None = None,
                 interval_s: float = LOG_INTERVAL_S):
        self.total, self.description, self.unit = total, description, unit
        self.scale = unit == "B"
        self.log = logger or logging.getLogger(__name__)
        self.interval_s = interval_s
        self.mode = mode()
        self.done = 0
        self.started = self.last_line = time.monotonic()
        self._bar: tqdm | None = None
        self._redirect = None

    def __enter__(self) -> Progress:
        if self.mode == "bar":
            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()
            self._bar = tqdm(total=self.total, desc=self.description, unit=self.unit, unit_scale=self.scale,
                             file=sys.stderr, mininterval=0.5, dynamic_ncols=True, disable=False)
        return self

    def update(self, amount: int) -> None:
        self.done += amount
        if self._bar is not None:
            self._bar.update(amount)
        elif self.mode == "log" and time.monotonic() - self.last_line >= self.interval_s and self.done < self.total:
            self.log.info("%s", self.line())
            self.last_line = time.monotonic()

    def line(self) -> str:
        """The figures a bar shows, as text: '<what>: 40% 4.00M/10.0M [00:02<00:03, 2.00MB/s]'."""
        return tqdm.format_meter(self.done, self.total, time.monotonic() - self.started, prefix=self.description,
                                 unit=self.unit, unit_scale=self.scale, bar_format=_FORMAT)

    def __exit__(self, exc_type, exc, traceback) -> None:
        if self._bar is not None:
            self._bar.close()
            self._redirect.__exit__(exc_type, exc, traceback)
        elif self.mode == "log" and exc_type is None:
            self.log.info("%s", self.line())
