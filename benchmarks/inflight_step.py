"""Benchmark: one decoding step of the python runtime's Engine for 8 single-row requests against one 8-row request,
in process, on the served model's own shards (SmolLM2-135M-Instruct fp32, benchmarks/serving.py's export).

    python benchmarks/inflight_step.py [--work-dir /tmp/ft-serving-bench] [--threads 2] [--steps 32] [--repeat 3]

Three engines decode the same 8 prompts (64 LAMBADA tokens each, greedy, every row forced to its last step):

- batched: one request of 8 rows (one cohort) — what 8 clients should cost at best;
- pooled: 8 requests of one row each, their caches in the Engine's shared pool (model.ROW_SLOTS): one attention
  call per layer for all of them — what the served model does now;
- per cohort: the same 8 requests with the pool switched off: one attention call per layer per request (the
  Engine before the pool, kept as the in-run baseline).

Each is prefilled jointly, then timed over --steps decoding steps; the runs alternate and the minimum per engine over
--repeat rounds is printed, with each step's time split into the forward (model.hidden_states + logits) and the
rest (token choice, bookkeeping). The outputs of the three are checked identical before any figure is printed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

ROWS = 8


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/ft-serving-bench"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)

    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the served model's default (see README)
    import torch
    from tokenizers import Tokenizer

    import serving
    from templates.ft_python import ft_generate, ft_gpt

    torch.set_num_threads(args.threads)
    _, repo, _ = serving.build_artifacts(args.work_dir)
    shard_dir = repo / serving.MODEL / "1" / "1-gpu"
    model = ft_gpt.FTGPT.from_shards(shard_dir, device="cpu")
    tokenizer = Tokenizer.from_file(str(shard_dir / "tokenizer.json"))
    rows = serving.prompts(tokenizer, ROWS)
    never_end = tokenizer.token_to_id("<|im_start|>")

    def batch(prompts):
        ids = torch.tensor(prompts, dtype=torch.int64)
        return ft_generate.check_inputs(
            model, ids, torch.full((len(prompts),), ids.shape[1]), torch.full((len(prompts),), args.steps + 1),
            ft_generate.SamplingParams(top_k=1, end_id=never_end))

    timers = {"forward": 0.0}

    def timed(method):
        def call(*a, **k):
            started = time.perf_counter()
            out = method(*a, **k)
            timers["forward"] += time.perf_counter() - started
            return out
        return call

    # The forward: the pooled step's hidden_states, the per-cohort step's hidden_states_grouped, and the logits.
    for name in ("hidden_states", "hidden_states_grouped", "logits"):
        setattr(model, name, timed(getattr(model, name)))

    def run(kind):
        engine = ft_generate.Engine(model)
        if kind == "per cohort":
            engine._pooling = False
        with engine.joint_prefill():
            cohorts = [engine.admit(batch(rows))] if kind == "batched" else [engine.admit(batch([r])) for r in rows]
        timers["forward"] = 0.0
        started = time.perf_counter()
        while engine.cohorts:
            engine.step()
        seconds = time.perf_counter() - started
        steps = args.steps + 1
        tokens = torch.cat([c.output.output_ids[:, 0] for c in cohorts])
        return seconds / steps, timers["forward"] / steps, tokens

    kinds = ("batched", "pooled", "per cohort")
    best = {kind: (float("inf"), 0.0) for kind in kinds}
    outputs = {}
    run("pooled")  # warm-up
    for _ in range(args.repeat):
        for kind in kinds:
            step, forward, tokens = run(kind)
            outputs[kind] = tokens
            if step < best[kind][0]:
                best[kind] = (step, forward)
    for kind in kinds[1:]:
        if not torch.equal(outputs[kind], outputs["batched"]):
            sys.exit(f"{kind}: output differs from the batched request's")

    print(f"SmolLM2-135M-Instruct fp32, {ROWS} prompts of {serving.PROMPT_TOKENS} tokens, {args.steps + 1} decoding "
          f"steps, {args.threads} threads; per step, minimum of {args.repeat} (outputs identical):")
    print(f"{'engine':<40} {'step ms':>8} {'forward ms':>11} {'rest ms':>8} {'batched / it':>13}")
    base = best["batched"][0]
    labels = {"batched": "one 8-row request", "pooled": "8 single-row requests, pooled",
              "per cohort": "8 single-row requests, per cohort"}
    for kind in kinds:
        step, forward = best[kind]
        print(f"{labels[kind]:<40} {step * 1e3:8.1f} {forward * 1e3:11.1f} {(step - forward) * 1e3:8.1f} "
              f"{base / step:12.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
