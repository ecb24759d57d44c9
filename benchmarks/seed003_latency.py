"""Benchmark: seed 003 §4's latency table and a concurrency sweep for the served SmolLM2, with NVIDIA's tools.

    python benchmarks/seed003_latency.py [--quick] [--work-dir /tmp/ft-seed003] [--out benchmarks/results]

One run: export SmolLM2-135M-Instruct (fp32, python runtime, CPU; plain and decoupled, benchmarks/served_smollm2.py;
reused from the work dir when already there), start one tritonserver, then

1. the three use cases at batch size 1 -- Question Answering (60 tokens in / 20 out), Intent Classification
   (225 / 20), Translation (200 / 200) -- with `perf_analyzer` against the model itself (`smollm2`, gRPC):
   `--input-data` JSON of `input_ids` (exactly that many tokens of LAMBADA text), `input_lengths`,
   `request_output_len` and an `end_id` the model does not generate (`<empty_output>`), so every request decodes
   exactly the output length; one request per use case checks the returned `sequence_length` first;
2. a concurrency sweep (1, 2, 4, 8, 16) of the Question Answering case: `perf_analyzer` against `smollm2`
   (plain responses: requests/s, tokens/s, p50/p99 latency) and GenAI-Perf against `trtllm_stream` (TensorRT-LLM's
   names, streamed: time to first token, request latency, throughput);

and write `<out>/seed003_latency.md` (tables), `.json` (every figure) and `.png` (the sweep plotted). The load
average is recorded before and after: the machine is shared, the timings are noisy.
`--quick` sends one request per use case and per client.
Needs `scripts/install_perf_analyzer.sh` (perf_analyzer on PATH or in this interpreter's bin), `genai-perf` and
matplotlib (`pip install -e ".[bench]"`).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import served_smollm2 as served  # noqa: E402

from exporter.serve.tritonserver import TritonServer  # noqa: E402

END_ID = 16  # "<empty_output>": a StarCoder data marker SmolLM2 does not produce after prose; lengths are checked


@dataclass(frozen=True)
class UseCase:
    name: str
    input_tokens: int
    output_tokens: int


USE_CASES = (UseCase("Question Answering", 60, 20), UseCase("Intent Classification", 225, 20),
             UseCase("Translation", 200, 200))
SWEEP_CASE = USE_CASES[0]
CONCURRENCY = (1, 2, 4, 8, 16)


def tool(name: str) -> str:
    """`name` from PATH or beside this interpreter (the virtual environment's bin); an error saying how to get it."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        hint = "scripts/install_perf_analyzer.sh" if name == "perf_analyzer" else "pip install genai-perf"
        raise SystemExit(f"error: {name} not found on PATH or in {Path(sys.executable).parent}: {hint}")
    return found


def prompt_ids(repo: Path, count: int, offset: int) -> list[int]:
    """`count` token ids of LAMBADA text (the served tokenizer), starting `offset` tokens in."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(served.tokenizer_file(repo)))
    lines = (served.ROOT / "exporter" / "data" / "lambada_test.jsonl").read_text().splitlines()
    ids: list[int] = []
    for line in lines:
        ids += tokenizer.encode(json.loads(line)["text"] + "\n\n", add_special_tokens=False).ids
        if len(ids) >= offset + count:
            return ids[offset:offset + count]
    raise RuntimeError("not enough LAMBADA text")  # pragma: no cover - 5153 passages


def model_inputs(ids: list[int], output_tokens: int) -> dict[str, np.ndarray]:
    return {"input_ids": np.array([ids], dtype=np.uint32), "input_lengths": np.array([[len(ids)]], dtype=np.uint32),
            "request_output_len": np.array([[output_tokens]], dtype=np.uint32),
            "end_id": np.array([[END_ID]], dtype=np.uint32)}


def check_exact(grpc_url: str, ids: list[int], case: UseCase) -> float:
    """One request; its sequence_length must be prompt + output tokens exactly. Returns its latency (s)."""
    from exporter.clients import common

    started = time.monotonic()
    result = common.infer(grpc_url, "grpc", served.MODEL, model_inputs(ids, case.output_tokens),
                          output_names=["sequence_length"])
    seconds = time.monotonic() - started
    length = int(result["sequence_length"].reshape(-1)[0])
    if length != case.input_tokens + case.output_tokens:
        raise SystemExit(f"error: {case.name}: sequence_length {length}, expected "
                         f"{case.input_tokens} + {case.output_tokens} (end_id {END_ID} generated?)")
    return seconds


def warm_stream(grpc_url: str) -> None:
    """One short streamed request to the decoupled model (its first request pages its weights in)."""
    from exporter.clients import common

    common.stream(grpc_url, served.STREAM_TRTLLM, {"text_input": common.text_array(["Hello"]),
                                                   "max_tokens": np.array([[4]], dtype=np.int32),
                                                   "stream": np.array([[True]])}, output_names=["text_output"])


def write_input_data(path: Path, ids: list[int], output_tokens: int) -> Path:
    """perf_analyzer's --input-data: one request of these ids (dims per row; batch size 1 is -b 1)."""
    row = {"input_ids": {"content": ids, "shape": [len(ids)]}, "input_lengths": [len(ids)],
           "request_output_len": {"content": [output_tokens], "shape": [1]}, "end_id": [END_ID]}
    path.write_text(json.dumps({"data": [row]}))
    return path


def perf_analyzer(binary: str, grpc_url: str, data: Path, concurrency: int, requests: int, csv_path: Path) -> dict:
    """One perf_analyzer measurement of `requests` requests at `concurrency`; the CSV row, latencies in ms."""
    argv = [binary, "-m", served.MODEL, "-i", "grpc", "-u", grpc_url, "-b", "1", "--input-data", str(data),
            "--concurrency-range", f"{concurrency}", "--request-count", str(requests),
            "--measurement-mode", "count_windows", "--percentile", "99", "-f", str(csv_path)]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    if run.returncode != 0:
        raise SystemExit(f"error: perf_analyzer exited {run.returncode}: {' '.join(argv)}\n{run.stdout[-3000:]}"
                         f"{run.stderr[-2000:]}")
    with open(csv_path) as f:
        row = next(csv.DictReader(f))
    us = {key: float(value) for key, value in row.items() if key and value and value.replace(".", "").isdigit()}
    latency_keys = ("Client Send", "Network+Server Send/Recv", "Server Queue", "Server Compute Input",
                    "Server Compute Infer", "Server Compute Output", "Client Recv")
    average_us = sum(us.get(key, 0.0) for key in latency_keys)
    return {"concurrency": concurrency, "requests": requests, "requests_per_s": us["Inferences/Second"],
            "average_ms": average_us / 1000, "p50_ms": us["p50 latency"] / 1000, "p99_ms": us["p99 latency"] / 1000}


def genai_perf(binary: str, analyzer: str, grpc_url: str, tokenizer: Path, case: UseCase, concurrency: int,
               requests: int, artifacts: Path) -> dict:
    """GenAI-Perf, streaming, against the TensorRT-LLM-named decoupled model; its figures (ms, per second)."""
    argv = [binary, "profile", "-m", served.STREAM_TRTLLM, "--backend", "tensorrtllm", "--endpoint-type", "kserve",
            "--streaming", "-u", grpc_url, "--tokenizer", str(tokenizer),
            "--synthetic-input-tokens-mean", str(case.input_tokens), "--synthetic-input-tokens-stddev", "0",
            "--output-tokens-mean", str(case.output_tokens), "--output-tokens-stddev", "0",
            "--extra-inputs", f"end_id:{END_ID}", "--concurrency", str(concurrency),
            "--request-count", str(requests), "--warmup-request-count", "0", "--num-dataset-entries", "16",
            "--random-seed", "3", "--artifact-dir", str(artifacts)]
    # GenAI-Perf runs `perf_analyzer` from PATH: the one this run uses goes first.
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(analyzer).parent), os.environ.get("PATH", "")])}
    run = subprocess.run(argv, capture_output=True, text=True, timeout=900, env=env)
    exports = sorted(artifacts.rglob("*genai_perf.json"))
    if run.returncode != 0 or not exports:
        raise SystemExit(f"error: genai-perf exited {run.returncode}: {' '.join(argv)}\n{run.stdout[-3000:]}"
                         f"{run.stderr[-3000:]}")
    metrics = json.loads(exports[-1].read_text())

    def stat(name: str, key: str) -> float:
        return float(metrics[name][key])

    return {"concurrency": concurrency, "requests": requests,
            "ttft_p50_ms": stat("time_to_first_token", "p50"), "ttft_p99_ms": stat("time_to_first_token", "p99"),
            "ttft_avg_ms": stat("time_to_first_token", "avg"),
            "latency_p50_ms": stat("request_latency", "p50"), "latency_p99_ms": stat("request_latency", "p99"),
            "requests_per_s": stat("request_throughput", "avg"),
            "tokens_per_s": stat("output_token_throughput", "avg"),
            "input_tokens_avg": stat("input_sequence_length", "avg"),
            "output_tokens_avg": stat("output_sequence_length", "avg")}


