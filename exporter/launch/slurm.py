"""cluster_type=bcm: one sbatch job per sub-stage, chained with --dependency=afterok, steps run under srun.

The script (${results_dir}/<sub_stage>/launcher.sh) holds the job's shape as #SBATCH directives; the sbatch
command line that submitted it (with --parsable and the dependency on the earlier jobs) is in launcher_cmd.log.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig

from ..jobs import Step, SubStage
from .common import (
    PROJECT_ROOT,
    LaunchError,
    device_lines,
    job_name,
    log_paths,
    notes_lines,
    prepare,
    python_for,
    pythonpath_line,
    record_command,
    step_argv,
    write_script,
)
from .refusals import explain

log = logging.getLogger(__name__)


def sbatch_directives(cfg: DictConfig, sub_stage: SubStage, workdir: Path) -> list[str]:
    """The #SBATCH options: shape from the plan, the rest from conf/cluster/bcm.yaml."""
    cluster, shape, name = cfg.cluster, sub_stage.resources, job_name(cfg, sub_stage)
    out, err = log_paths(sub_stage, name)
    options = [f"--job-name={name}", f"--nodes={shape.nodes}", f"--ntasks-per-node={shape.tasks_per_node}"]
    if shape.gpus_per_node:
        options.append(f"--gpus-per-node={shape.gpus_per_node}")
        if cluster.gpus_per_task:
            options.append(f"--gpus-per-task={cluster.gpus_per_task}")
    options.append(f"--time={sub_stage.time_limit}")
    if cluster.partition:
        options.append(f"--partition={cluster.partition}")
    if cluster.account:
        options.append(f"--account={cluster.account}")
    if cluster.exclusive:
        options.append("--exclusive")
    if cluster.mem is not None:
        options.append(f"--mem={cluster.mem}")
    if cluster.overcommit:
        options.append("--overcommit")
    options += [f"--chdir={workdir}", f"--output={out}", f"--error={err}"]
    return [f"#SBATCH {shlex.quote(option)}" for option in options]


def container_options(cfg: DictConfig) -> list[str]:
    """pyxis options; this project's folder and the results are mounted at the same paths inside."""
    cluster = cfg.cluster
    if not cluster.container:
        return []
    mounts = [str(PROJECT_ROOT), str(Path(cfg.base_results_dir).resolve()), *cluster.container_mounts]
    unique = list(dict.fromkeys(mounts))
    return [f"--container-image={cluster.container}", f"--container-mounts={','.join(unique)}"]


def srun_argv(cfg: DictConfig, sub_stage: SubStage, step: Step) -> list[str]:
    shape = sub_stage.resources
    if step.every_node:
        placement = [f"--nodes={shape.nodes}", f"--ntasks-per-node={shape.tasks_per_node}"]
    elif shape.nodes == 1:
        placement = ["--nodes=1", f"--ntasks-per-node={shape.tasks_per_node}"]
    else:
        # Beside a server on every node: one task on the job's first node (MPI rank 0), sharing its resources.
        placement = ["--nodes=1", "--ntasks=1", "--relative=0", "--overlap"]
    mpi = ["--mpi=pmix"] if step.mpi else []
    return ["srun", *placement, *mpi, *container_options(cfg), *cfg.cluster.srun_args]


def sbatch_script(cfg: DictConfig, sub_stage: SubStage, config_path: Path, workdir: Path) -> list[str]:
    python = python_for(cfg)
    lines = [
        "#!/bin/bash",
        f"# ft-exporter {sub_stage.stage}/{sub_stage.name}: submitted by the command in launcher_cmd.log",
        *sbatch_directives(cfg, sub_stage, workdir),
        "",
        "set -euo pipefail",
        pythonpath_line(),
        *device_lines(sub_stage, "where Slurm manages GPUs (gres), srun sets the ones it allocated instead."),
    ]
    if any(step.every_node for step in sub_stage.steps):
        lines.append("trap 'kill $(jobs -p) 2>/dev/null || true' EXIT  # background servers end with the job")
    for step in sub_stage.steps:
        command = srun_argv(cfg, sub_stage, step) + step_argv(step, python, config_path)
        lines += ["", *notes_lines(step), shlex.join(command) + (" &" if step.every_node else "")]
    return lines


def sbatch_argv(script: Path, after: Sequence[str]) -> list[str]:
    argv = ["sbatch", "--parsable"]
    if after:
        # afterok: run only when every earlier job succeeded; a failed one cancels this job instead of leaving
        # it pending forever.
        argv += [f"--dependency=afterok:{':'.join(after)}", "--kill-on-invalid-dep=yes"]
    return argv + [str(script)]


def parse_job_id(stdout: str) -> str:
    """`sbatch --parsable` prints `<job id>` or `<job id>;<cluster>`."""
    job_id = stdout.strip().split(";", 1)[0]
    if not job_id.isdigit():
        raise LaunchError(f"sbatch printed {stdout.strip()!r}, expected a job id")
    return job_id


def _cancel(job_ids: list[str]) -> str:
    """A later job of the plan could not be submitted: cancel the earlier ones rather than run half a plan."""
    if not job_ids:
        return ""
    done = subprocess.run(["scancel", *job_ids], capture_output=True, text=True)
    if done.returncode != 0:
        return f"; could not cancel the jobs already submitted ({', '.join(job_ids)}): {done.stderr.strip()}"
    return f"; cancelled the jobs already submitted ({', '.join(job_ids)})"


def run_slurm(cfg: DictConfig, sub_stages: Sequence[SubStage]) -> dict[str, str]:
    """Write and submit every sub-stage (dry_run: write and print only). Returns sub-stage name -> job id."""
    if not cfg.dry_run and shutil.which("sbatch") is None:
        raise LaunchError("cluster_type=bcm needs `sbatch` on PATH (run on a Slurm login node, or set dry_run=true)")
    workdir = Path.cwd()
    job_ids: dict[str, str] = {}
    for sub_stage in sub_stages:
        config_path = prepare(cfg, sub_stage)
        script = write_script(sub_stage, sbatch_script(cfg, sub_stage, config_path, workdir))
        after = [job_ids.get(name, f"<job id of {name}>") for name in sub_stage.depends_on]
        argv = sbatch_argv(script.resolve(), after)
        line = record_command(sub_stage, argv)
        if cfg.dry_run:
            print(f"[dry run] {sub_stage.name}: would run: {line}")
            continue
        done = subprocess.run(argv, capture_output=True, text=True, cwd=workdir)
        if done.returncode != 0:
            cancelled = _cancel(list(job_ids.values()))
            shape = sub_stage.resources
            raise LaunchError(f"sbatch failed for {sub_stage.name} (exit {done.returncode}; the job asks "
                              f"{shape.nodes} node(s) x {shape.tasks_per_node} task(s), {shape.gpus_per_node} "
                              f"GPU(s)/node): {(done.stderr or done.stdout).strip()}" + cancelled
                              + explain(done.stderr + done.stdout))
        job_ids[sub_stage.name] = parse_job_id(done.stdout)
        shape = sub_stage.resources
        print(f"{sub_stage.name}: submitted job {job_ids[sub_stage.name]} ({job_name(cfg, sub_stage)}; "
              f"{shape.nodes} node(s) x {shape.tasks_per_node} task(s), {shape.gpus_per_node} GPU(s)/node"
              + (f"; after {', '.join(sub_stage.depends_on)}" if sub_stage.depends_on else "")
              + f") -> {sub_stage.results_dir}")
    if job_ids:
        print(f"follow with: squeue -j {','.join(job_ids.values())}")
    return job_ids
