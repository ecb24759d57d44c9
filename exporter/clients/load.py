"""Bounded load through the ensemble: N concurrent clients for M seconds, mixed parameters, streaming on and off.

    ft-exporter-load --http 127.0.0.1:8000 --grpc 127.0.0.1:8001 --clients 8 --seconds 20 \
        --stream-ensemble ensemble       # a decoupled export's ensemble; omit to send plain requests only

Every response is checked for form (shapes, utf-8, lengths within bounds; streamed text only grows). Prints N, M,
requests/s and p50/p99 latency; exit status 1 if any request failed or was malformed (or took longer than
--timeout, 120 s by default). Loopback use: it sends as fast as the server answers.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from . import common

PROMPTS = ["Thank you for", "Q: Are you going for lunch?", "The capital of France is", "Once upon a time, there",
           "héllo wörld 🤗"]
# Mixed per-request parameters: greedy, top-k and top-p sampling, beam search, penalties and word lists.
MIX = [
    dict(output_len=8),
    dict(output_len=12, top_k=5, seed=7),
    dict(output_len=6, beam_width=2, len_penalty=1.0),
    dict(output_len=10, top_p=0.9, temperature=0.8, repetition_penalty=1.2, bad_words=" the", stop_words="."),
]


@dataclass
class LoadReport:
    clients: int
    seconds: float
    latencies: list = field(default_factory=list)  # (seconds, streamed)
    errors: list = field(default_factory=list)

    @property
    def requests(self) -> int:
        return len(self.latencies) + len(self.errors)

    def percentile(self, q: float, streamed: bool | None = None) -> float:
        values = [t for t, s in self.latencies if streamed is None or s == streamed]
        return float(np.percentile(values, q)) if values else float("nan")

    def summary(self) -> str:
        streamed = sum(1 for _, s in self.latencies if s)
        return (f"load: N={self.clients} clients, M={self.seconds:g} s: {self.requests} requests "
                f"({streamed} streamed), {self.requests / self.seconds:.2f} requests/s, "
                f"latency p50 {1000 * self.percentile(50):.0f} ms, p99 {1000 * self.percentile(99):.0f} ms "
                f"(plain p50 {1000 * self.percentile(50, False):.0f} ms, "
                f"streamed p50 {1000 * self.percentile(50, True):.0f} ms), {len(self.errors)} errors")


def _check_plain(result: common.Result, rows: int, spec: dict) -> None:
    beams = spec.get("beam_width", 1)
    text, lengths = result["OUTPUT_0"], result["sequence_length"]
    if text.shape != (rows, beams) or lengths.shape != (rows, beams):
        raise ValueError(f"shapes OUTPUT_0 {text.shape}, sequence_length {lengths.shape}; expected ({rows}, {beams})")
    for item in text.reshape(-1):
        item.decode("utf-8")
    if (lengths > result["output_ids"].shape[-1]).any() or (lengths < 1).any():
        raise ValueError(f"sequence_length {lengths.tolist()} outside [1, {result['output_ids'].shape[-1]}]")


def _check_stream(responses: list, rows: int, spec: dict) -> None:
    if not responses or not responses[-1].final:
        raise ValueError("stream ended without a final response")
    if len(responses) > spec["output_len"] + 1:
        raise ValueError(f"{len(responses)} responses for {spec['output_len']} tokens")
    texts = [r["OUTPUT_0"][0, 0].decode("utf-8") for r in responses]
    if responses[-1]["OUTPUT_0"].shape[0] != rows:
        raise ValueError(f"final OUTPUT_0 has {responses[-1]['OUTPUT_0'].shape[0]} rows, expected {rows}")
    if spec.get("beam_width", 1) == 1 and any(not b.startswith(a) for a, b in zip(texts, texts[1:])):
        raise ValueError(f"streamed text did not grow: {texts}")


def _client(index: int, args, deadline: float, report: LoadReport, lock: threading.Lock) -> None:
    count = 0
    while time.monotonic() < deadline:
        spec = dict(MIX[(index + count) % len(MIX)])
        prompts = [PROMPTS[(index + count + i) % len(PROMPTS)] for i in range(1 + (count % 2))]
        streamed = args.stream_ensemble is not None and (index + count) % 2 == 1
        count += 1
        options = {k: v for k, v in spec.items() if k != "output_len"}
        arrays = common.ensemble_arrays(prompts, spec["output_len"], **options)
        started = time.monotonic()
        try:
            if streamed:
                _check_stream(common.stream(args.grpc, args.stream_ensemble, arrays, output_names=["OUTPUT_0"],
                                            timeout_s=args.timeout), len(prompts), spec)
            else:
                client = common.protocol_module("http").InferenceServerClient(args.http, network_timeout=args.timeout)
                try:
                    _check_plain(common.infer(args.http, "http", args.ensemble, arrays, client=client), len(prompts),
                                 spec)
                finally:
                    client.close()
        except Exception as error:  # noqa: BLE001 - every failure is counted and reported
            with lock:
                report.errors.append(f"client {index} ({'stream' if streamed else 'plain'} {spec}): {error}")
            continue
        with lock:
            report.latencies.append((time.monotonic() - started, streamed))


def run_load(args: argparse.Namespace) -> LoadReport:
    report, lock = LoadReport(args.clients, args.seconds), threading.Lock()
    deadline = time.monotonic() + args.seconds
    threads = [threading.Thread(target=_client, args=(i, args, deadline, report, lock), daemon=True)
               for i in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(args.seconds + args.timeout + 60)  # a request started just before the deadline may still finish
    return report


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ft-exporter-load", description=__doc__.splitlines()[0])
    p.add_argument("--http", default=common.DEFAULT_URLS["http"], help="host:port of the HTTP endpoint")
    p.add_argument("--grpc", default=common.DEFAULT_URLS["grpc"], help="host:port of the gRPC endpoint")
    p.add_argument("--ensemble", default="ensemble", help="plain ensemble (HTTP requests)")
    p.add_argument("--stream-ensemble", default=None, help="decoupled ensemble for the streamed half (gRPC)")
    p.add_argument("-n", "--clients", type=int, default=8)
    p.add_argument("-t", "--seconds", type=float, default=20.0)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a request may take before it counts as failed")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.clients < 1 or args.seconds <= 0:
        print("error: --clients must be >= 1 and --seconds > 0", file=sys.stderr)
        return 2
    report = run_load(args)
    print(report.summary())
    for error in report.errors[:10]:
        print(f"  {error}", file=sys.stderr)
    return 0 if not report.errors else 1


if __name__ == "__main__":
    sys.exit(main())
