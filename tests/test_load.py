"""Bounded load through the ensemble (exporter/clients/load.py): N clients for M seconds, mixed parameters,
streaming on and off, over loopback. Zero errors, every response well formed, server memory steady; prints N, M,
requests/s and p50/p99 latency (run with -s to see them)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from exporter.clients import load
from serving_fixtures import ENSEMBLE, STREAM_ENSEMBLE

pytestmark = [pytest.mark.triton, pytest.mark.slow]

CLIENTS, WARMUP_S, SECONDS = 8, 5.0, 20.0
# Allowed growth of the server's resident memory between the end of the warm-up and the end of the load.
# Measured here (2 cores): a few MiB either way.
RSS_GROWTH_LIMIT = 64 * 2**20


def group_rss(pgid: int) -> int:
    """Resident bytes of every process in process group `pgid` (tritonserver and its python backend stubs)."""
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rfind(")") + 2:].split()
            if int(fields[2]) == pgid:
                total += int((entry / "statm").read_text().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
    return total


class RssSampler(threading.Thread):
    def __init__(self, pgid: int, every_s: float = 0.5):
        super().__init__(daemon=True)
        self.pgid, self.every_s, self.samples, self.stop = pgid, every_s, [], threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.samples.append((time.monotonic(), group_rss(self.pgid)))
            self.stop.wait(self.every_s)


def test_load_mixed_parameters_streaming_on_and_off(served):
    args = load.parser().parse_args(["--http", served.http_url, "--grpc", served.grpc_url, "--ensemble", ENSEMBLE,
                                     "--stream-ensemble", STREAM_ENSEMBLE, "-n", str(CLIENTS),
                                     "-t", str(WARMUP_S)])
    warmup = load.run_load(args)  # torch's allocator and the stubs' buffers settle first
    assert not warmup.errors, warmup.errors[:5]
    sampler = RssSampler(served.server.process.pid)
    sampler.start()
    args.seconds = SECONDS
    report = load.run_load(args)
    sampler.stop.set()
    sampler.join()
    print("\n" + report.summary())
    assert not report.errors, report.errors[:5]
    assert report.requests >= CLIENTS  # every client got answers
    assert {s for _, s in report.latencies} == {True, False}  # both modes were exercised
    rss = [value for _, value in sampler.samples]
    start, end, peak = rss[0], rss[-1], max(rss)
    print(f"server RSS (tritonserver + stubs): start {start / 2**20:.0f} MiB, end {end / 2**20:.0f} MiB, "
          f"peak {peak / 2**20:.0f} MiB over {len(rss)} samples")
    assert end - start <= RSS_GROWTH_LIMIT, f"server memory grew {(end - start) / 2**20:.0f} MiB under load"
