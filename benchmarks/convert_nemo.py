"""Benchmark: convert a GPT-2-medium-shaped NeMo checkpoint (legacy layout, tensor parallel 2: `mp_rank_00/01`,
355 M params, 1.4 GB fp32) to FT fp16 at TP=1 (a merge) and TP=4 (a split), from the `.nemo` file and from the
extracted directory.

Prints, from one run: wall time and peak RSS of each conversion, a plain `cp` of the .nemo file (the floor), the
peak RSS of an interpreter that only imports the converter, and the largest tensor (merged, as the converter holds
it, and as stored per rank).

    python benchmarks/convert_nemo.py [--work-dir /tmp/ft-bench-nemo] [--repeat 3]

The checkpoint is synthetic (seeded noise), saved with torch.save in NeMo's layout (Megatron-core names, each rank's
slice of the column- and row-parallel tensors) and packed as NeMo packs it (uncompressed tar, uuid-named tokenizer
files); it is built once in the work dir and reused. Each measurement runs in a fresh child process; the files are
read from a warm page cache by `cp` and the conversions alike, and nothing is fsync'ed (an untimed `sync` runs
before each timed run).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_gpt2_medium import time_cp  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "exporter" / "data" / "gpt2-tokenizer"
HIDDEN, LAYERS, HEADS, FFN, POSITIONS = 1024, 24, 16, 4096, 1024
TRAIN_TP = 2
PADDED_VOCAB = 50432  # 50257 padded to a multiple of make_vocab_size_divisible_by (128) x TP (2)
CONFIG = f"""\
tensor_model_parallel_size: {TRAIN_TP}
pipeline_model_parallel_size: 1
encoder_seq_length: {POSITIONS}
max_position_embeddings: {POSITIONS}
num_layers: {LAYERS}
hidden_size: {HIDDEN}
ffn_hidden_size: {FFN}
num_attention_heads: {HEADS}
kv_channels: null
normalization: layernorm
layernorm_epsilon: 1.0e-05
make_vocab_size_divisible_by: 128
bias: true
activation: gelu
transformer_block_type: pre_ln
position_embedding_type: learned_absolute
share_embeddings_and_output_weights: true
num_query_groups: null
mcore_gpt: true
tokenizer:
  library: megatron
  type: GPT2BPETokenizer
  model: null
  vocab_file: nemo:0123456789abcdef0123456789abcdef_vocab.json
  merge_file: nemo:fedcba9876543210fedcba9876543210_merges.txt
precision: 32
target: nemo.collections.nlp.models.language_modeling.megatron_gpt_model.MegatronGPTModel
"""

CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
started = time.monotonic()
from exporter.lazy import imports_without_gc, openmp_threads_sleep_when_idle
openmp_threads_sleep_when_idle()  # as the sub-stage's process does (exporter/run_substage.py)
with imports_without_gc():  # as the sub-stage imports them
    from exporter.ft.convert import convert_checkpoint
    from exporter.parallel import ParallelLayout
imported = time.monotonic()
if {convert}:
    convert_checkpoint({source!r}, {out!r}, ParallelLayout({tp}), weight_data_type="fp16")
peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(json.dumps({{"seconds": time.monotonic() - started, "import_seconds": imported - started, "peak_rss_kib": peak}}))
"""


