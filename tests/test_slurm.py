"""The export on a real Slurm (cluster_type=bcm): sbatch, afterok dependency, jobs run on the node, outputs checked.

Needs a Slurm whose controller answers (`scripts/slurm_local.sh start` brings up a one-node one). Without one
these tests skip, saying why; in CI (CI=true) a missing Slurm fails them instead, so CI always runs them.
The served LAMBADA predictions are compared with HF transformers run here (independent of this project's code).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import read_json

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 12
JOB_TIMEOUT_S = 600
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
            "DEADLINE"}

pytestmark = pytest.mark.slurm


def _slurm_problem() -> str | None:
    """Why Slurm cannot be used here, or None when sbatch exists and the controller has a usable node."""
    for tool in ("sbatch", "squeue", "scontrol", "sinfo"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found (start a local cluster with scripts/slurm_local.sh install && start)"
    try:
        done = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 20 s (is slurmctld running?)"
    if done.returncode != 0:
        return f"sinfo failed: {(done.stderr or done.stdout).strip()}"
    states = done.stdout.split()
    if not any(state.rstrip("*") in ("idle", "mix", "alloc") for state in states):
        return f"no usable Slurm node (states: {states or 'none'})"
    return None


@pytest.fixture(scope="module")
def slurm() -> None:
    problem = _slurm_problem()
    if problem is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the Slurm tests: {problem}")
        pytest.skip(f"no Slurm: {problem}")


def job_info(job_id: str) -> dict[str, str]:
    done = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, f"scontrol show job {job_id}: {done.stderr.strip()}"
    return dict(re.findall(r"(\w+)=(\S*)", done.stdout))


def wait_for(job_ids: list[str], timeout_s: float = JOB_TIMEOUT_S) -> dict[str, dict[str, str]]:
    """Poll scontrol until every job is in a terminal state; cancel them and fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        infos = {job_id: job_info(job_id) for job_id in job_ids}
        if all(info["JobState"] in TERMINAL for info in infos.values()):
            return infos
        if time.monotonic() > deadline:
            subprocess.run(["scancel", *job_ids], check=False)
            pytest.fail(f"jobs not finished after {timeout_s:g}s: {[i['JobState'] for i in infos.values()]}")
        time.sleep(2)


