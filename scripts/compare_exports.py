"""Export the same checkpoints with two versions of this project and compare the results byte for byte.

    python scripts/compare_exports.py --before <git rev> [--after <git rev or checkout path>] [--work DIR]

Each version runs `python main.py` (accuracy off) in its own checkout, so the comparison goes through the public
entry point and holds across internal API changes. Checkpoints: the tiny GPT-2, OPT and Llama fixtures
(tests/family_fixtures.py, built once with transformers) and NeMo's own fixtures (../shared/fixtures/nemo), at TP 1
and 2, with the python runtime, and with the fastertransformer runtime where FT can serve the model (plus a
streaming GPT-2 repository). Every file of every repository is compared: shards, config.ini, tokenizer files and
config.pbtxt must be identical; the runtime's python files (copied from templates/) are listed apart, since a
restructure may change them. Exits 1 when anything but those differs.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEMO_FIXTURES = ROOT.parent / "shared" / "fixtures" / "nemo"


@dataclass(frozen=True)
class Case:
    name: str
    checkpoint: str  # key of the checkpoints dict
    tp: int
    overrides: tuple[str, ...] = ()


def build_checkpoints(directory: Path) -> dict[str, Path]:
    """The HF fixtures, built once with transformers (seeded), and NeMo's saved .nemo files."""
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]
    from conftest import build_hf_gpt2
    from family_fixtures import build_llama, build_opt

    builders = {"gpt2": build_hf_gpt2, "opt": build_opt, "llama": build_llama}
    paths = {}
    for name, build in builders.items():
        path = directory / name
        if not (path / "config.json").is_file():
            path.mkdir(parents=True, exist_ok=True)
            build(path)
        paths[name] = path
    paths["nemo_gpt"] = NEMO_FIXTURES / "gpt_tp1.nemo"  # within FT's GPT
    paths["nemo_rope_swiglu"] = NEMO_FIXTURES / "gpt_rope_swiglu_tp1.nemo"  # python runtime only
    return paths


def cases() -> list[Case]:
    found = []
    ft = ("export.triton_deployment.runtime=fastertransformer",)
    streaming = ("export.triton_deployment.decoupled=True",)
    for tp in (1, 2):
        for name in ("gpt2", "opt", "llama", "nemo_gpt", "nemo_rope_swiglu"):
            found.append(Case(f"{name}-tp{tp}-python", name, tp))
        for name in ("gpt2", "opt", "nemo_gpt"):
            found.append(Case(f"{name}-tp{tp}-fastertransformer", name, tp, ft))
        found.append(Case(f"gpt2-tp{tp}-python-decoupled", "gpt2", tp, streaming))
    return found


def export(tree: Path, case: Case, checkpoint: Path, results: Path, log: Path) -> None:
    argv = [
        sys.executable, "main.py",
        f"export.model.checkpoint_path={checkpoint}",
        f"export.model.tensor_model_parallel_size={case.tp}",
        f"export.run.model_train_name={case.name}",
        "export.accuracy.enabled=False",
        f"base_results_dir={results}",
        *case.overrides,
    ]
    with open(log, "w") as handle:
        done = subprocess.run(argv, cwd=tree, stdout=handle, stderr=subprocess.STDOUT, env=_environment(tree))
    if done.returncode:
        raise SystemExit(f"{case.name}: `main.py` failed in {tree} (exit {done.returncode}); log: {log}")


def _environment(tree: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree)  # this checkout's packages, whatever is installed
    return env


def run_version(tree: Path, label: str, checkpoints: dict[str, Path], work: Path, reuse: bool = False) -> Path:
    """Every case exported by the checkout at `tree`; the repositories end up under work/<label>.

    Both versions write into the same results path (then moved aside), so absolute paths that end up inside
    config.pbtxt (FT's model_checkpoint_path) are the same for both. reuse: keep repositories already there (a
    fixed revision exports the same every time)."""
    results, kept = work / "results", work / label
    if not reuse:
        shutil.rmtree(kept, ignore_errors=True)
    kept.mkdir(parents=True, exist_ok=True)
    for case in cases():
        if reuse and (kept / case.name).is_dir():
            continue
        shutil.rmtree(results, ignore_errors=True)
        export(tree, case, checkpoints[case.checkpoint], results, kept / f"{case.name}.log")
        repository = next(results.glob(f"{case.name}/export_*/model_repo"))
        shutil.move(str(repository), kept / case.name)
        print(f"  {label}: {case.name}", flush=True)
    shutil.rmtree(results, ignore_errors=True)
    return kept


def compare(before: Path, after: Path) -> tuple[list[str], list[str], int]:
    """(differences that count, differing runtime code files, files compared)."""
    counted, code, total = [], [], 0
    names_before = {p.relative_to(before) for p in before.rglob("*") if p.is_file() and p.suffix != ".log"}
    names_after = {p.relative_to(after) for p in after.rglob("*") if p.is_file() and p.suffix != ".log"}
    for name in sorted(names_before | names_after):
        target = code if name.suffix == ".py" else counted
        if name not in names_before or name not in names_after:
            target.append(f"{name}: only {'after' if name in names_after else 'before'}")
            continue
        total += 1
        if not filecmp.cmp(before / name, after / name, shallow=False):
            target.append(f"{name}: differs")
    return counted, code, total


def checkout(rev: str, work: Path) -> Path:
    tree = work / f"tree-{rev.replace('/', '_')}"
    if not tree.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev], check=True,
                       stdout=subprocess.DEVNULL)
    return tree


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="git revision of the earlier version")
    parser.add_argument("--after", default=str(ROOT), help="git revision or checkout path (default: this one)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "compare-exports")
    args = parser.parse_args(argv)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    checkpoints = build_checkpoints(work / "checkpoints")
    before_tree = checkout(args.before, work)
    after_tree = Path(args.after) if Path(args.after).is_dir() else checkout(args.after, work)
    print(f"before: {args.before} ({before_tree})\nafter:  {args.after} ({after_tree})")
    before = run_version(before_tree, f"before-{args.before}", checkpoints, work, reuse=True)
    after = run_version(after_tree.resolve(), "after", checkpoints, work)
    counted, code, total = compare(before, after)
    print(f"{len(cases())} exports per version, {total} files compared")
    shards = sum(1 for p in after.rglob("*.bin"))
    pbtxt = sum(1 for p in after.rglob("config.pbtxt"))
    ini = sum(1 for p in after.rglob("config.ini"))
    print(f"  of them: {shards} shard files, {ini} config.ini, {pbtxt} config.pbtxt")
    if code:
        print(f"runtime code files that differ (expected when templates/ changed): {len(code)}")
        for line in sorted({Path(line.split(':')[0]).name + line[line.index(':'):] for line in code}):
            print(f"  {line}")
    if counted:
        print(f"DIFFERENT: {len(counted)} files")
        for line in counted:
            print(f"  {line}")
        return 1
    print("IDENTICAL: every shard, config.ini, tokenizer file and config.pbtxt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