def rank_state(generator) -> dict:
    """One TP rank's slice of every tensor, under Megatron-core names (column-parallel: dim 0, row-parallel: dim 1)."""
    import torch

    def noise(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.02

    h, f, tp = HIDDEN, FFN, TRAIN_TP
    state = {
        "model.embedding.word_embeddings.weight": noise(PADDED_VOCAB // tp, h),
        "model.embedding.position_embeddings.weight": noise(POSITIONS, h),
        "model.decoder.final_layernorm.weight": 1 + noise(h),
        "model.decoder.final_layernorm.bias": noise(h),
        "model.output_layer._extra_state": None,
    }
    for layer in range(LAYERS):
        p = f"model.decoder.layers.{layer}."
        state.update({
            p + "input_layernorm.weight": 1 + noise(h), p + "input_layernorm.bias": noise(h),
            p + "self_attention.linear_qkv.weight": noise(3 * h // tp, h),
            p + "self_attention.linear_qkv.bias": noise(3 * h // tp),
            p + "self_attention.linear_qkv._extra_state": None,
            p + "self_attention.linear_proj.weight": noise(h, h // tp), p + "self_attention.linear_proj.bias": noise(h),
            p + "self_attention.linear_proj._extra_state": None,
            p + "pre_mlp_layernorm.weight": 1 + noise(h), p + "pre_mlp_layernorm.bias": noise(h),
            p + "mlp.linear_fc1.weight": noise(f // tp, h), p + "mlp.linear_fc1.bias": noise(f // tp),
            p + "mlp.linear_fc1._extra_state": None,
            p + "mlp.linear_fc2.weight": noise(h, f // tp), p + "mlp.linear_fc2.bias": noise(h),
            p + "mlp.linear_fc2._extra_state": None,
        })
    return state


def paths(work_dir: Path) -> tuple[Path, Path]:
    return work_dir / "gpt2-medium-tp2.nemo", work_dir / "gpt2-medium-tp2"


def build_checkpoint(work_dir: Path) -> None:
    """The .nemo file and its extracted directory (run in a child: a forked child's peak RSS would otherwise
    start from this process's)."""
    import torch

    archive, directory = paths(work_dir)
    print(f"building a seeded GPT-2-medium-shaped NeMo TP=2 checkpoint in {work_dir} ...", flush=True)
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    (directory / "model_config.yaml").write_text(CONFIG)
    shutil.copy2(TOKENIZER / "vocab.json", directory / "0123456789abcdef0123456789abcdef_vocab.json")
    shutil.copy2(TOKENIZER / "merges.txt", directory / "fedcba9876543210fedcba9876543210_merges.txt")
    generator = torch.Generator().manual_seed(0)
    for rank in range(TRAIN_TP):
        (directory / f"mp_rank_{rank:02d}").mkdir()
        torch.save(rank_state(generator), directory / f"mp_rank_{rank:02d}" / "model_weights.ckpt")
    with tarfile.open(archive.with_suffix(".partial"), "w") as tar:  # NeMo's save_to: plain tar, "./" names
        tar.add(directory, arcname=".")
    archive.with_suffix(".partial").rename(archive)


def run_child(source: Path, out: Path, tp: int, convert: bool) -> dict:
    code = CHILD.format(root=str(ROOT), source=str(source), out=str(out), tp=tp, convert=convert)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/ft-bench-nemo"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_only:
        build_checkpoint(args.work_dir)
        return

    archive, directory = paths(args.work_dir)
    if not (archive.is_file() and directory.is_dir()):
        subprocess.run([sys.executable, __file__, "--build-only", "--work-dir", str(args.work_dir)], check=True)
    out = args.work_dir / "out"
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(["cat", str(archive)], stdout=subprocess.DEVNULL, check=True)  # warm page cache for all
    for rank_file in directory.glob("mp_rank_*/model_weights.ckpt"):
        subprocess.run(["cat", str(rank_file)], stdout=subprocess.DEVNULL, check=True)

    cases = {f"{kind} -> TP={tp}": (source, tp) for kind, source in (("ours .nemo", archive), ("ours dir", directory))
             for tp in (1, 4)}
    cp_times: list[float] = []
    results: dict[str, list[dict]] = {name: [] for name in cases}
    baseline: list[dict] = []
    for _ in range(args.repeat):
        subprocess.run(["sync"], check=True)
        cp_times.append(time_cp(archive, args.work_dir / "copy.nemo"))
        for name, (source, tp) in cases.items():
            subprocess.run(["sync"], check=True)
            results[name].append(run_child(source, out, tp, convert=True))
            shutil.rmtree(out)
        baseline.append(run_child(archive, out, 1, convert=False))

    mb = 1e6
    merged = PADDED_VOCAB * HIDDEN * 4
    stored = merged // TRAIN_TP
    base_rss = max(r["peak_rss_kib"] for r in baseline) * 1024
    cp_s = statistics.median(cp_times)
    print()
    print(f"checkpoint: {archive} ({archive.stat().st_size / mb:.0f} MB, fp32, legacy TP=2), to fp16, "
          f"median of {args.repeat}")
    print(f"largest tensor: model.embedding.word_embeddings.weight merged {merged / mb:.1f} MB "
          f"(stored per rank {stored / mb:.1f} MB)")
    print(f"{'':26}{'total s':>9}{'convert s':>11}{'x cp':>7}{'peak RSS MB':>13}{'RSS - interp.':>15}"
          f"{'/ largest':>11}")
    print(f"{'cp of the .nemo (floor)':26}{cp_s:>9.2f}")
    print(f"{'interpreter + imports':26}{'':>9}{'':>11}{'':>7}{base_rss / mb:>13.0f}")
    for name, runs in results.items():
        total = statistics.median(r["seconds"] for r in runs)
        convert = statistics.median(r["seconds"] - r["import_seconds"] for r in runs)
        rss = max(r["peak_rss_kib"] for r in runs) * 1024
        print(f"{name:26}{total:>9.2f}{convert:>11.2f}{convert / cp_s:>7.2f}{rss / mb:>13.0f}"
              f"{(rss - base_rss) / mb:>15.0f}{(rss - base_rss) / merged:>11.2f}")
    spread = lambda values: f"{min(values):.2f}-{max(values):.2f}"  # noqa: E731
    print(f"spread: cp {spread(cp_times)} s; " + "; ".join(
        f"{name} {spread([r['seconds'] - r['import_seconds'] for r in runs])} s" for name, runs in results.items()))


if __name__ == "__main__":
    main()
