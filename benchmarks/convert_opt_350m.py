"""Benchmark: convert an OPT-350m-shaped checkpoint (331 M params, 1.3 GB fp32 safetensors) to fp16 TP=2.

OPT-350m is FT's hardest OPT layout: post-layernorm, no final layernorm, and `project_in` / `project_out` around a
512-wide embedding, which the conversion folds into two [V, 1024] fp32 matrices (`wte` = E·W_inᵀ, `lm_head` =
E·W_out): the largest FT tensors are twice the largest source tensor, and computed, not copied. Same protocol as
convert_gpt2_medium.py (fresh child per measurement, warm page cache, `cp` of the checkpoint file in the same run as
the floor, peak RSS against the largest tensor), plus the two folds timed alone (the compute floor of this layout)
and the whole `python main.py` command.

    python benchmarks/convert_opt_350m.py [--work-dir /tmp/ft-bench] [--processes 1] [--repeat 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_gpt2_medium import ROOT, largest_tensor, run_child, time_command, time_cp  # noqa: E402

# Runs in a child: the two folds alone, as the conversion computes them (fp32 matmuls, exporter/arch/opt.py).
FOLDS = """
import sys, time
sys.path.insert(0, {root!r})
from templates.ft_python.ft_imports import openmp_threads_sleep_when_idle
openmp_threads_sleep_when_idle()  # as in the conversion's process (exporter/run_substage.py)
from safetensors.torch import load_file
state = load_file({source!r})
embed = state["model.decoder.embed_tokens.weight"].float()
project_in = state["model.decoder.project_in.weight"].float()
project_out = state["model.decoder.project_out.weight"].float()
started = time.monotonic()
wte = embed @ project_in.t()
lm_head = embed @ project_out
print(time.monotonic() - started)
"""

OPT_350M = dict(vocab_size=50272, hidden_size=1024, num_hidden_layers=24, ffn_dim=4096, num_attention_heads=16,
                max_position_embeddings=2048, do_layer_norm_before=False, word_embed_proj_dim=512,
                bos_token_id=2, eos_token_id=2, pad_token_id=1)


def build_checkpoint(directory: Path) -> Path:
    """Built in a child process: Linux carries a parent's peak RSS into children it forks (ru_maxrss survives
    exec), so building it here would inflate every later measurement."""
    if not (directory / "model.safetensors").is_file():
        subprocess.run([sys.executable, __file__, "--build-only", str(directory)], check=True)
    return directory


def _build(directory: Path) -> None:
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    print(f"building a seeded OPT-350m-shaped checkpoint in {directory} ...", flush=True)
    torch.manual_seed(0)
    OPTForCausalLM(OPTConfig(**OPT_350M)).save_pretrained(directory)
    shutil.copy2(Path(__file__).resolve().parents[1] / "exporter/data/gpt2-tokenizer/vocab.json", directory)
    shutil.copy2(Path(__file__).resolve().parents[1] / "exporter/data/gpt2-tokenizer/merges.txt", directory)


def main() -> None:
    if sys.argv[1:2] == ["--build-only"]:
        _build(Path(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/ft-bench"))
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-command", dest="command", action="store_false",
                        help="skip timing the whole `python main.py` command")
    args = parser.parse_args()

    checkpoint = build_checkpoint(args.work_dir / "opt-350m")
    source = checkpoint / "model.safetensors"
    out = args.work_dir / "out-opt"
    name, largest_source = largest_tensor(source)
    largest_ft = OPT_350M["vocab_size"] * OPT_350M["hidden_size"] * 4  # folded wte / lm_head, fp32 [V, h]
    subprocess.run(["cat", str(source)], stdout=subprocess.DEVNULL, check=True)

    cp_times, ours, baseline, folds, commands = [], [], [], [], []
    for _ in range(args.repeat):
        subprocess.run(["sync"], check=True)
        cp_times.append(time_cp(source, args.work_dir / "copy.safetensors"))
        subprocess.run(["sync"], check=True)
        ours.append(run_child(checkpoint, out, args.processes, convert=True))
        shutil.rmtree(out)
        baseline.append(run_child(checkpoint, out, args.processes, convert=False))
        done = subprocess.run([sys.executable, "-c", FOLDS.format(root=str(ROOT), source=str(source))],
                              capture_output=True, text=True, check=True)
        folds.append(float(done.stdout.strip().splitlines()[-1]))
        if args.command:
            subprocess.run(["sync"], check=True)
            commands.append(time_command(checkpoint, args.work_dir / "results-opt", args.processes, fork=True)[0])

    mb = 1e6
    cp_s = statistics.median(cp_times)
    convert_s = statistics.median(r["seconds"] - r["import_seconds"] for r in ours)
    ours_rss = max(r["peak_rss_kib"] for r in ours) * 1024
    base_rss = max(r["peak_rss_kib"] for r in baseline) * 1024
    goal = 2 * largest_ft + base_rss
    print()
    print(f"checkpoint: {source} ({source.stat().st_size / mb:.0f} MB fp32), fp16 TP=2, processes={args.processes}, "
          f"median of {args.repeat}")
    print(f"largest source tensor: {name} {largest_source / mb:.1f} MB; largest FT tensor (folded wte/lm_head, "
          f"fp32 while computed): {largest_ft / mb:.1f} MB")
    print(f"{'':30}{'wall s':>10}{'peak RSS MB':>14}")
    print(f"{'cp (floor)':30}{cp_s:>10.2f}")
    print(f"{'interpreter + imports':30}{'':>10}{base_rss / mb:>14.0f}")
    print(f"{'ours: conversion':30}{convert_s:>10.2f}{ours_rss / mb:>14.0f}")
    print(f"time: conversion {convert_s / cp_s:.2f}x cp; spread cp {min(cp_times):.2f}-{max(cp_times):.2f} s, "
          f"conversion {min(r['seconds'] - r['import_seconds'] for r in ours):.2f}-"
          f"{max(r['seconds'] - r['import_seconds'] for r in ours):.2f} s")
    folds_s = statistics.median(folds)
    flops = 2 * 2 * OPT_350M["vocab_size"] * OPT_350M["word_embed_proj_dim"] * OPT_350M["hidden_size"]
    print(f"the two folds alone (fp32 matmuls, {flops / 1e9:.0f} GFLOP): {folds_s:.2f} s ({flops / folds_s / 1e9:.0f} "
          f"GFLOP/s); conversion without them {convert_s - folds_s:.2f} s = {(convert_s - folds_s) / cp_s:.2f}x cp "
          f"(goal: conversion <= 2x cp: {'met' if convert_s <= 2 * cp_s else 'NOT met'})")
    if args.command:
        command_s = statistics.median(commands)
        print(f"whole command `python main.py stages=[export]` (accuracy disabled): {command_s:.2f} s, overhead "
              f"beyond the conversion {command_s - convert_s:.2f} s (spread {min(commands):.2f}-{max(commands):.2f})")
    print(f"RSS: {ours_rss / mb:.0f} MB vs 2 x largest FT tensor + interpreter = {goal / mb:.0f} MB: "
          f"{'met' if ours_rss <= goal else 'NOT met'} (peak above interpreter: {(ours_rss - base_rss) / mb:.0f} MB "
          f"= {(ours_rss - base_rss) / largest_ft:.2f} x largest FT tensor)")


if __name__ == "__main__":
    main()