def sweep_requests(concurrency: int, quick: bool) -> int:
    """Requests per concurrency level: each client sends at least one (--quick) or two, and at least 8 in all."""
    return concurrency if quick else max(2 * concurrency, 8)


def markdown(report: dict) -> str:
    lines = [f"SmolLM2-135M-Instruct fp32, python runtime, CPU ({os.cpu_count()} cores); load average (1 / 5 / 15 min) "
             f"{report['load_before']} before, {report['load_after']} after; {report['seconds']:.0f} s in all.", "",
             "| use case (batch size 1) | tokens in / out | average latency (ms) | requests | tool |",
             "|---|---|---|---|---|"]
    for row in report["use_cases"]:
        lines.append(f"| {row['name']} | {row['input_tokens']} / {row['output_tokens']} | {row['average_ms']:.0f} "
                     f"| {row['requests']} | perf_analyzer |")
    case = report["sweep_case"]
    lines += ["", f"Concurrency sweep, {case['name']} ({case['input_tokens']} in / {case['output_tokens']} out); "
              "plain: perf_analyzer against `smollm2`; streamed: GenAI-Perf against `trtllm_stream`:", "",
              "| concurrency | plain requests/s | plain tokens/s | plain p50 / p99 ms | streamed requests/s "
              "| streamed tokens/s | streamed p50 / p99 ms | time to first token p50 / p99 ms |",
              "|---|---|---|---|---|---|---|---|"]
    for plain, stream in zip(report["perf_analyzer_sweep"], report["genai_perf_sweep"]):
        lines.append(f"| {plain['concurrency']} | {plain['requests_per_s']:.2f} "
                     f"| {plain['requests_per_s'] * case['output_tokens']:.1f} "
                     f"| {plain['p50_ms']:.0f} / {plain['p99_ms']:.0f} | {stream['requests_per_s']:.2f} "
                     f"| {stream['tokens_per_s']:.1f} "
                     f"| {stream['latency_p50_ms']:.0f} / {stream['latency_p99_ms']:.0f} "
                     f"| {stream['ttft_p50_ms']:.0f} / {stream['ttft_p99_ms']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plain, stream = report["perf_analyzer_sweep"], report["genai_perf_sweep"]
    levels = [row["concurrency"] for row in plain]
    tokens = report["sweep_case"]["output_tokens"]
    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.2))
    left.plot(levels, [r["requests_per_s"] * tokens for r in plain], "o-", label="plain (perf_analyzer)")
    left.plot(levels, [r["tokens_per_s"] for r in stream], "s-", label="streamed (GenAI-Perf)")
    left.set(title="throughput", ylabel="generated tokens / s")
    middle.plot(levels, [r["p50_ms"] for r in plain], "o-", label="plain p50")
    middle.plot(levels, [r["p99_ms"] for r in plain], "o--", label="plain p99")
    middle.plot(levels, [r["latency_p50_ms"] for r in stream], "s-", label="streamed p50")
    middle.plot(levels, [r["latency_p99_ms"] for r in stream], "s--", label="streamed p99")
    middle.set(title="request latency", ylabel="ms")
    right.plot(levels, [r["ttft_p50_ms"] for r in stream], "s-", label="p50")
    right.plot(levels, [r["ttft_p99_ms"] for r in stream], "s--", label="p99")
    right.set(title="time to first token (streamed)", ylabel="ms")
    for axes in (left, middle, right):
        axes.set_xscale("log", base=2)
        axes.set_xticks(levels, [str(level) for level in levels])
        axes.set_xlabel("concurrent clients")
        axes.grid(alpha=0.3)
        axes.legend()
    case = report["sweep_case"]
    figure.suptitle(f"SmolLM2-135M-Instruct fp32 on {os.cpu_count()} CPU cores, python runtime: {case['name']} "
                    f"({case['input_tokens']} in / {case['output_tokens']} out); load average "
                    f"{report['load_before']}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/ft-seed003"), help="export and server log (reused)")
    p.add_argument("--out", type=Path, default=served.ROOT / "benchmarks" / "results")
    p.add_argument("--quick", action="store_true", help="fewer requests per figure")
    args = p.parse_args(argv)
    analyzer, genai = tool("perf_analyzer"), tool("genai-perf")
    started, load_before = time.monotonic(), served.load_average()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = args.work_dir / "runs"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    repo = served.repository(args.work_dir)
    tokenizer = served.genai_perf_tokenizer(repo, args.work_dir)
    print(f"repository {repo} ({time.monotonic() - started:.0f} s); load average {load_before}", flush=True)
    report = {"load_before": load_before, "sweep_case": vars(SWEEP_CASE), "use_cases": []}
    partial = args.work_dir / "seed003_latency.partial.json"  # the figures so far, should the run be cut short
    with TritonServer(repo, args.work_dir / "tritonserver.log", startup_timeout_s=600) as server:
        print(f"server ready ({time.monotonic() - started:.0f} s)", flush=True)
        for index, case in enumerate(USE_CASES):
            ids = prompt_ids(repo, case.input_tokens, offset=1000 * index)
            first = check_exact(server.grpc_url, ids, case)  # also the warm-up of this shape
            data = write_input_data(scratch / f"use_case_{index}.json", ids, case.output_tokens)
            requests = 1 if args.quick else 2 if case.output_tokens > 100 else 5
            row = perf_analyzer(analyzer, server.grpc_url, data, 1, requests, scratch / f"use_case_{index}.csv")
            report["use_cases"].append({**vars(case), **row, "first_request_ms": 1000 * first})
            partial.write_text(json.dumps(report, indent=1) + "\n")
            print(f"{case.name}: {row['average_ms']:.0f} ms average over {requests} requests "
                  f"(p50 {row['p50_ms']:.0f} ms) [{time.monotonic() - started:.0f} s]", flush=True)
        warm_stream(server.grpc_url)
        data = write_input_data(scratch / "sweep.json", prompt_ids(repo, SWEEP_CASE.input_tokens, 0),
                                SWEEP_CASE.output_tokens)
        report["perf_analyzer_sweep"], report["genai_perf_sweep"] = [], []
        for concurrency in CONCURRENCY:
            requests = sweep_requests(concurrency, args.quick)
            plain = perf_analyzer(analyzer, server.grpc_url, data, concurrency, requests,
                                  scratch / f"sweep_{concurrency}.csv")
            stream = genai_perf(genai, analyzer, server.grpc_url, tokenizer, SWEEP_CASE, concurrency, requests,
                                scratch / f"genai_perf_{concurrency}")
            report["perf_analyzer_sweep"].append(plain)
            report["genai_perf_sweep"].append(stream)
            partial.write_text(json.dumps(report, indent=1) + "\n")
            print(f"concurrency {concurrency}: plain {plain['requests_per_s']:.2f} req/s p50 {plain['p50_ms']:.0f} "
                  f"p99 {plain['p99_ms']:.0f} ms; streamed {stream['tokens_per_s']:.1f} tok/s, TTFT p50 "
                  f"{stream['ttft_p50_ms']:.0f} p99 {stream['ttft_p99_ms']:.0f} ms "
                  f"[{time.monotonic() - started:.0f} s]", flush=True)
    report["load_after"], report["seconds"] = served.load_average(), time.monotonic() - started
    table = markdown(report)
    (args.out / "seed003_latency.md").write_text(table)
    (args.out / "seed003_latency.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(report, args.out / "seed003_latency.png")
    print(table)
    print(f"wrote {args.out}/seed003_latency.md, .json, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
