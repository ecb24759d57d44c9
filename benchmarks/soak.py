"""Soak: the served SmolLM2 under the load client for minutes; zero errors and steady server memory, or exit 1.

    python benchmarks/soak.py [--seconds 300] [--warmup 30] [--clients 4] [--timeout 600] [--work-dir /tmp/ft-seed003]

Serves the plain and the decoupled SmolLM2 in one tritonserver (benchmarks/served_smollm2.py: the default model,
fp32, python runtime, CPU; the export is reused from the work dir), then runs `ft-exporter-load`
(exporter/clients/load.py) against both ensembles: its clients cycle through greedy, top-k sampling, beam search
and top-p with penalties and bad/stop word lists, one or two prompts per request, half of the requests streamed.
A warm-up load comes first (torch's allocator and the stubs' buffers settle); then the soak, while the resident
memory of tritonserver and its python backend stubs is sampled every `--every` seconds. Prints requests, errors,
p50/p99 latency and the memory series; writes `<out>/soak.json`. Exit status 1 when any request failed or was
malformed, or when the server's memory at the end of the soak is more than `--rss-limit-mib` (64) above its
level at the end of the warm-up.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import served_smollm2 as served  # noqa: E402

from exporter.clients import load  # noqa: E402
from exporter.serve.tritonserver import TritonServer  # noqa: E402

MIB = 2**20


class RssSampler(threading.Thread):
    """(seconds since start, resident bytes) of a process group every `every_s`, printed every `print_every_s`."""

    def __init__(self, pgid: int, every_s: float, print_every_s: float = 30.0):
        super().__init__(daemon=True)
        self.pgid, self.every_s, self.print_every_s = pgid, every_s, print_every_s
        self.samples: list[tuple[float, int]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        started, printed = time.monotonic(), -self.print_every_s
        while not self.stop.is_set():
            elapsed = time.monotonic() - started
            self.samples.append((elapsed, served.group_rss(self.pgid)))
            if elapsed - printed >= self.print_every_s:
                print(f"  {elapsed:5.0f} s: server RSS {self.samples[-1][1] / MIB:.0f} MiB, load average "
                      f"{served.load_average()}", flush=True)
                printed = elapsed
            self.stop.wait(self.every_s)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-t", "--seconds", type=float, default=300.0, help="soak duration (after the warm-up)")
    p.add_argument("--warmup", type=float, default=30.0, help="warm-up load before the memory baseline (s)")
    p.add_argument("-n", "--clients", type=int, default=4)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take before it fails")
    p.add_argument("--every", type=float, default=5.0, help="memory sampling period (s)")
    p.add_argument("--rss-limit-mib", type=float, default=64.0, help="allowed growth after the warm-up")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/ft-seed003"), help="export and server log (reused)")
    p.add_argument("--out", type=Path, default=served.ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    if args.seconds <= 0 or args.warmup < 0 or args.clients < 1 or args.every <= 0:
        print("error: --seconds and --every must be > 0, --warmup >= 0, --clients >= 1", file=sys.stderr)
        return 2
    args.work_dir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    repo = served.repository(args.work_dir)
    load_before = served.load_average()
    with TritonServer(repo, args.work_dir / "tritonserver.soak.log", startup_timeout_s=600) as server:
        load_args = load.parser().parse_args(
            ["--http", server.http_url, "--grpc", server.grpc_url, "--ensemble", served.ENSEMBLE,
             "--stream-ensemble", served.STREAM_ENSEMBLE, "-n", str(args.clients), "-t", str(args.warmup),
             "--timeout", str(args.timeout)])
        print(f"server ready: RSS {served.group_rss(server.process.pid) / MIB:.0f} MiB; warm-up {args.warmup:g} s, "
              f"{args.clients} clients", flush=True)
        warmup = load.run_load(load_args) if args.warmup > 0 else None
        if warmup is not None:
            print(f"warm-up: {warmup.summary()}", flush=True)
        sampler = RssSampler(server.process.pid, args.every)
        sampler.start()
        load_args.seconds = args.seconds
        report = load.run_load(load_args)
        sampler.stop.set()
        sampler.join()
        sampler.samples.append((sampler.samples[-1][0] + args.every, served.group_rss(server.process.pid)))
    rss = [value for _, value in sampler.samples]
    growth, peak, low = rss[-1] - rss[0], max(rss), min(rss)
    errors = list(warmup.errors if warmup else []) + report.errors
    result = {"seconds": args.seconds, "warmup_seconds": args.warmup, "clients": args.clients,
              "requests": report.requests, "streamed": sum(1 for _, s in report.latencies if s),
              "errors": len(errors), "requests_per_s": report.requests / args.seconds,
              "p50_ms": 1000 * report.percentile(50), "p99_ms": 1000 * report.percentile(99),
              "rss_mib": {"start": rss[0] / MIB, "end": rss[-1] / MIB, "peak": peak / MIB, "low": low / MIB},
              "rss_series_mib": [[round(t, 1), round(v / MIB, 1)] for t, v in sampler.samples],
              "load_before": load_before, "load_after": served.load_average()}
    (args.out / "soak.json").write_text(json.dumps(result, indent=1) + "\n")
    print(report.summary())
    print(f"server RSS after the warm-up {rss[0] / MIB:.0f} MiB, end {rss[-1] / MIB:.0f} MiB "
          f"(growth {growth / MIB:+.0f} MiB; range {low / MIB:.0f}-{peak / MIB:.0f} MiB over {len(rss)} samples); "
          f"load average {load_before} before, {result['load_after']} after; wrote {args.out / 'soak.json'}")
    for error in errors[:10]:
        print(f"  {error}", file=sys.stderr)
    failed = []
    if errors:
        failed.append(f"{len(errors)} requests failed")
    if growth > args.rss_limit_mib * MIB:
        failed.append(f"server memory grew {growth / MIB:.0f} MiB (limit {args.rss_limit_mib:g})")
    if report.requests == 0:
        failed.append("no request completed")
    if failed:
        print("soak FAILED: " + "; ".join(failed), file=sys.stderr)
        return 1
    print("soak passed: 0 errors, server memory steady")
    return 0


if __name__ == "__main__":
    sys.exit(main())
