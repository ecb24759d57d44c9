"""Benchmark: convert a GPT-2-medium-shaped checkpoint (355 M params, 1.4 GB fp32 safetensors) to fp16 TP=2.

Prints, from one run: our wall time and peak RSS, a plain `cp` of the checkpoint file (the floor), the peak RSS
of an interpreter that only imports the converter (the baseline), and the largest tensor's size; then whether
the goals hold: wall time within 1.5x of `cp`, peak RSS within 2x the largest tensor plus the interpreter.
Then the whole command a user runs (`python main.py stages=[export]`, accuracy disabled) beside a bare
interpreter start and `import torch` (plain, and with the garbage collector paused as the sub-stage imports it):
its overhead beyond the conversion (goal: at most 3 s), with the sub-stage forked from main.py's process
(EXPORTER_FORK=1, opt-in) and run as a second interpreter (EXPORTER_FORK=0, the default, whose launcher never
imports torch: one import of it is the floor of both), each beside the time of that one import; the second
interpreter started before main.py imports Hydra (the default, exporter/prestart.py) and, as the in-run baseline,
only when the sub-stage runs (EXPORTER_PRESTART=0).

    python benchmarks/convert_gpt2_medium.py [--work-dir /tmp/ft-bench] [--processes 1] [--repeat 3]

The checkpoint is built once, seeded, in the work dir and reused. Each measurement runs in a fresh child process.
The file is read from the page cache in both `cp` and the conversion (the build or an earlier run warmed it), and
neither waits for its writes to reach the disk (no fsync in either; an untimed `sync` runs before each).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPT2_MEDIUM = {
    "architectures": ["GPT2LMHeadModel"],
    "model_type": "gpt2",
    "vocab_size": 50257,
    "n_positions": 1024,
    "n_embd": 1024,
    "n_layer": 24,
    "n_head": 16,
    "n_inner": None,
    "activation_function": "gelu_new",
    "layer_norm_epsilon": 1e-5,
    "bos_token_id": 50256,
    "eos_token_id": 50256,
}

# Runs in a child: the measured work, then its own peak RSS (KiB on Linux), workers included.
CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
started = time.monotonic()
from exporter.lazy import imports_without_gc, openmp_threads_sleep_when_idle
openmp_threads_sleep_when_idle()  # as the sub-stage's process does (exporter/run_substage.py)
with imports_without_gc():  # as the sub-stage imports them
    from exporter.ft.convert import convert_checkpoint
    from exporter.parallel import ParallelLayout
imported, cpu = time.monotonic(), time.process_time()
if {convert}:
    convert_checkpoint({source!r}, {out!r}, ParallelLayout(2), weight_data_type="fp16", processes={processes})
cpu = time.process_time() - cpu + sum(getattr(resource.getrusage(resource.RUSAGE_CHILDREN), key)
                                      for key in ("ru_utime", "ru_stime"))
peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(json.dumps({{"seconds": time.monotonic() - started, "import_seconds": imported - started, "peak_rss_kib": peak,
                  "convert_cpu_seconds": cpu}}))
"""


def build_checkpoint(directory: Path) -> Path:
    """Built in a child process: Linux carries a parent's peak RSS into the children it forks (ru_maxrss survives
    exec), so building it in this process would inflate every later peak-RSS figure (a first run showed 2108 MB)."""
    if not (directory / "model.safetensors").is_file():
        print(f"building a seeded GPT-2-medium-shaped checkpoint in {directory} ...", flush=True)
        code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from exporter.builtin import write_tiny_gpt2; "
                f"write_tiny_gpt2(__import__('pathlib').Path({str(directory)!r}), {GPT2_MEDIUM!r})")
        subprocess.run([sys.executable, "-c", code], check=True)
    return directory


def run_child(source: Path, out: Path, processes: int, convert: bool) -> dict:
    code = CHILD.format(root=str(ROOT), source=str(source), out=str(out), processes=processes, convert=convert)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_seconds"] = time.monotonic() - started
    return result