def submit(tmp_path: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, dict[str, str]]:
    """README's Slurm command, run from tmp_path; returns the result and {sub_stage: job id} from its status lines."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "cluster_type=bcm", "cluster.gpus_per_node=0",
         f"base_results_dir={tmp_path / 'results'}", *overrides],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    ids = dict(re.findall(r"^(\w+): submitted job (\d+) ", done.stdout, flags=re.M))
    return done, ids


def test_export_on_slurm(slurm, tmp_path):
    started = time.monotonic()
    done, ids = submit(tmp_path, "export.model.checkpoint_path=builtin:tiny-gpt2",
                       "export.triton_deployment.device=cpu", f"export.accuracy.limit={LIMIT}",
                       "export.accuracy.batch_size=4", "export.triton_deployment.max_batch_size=4")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert set(ids) == {"convert", "accuracy"}, done.stdout
    assert f"follow with: squeue -j {ids['convert']},{ids['accuracy']}" in done.stdout
    infos = wait_for([ids["convert"], ids["accuracy"]])
    results = tmp_path / "results" / "gpt2" / "export_tp1_pp1_fp32_fp32"
    for name, job_id in ids.items():
        out = results / name / f"log-ft-exporter-export_gpt2_{name}_{job_id}.out"
        err = out.with_suffix(".err")
        assert infos[job_id]["JobState"] == "COMPLETED" and infos[job_id]["ExitCode"] == "0:0", (
            f"{name}: {infos[job_id]['JobState']}\n{out.read_text()[-2000:]}\n{err.read_text()[-2000:]}")
        assert infos[job_id]["JobName"] == f"ft-exporter-export_gpt2_{name}"
        assert infos[job_id]["NumNodes"] == "1" and infos[job_id]["NumTasks"] == "1"
        assert (results / name / "export_gpt2_hydra.yaml").is_file()
        assert (results / name / "launcher.sh").is_file()
        assert out.stat().st_size > 0
    print(f"\nSlurm export (convert + accuracy, {LIMIT} examples): {time.monotonic() - started:.1f}s wall")

    # afterok: accuracy was submitted depending on convert, and started only after convert had ended.
    command = (results / "accuracy" / "launcher_cmd.log").read_text()
    assert f"--dependency=afterok:{ids['convert']}" in command
    assert infos[ids["accuracy"]]["StartTime"] >= infos[ids["convert"]]["EndTime"]

    # What the jobs produced: the repository with TP=1 shards, and the evaluation through the served model.
    repo = results / "model_repo"
    assert sorted(p.name for p in repo.iterdir()) == ["ensemble", "gpt2", "postprocessing", "preprocessing",
                                                      "trtllm"]
    assert (repo / "gpt2" / "1" / "1-gpu" / "config.ini").is_file()
    evaluation = read_json(results / "eval_output.json")
    assert evaluation["examples"] == LIMIT and evaluation["passed"] is True
    assert (results / "accuracy" / "tritonserver.log").stat().st_size > 0

    # Independent check of the served predictions: HF transformers on the checkpoint the convert job read.
    from transformers import GPT2LMHeadModel, GPT2TokenizerFast

    from exporter.evaluate.lambada import read_texts
    from test_lambada import LAMBADA, independent_predictions

    checkpoint = tmp_path / "results" / "builtin_checkpoints" / "tiny-gpt2"
    model = GPT2LMHeadModel.from_pretrained(checkpoint).eval()
    expected = independent_predictions(model, GPT2TokenizerFast.from_pretrained(checkpoint),
                                       read_texts(LAMBADA, LIMIT))
    for metric, (predictions, correct) in expected.items():
        assert evaluation["metrics"][metric]["served_predictions"] == predictions, metric
        assert evaluation["metrics"][metric]["served"]["correct"] == correct


def test_failed_convert_cancels_accuracy(slurm, tmp_path):
    """afterok + --kill-on-invalid-dep: a failing convert job must not leave accuracy pending forever."""
    done, ids = submit(tmp_path, f"export.model.checkpoint_path={tmp_path / 'no-such-checkpoint'}",
                       "export.triton_deployment.device=cpu")
    assert done.returncode == 0 and set(ids) == {"convert", "accuracy"}, done.stdout + done.stderr
    infos = wait_for([ids["convert"], ids["accuracy"]], timeout_s=120)
    assert infos[ids["convert"]]["JobState"] == "FAILED"
    assert infos[ids["convert"]]["ExitCode"] == "1:0"  # the sub-stage's user-error exit code
    assert infos[ids["accuracy"]]["JobState"] == "CANCELLED"
    assert infos[ids["accuracy"]]["Reason"] == "DependencyNeverSatisfied"
    out = next((tmp_path / "results").glob(f"gpt2/*/convert/log-*_{ids['convert']}.out"))
    assert "no-such-checkpoint" in out.read_text()


def test_rejected_submission_cancels_the_jobs_already_submitted(slurm, tmp_path):
    """This cluster has no GPUs: the accuracy job's GPU request is refused by sbatch; convert must not run alone."""
    done, ids = submit(tmp_path, "cluster.gpus_per_node=8", "export.triton_deployment.device=cuda")
    assert done.returncode == 1, done.stdout + done.stderr
    assert set(ids) == {"convert"}
    assert "sbatch failed for accuracy" in done.stdout + done.stderr
    assert f"cancelled the jobs already submitted ({ids['convert']})" in done.stdout + done.stderr
    infos = wait_for([ids["convert"]], timeout_s=60)
    assert infos[ids["convert"]]["JobState"] == "CANCELLED"


def test_gpu_request_on_a_cluster_without_gpus_is_explained(slurm, tmp_path):
    """The default export asks for a GPU (the default runtime's device=auto, cluster.gpus_per_node=8); this Slurm has
    no gres, and sbatch answers only "Invalid generic resource (gres) specification". The error must say what that
    means and which key to set."""
    done, ids = submit(tmp_path, "cluster.gpus_per_node=8")
    output = done.stdout + done.stderr
    assert done.returncode == 1 and set(ids) == {"convert"}, output
    assert "sbatch failed for accuracy" in output and "1 GPU(s)/node" in output
    assert "Invalid generic resource (gres) specification" in output  # Slurm's own line, kept
    assert "what this means: Slurm refused the job's GPU request" in output
    assert "set cluster.gpus_per_node=0" in output
    wait_for([ids["convert"]], timeout_s=60)  # cancelled with the plan


@pytest.mark.parametrize(
    "option, key",
    [
        ("--gres=gpu:1", "cluster.gpus_per_node=0"),
        ("--gpus-per-node=8", "cluster.gpus_per_node=0"),
        ("--partition=no-such-partition", "cluster.partition"),
        ("--mem=100000000", "cluster.mem"),
        ("--time=not-a-time", "export.run.time_limit"),
    ],
)
def test_sbatch_refusals_of_this_slurm_are_recognised(slurm, tmp_path, option, key):
    """What this real sbatch prints for each refusal is recognised, and its explanation names the key to change."""
    from exporter.launch.refusals import explain

    done = subprocess.run(["sbatch", "--parsable", option, f"--chdir={tmp_path}", "--output=/dev/null", "--wrap=true"],
                          capture_output=True, text=True, timeout=30)
    if done.returncode == 0:  # accepted after all: do not leave it queued
        subprocess.run(["scancel", done.stdout.strip().split(";")[0]], check=False)
    assert done.returncode != 0, f"sbatch {option} was accepted: {done.stdout}"
    assert key in explain(done.stderr), done.stderr