def time_command(checkpoint: Path, results: Path, processes: int, how: str) -> tuple[float, float, float | None]:
    """(wall, CPU, conversion) seconds of the whole command a user runs (`python main.py stages=[export]`, accuracy
    disabled): Hydra, planning, the convert sub-stage, the repository around the shards. how: "fork" (the sub-stage
    forked from main.py's process, EXPORTER_FORK=1), "early" (a second interpreter main.py starts before it imports
    Hydra, the default: exporter/prestart.py) or "late" (that interpreter started only when the sub-stage runs,
    EXPORTER_PRESTART=0, as before it). conversion: the command's own convert_checkpoint call,
    from its log line (None when the line is not found), so that its overhead is measured against the conversion it
    ran itself: this VM writes new files at 0.3-3 GB/s from one minute to the next."""
    shutil.rmtree(results, ignore_errors=True)
    argv = [sys.executable, "main.py", "stages=[export]", "export.accuracy.enabled=False",
            f"export.model.checkpoint_path={checkpoint}", "export.model.tensor_model_parallel_size=2",
            "export.model.weight_data_type=fp16", f"export.model.processes={processes}",
            f"base_results_dir={results}", f"hydra.run.dir={results}/hydra"]
    env = {**os.environ, "EXPORTER_FORK": "1" if how == "fork" else "0",
           "EXPORTER_PRESTART": "0" if how == "late" else "1", "EXPORTER_PROGRESS": "off"}
    before = _children_cpu()
    started = time.monotonic()
    done = subprocess.run(argv, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    seconds = time.monotonic() - started
    logs = done.stdout + done.stderr + "".join(path.read_text(errors="replace")
                                               for path in sorted(results.rglob("log-*")))
    found = re.search(r"conversion ([0-9.]+)s in all", logs)
    shutil.rmtree(results)
    return seconds, _children_cpu() - before, float(found.group(1)) if found else None


def _children_cpu() -> float:
    """CPU seconds (user + system) of the finished children of this process: on a machine shared with other
    work, CPU time is far steadier than wall time."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_python(code: str) -> tuple[float, float]:
    """(wall, CPU) seconds of a fresh interpreter running `code` (the start-up baselines)."""
    before = _children_cpu()
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.monotonic() - started, _children_cpu() - before


def time_cp(source: Path, destination: Path) -> float:
    started = time.monotonic()
    subprocess.run(["cp", str(source), str(destination)], check=True)
    seconds = time.monotonic() - started
    destination.unlink()
    return seconds


def largest_tensor(source: Path) -> tuple[str, int]:
    with open(source, "rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    header.pop("__metadata__", None)
    name, entry = max(header.items(), key=lambda item: item[1]["data_offsets"][1] - item[1]["data_offsets"][0])
    return name, entry["data_offsets"][1] - entry["data_offsets"][0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/ft-bench"))
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-command", dest="command", action="store_false",
                        help="skip timing the whole `python main.py` command")
    args = parser.parse_args()

    checkpoint = build_checkpoint(args.work_dir / "gpt2-medium")
    source = checkpoint / "model.safetensors"
    out = args.work_dir / "out"
    file_bytes = source.stat().st_size
    name, largest = largest_tensor(source)
    subprocess.run(["cat", str(source)], stdout=subprocess.DEVNULL, check=True)  # same warm page cache for all

    cp_times, ours, baseline, commands, unforked, late = [], [], [], [], [], []
    bare, torch_only, torch_paused, torch_exit = [], [], [], []
    for _ in range(args.repeat):
        # Untimed `sync` before each timed run: neither pays for flushing the other's writes.
        subprocess.run(["sync"], check=True)
        cp_times.append(time_cp(source, args.work_dir / "copy.safetensors"))
        subprocess.run(["sync"], check=True)
        result = run_child(checkpoint, out, args.processes, convert=True)
        ours.append(result)
        shutil.rmtree(out)
        baseline.append(run_child(checkpoint, out, args.processes, convert=False))
        if args.command:
            bare.append(time_python("pass"))
            torch_only.append(time_python("import os, torch; os._exit(0)"))
            # what a command pays for torch: the sub-stage imports it with the collector paused
            # (templates/ft_python/ft_imports.py)
            torch_paused.append(time_python("import gc, os; gc.disable(); import torch; os._exit(0)"))
            torch_exit.append(time_python("import torch"))  # and the interpreter's teardown, which commands skip
            subprocess.run(["sync"], check=True)
            commands.append(time_command(checkpoint, args.work_dir / "results", args.processes, "fork"))
            subprocess.run(["sync"], check=True)
            unforked.append(time_command(checkpoint, args.work_dir / "results", args.processes, "early"))
            subprocess.run(["sync"], check=True)
            late.append(time_command(checkpoint, args.work_dir / "results", args.processes, "late"))

    cp_s = statistics.median(cp_times)
    ours_s = statistics.median(r["seconds"] for r in ours)
    import_s = statistics.median(r["import_seconds"] for r in ours)
    convert_s = statistics.median(r["seconds"] - r["import_seconds"] for r in ours)
    ours_rss = max(r["peak_rss_kib"] for r in ours) * 1024
    base_rss = max(r["peak_rss_kib"] for r in baseline) * 1024
    rss_goal = 2 * largest + base_rss
    mb = 1e6
    print()
    print(f"checkpoint: {source} ({file_bytes / mb:.0f} MB fp32), fp16 TP=2, processes={args.processes}, "
          f"median of {args.repeat}")
    print(f"largest tensor: {name} {largest / mb:.1f} MB")
    print(f"{'':30}{'wall s':>10}{'peak RSS MB':>14}")
    print(f"{'cp (floor)':30}{cp_s:>10.2f}{'':>14}")
    print(f"{'interpreter + imports':30}{'':>10}{base_rss / mb:>14.0f}")
    print(f"{'ours: imports (torch, ...)':30}{import_s:>10.2f}")
    print(f"{'ours: conversion':30}{convert_s:>10.2f}")
    print(f"{'ours: total':30}{ours_s:>10.2f}{ours_rss / mb:>14.0f}")
    print(f"time: conversion {convert_s / cp_s:.2f}x cp, total with imports {ours_s / cp_s:.2f}x cp "
          f"(goal <= 1.5x): conversion {'met' if convert_s <= 1.5 * cp_s else 'NOT met'}, "
          f"total {'met' if ours_s <= 1.5 * cp_s else 'NOT met'}")
    print(f"RSS: {ours_rss / mb:.0f} MB vs 2 x largest + interpreter = {rss_goal / mb:.0f} MB: "
          f"{'met' if ours_rss <= rss_goal else 'NOT met'}")
    spread = lambda values: f"{min(values):.2f}-{max(values):.2f}"  # noqa: E731
    print(f"spread over runs: cp {spread(cp_times)} s, conversion "
          f"{spread([r['seconds'] - r['import_seconds'] for r in ours])} s, total {spread([r['seconds'] for r in ours])} s")
    print(f"(child wall time including interpreter start-up: "
          f"{statistics.median(r['wall_seconds'] for r in ours):.2f}s)")
    if args.command:
        convert_cpu = statistics.median(r["convert_cpu_seconds"] for r in ours)
        print(f"whole command `python main.py stages=[export]` (accuracy disabled), median of {args.repeat}; "
              f"overhead = the command minus the conversion (wall {convert_s:.2f} s, CPU {convert_cpu:.2f} s):")
        print(f"{'':44}{'wall s':>8}{'overhead':>10}{'CPU s':>8}{'overhead':>10}")
        for label, runs in (("bare interpreter start", bare), ("interpreter + import torch", torch_only),
                            ("the same, garbage collector paused", torch_paused),
                            ("import torch + the interpreter's teardown", torch_exit)):
            print(f"{'  ' + label:44}{statistics.median(w for w, _ in runs):>8.2f}{'':>10}"
                  f"{statistics.median(c for _, c in runs):>8.2f}")
        own = {}
        for label, runs in (("command, sub-stage forked (EXPORTER_FORK=1)", commands),
                            ("command, two interpreters (default)", unforked),
                            ("the same, second one late (EXPORTER_PRESTART=0)", late)):
            wall, cpu = statistics.median(w for w, _, _ in runs), statistics.median(c for _, c, _ in runs)
            print(f"{'  ' + label:44}{wall:>8.2f}{wall - convert_s:>10.2f}{cpu:>8.2f}{cpu - convert_cpu:>10.2f}")
            if all(conversion is not None for _, _, conversion in runs):
                own[label] = [w - conversion for w, _, conversion in runs]
        print("  the same overheads against each command's own conversion (its log line), median (spread):")
        for label, overheads in own.items():
            print(f"{'    ' + label:46}{statistics.median(overheads):>6.2f} s ({spread(overheads)})")
        default, forked = "command, two interpreters (default)", "command, sub-stage forked (EXPORTER_FORK=1)"
        torch_s = statistics.median(w for w, _ in torch_paused)  # the import as the sub-stage makes it
        for label, runs in ((default, unforked), (forked, commands),
                            ("the same, second one late (EXPORTER_PRESTART=0)", late)):
            overhead = (statistics.median(own[label]) if label in own
                        else statistics.median(w for w, _, _ in runs) - convert_s)
            print(f"  overhead goal <= 3 s, {label.removeprefix('command, ')}: "
                  f"{'met' if overhead <= 3 else 'NOT met'} ({overhead:.2f} s, of which one torch import "
                  f"{torch_s:.2f} s, the rest {overhead - torch_s:.2f} s); the command's spread "
                  f"{spread([w for w, _, _ in runs])} s")

if __name__ == "__main__":
    main()
