"""cluster_type=bcp: inside a running Base Command Platform job, each sub-stage is a `bcprun` script run in order.

`bcprun --nnodes N --npernode T --cmd '<command>'` starts the command on the job's nodes; the command is one
shell-quoted argv (`shlex.join`) that sets the working directory and PYTHONPATH with `env`, so every node runs
the same thing wherever bcprun starts it. Sub-stages run one after the other; a failure stops the ones after it.
"""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig

from ..jobs import Step, SubStage
from .common import (
    DEVICES_VARIABLE,
    PROJECT_ROOT,
    LaunchError,
    job_name,
    log_paths,
    notes_lines,
    prepare,
    python_for,
    record_command,
    run_logged,
    step_argv,
    write_script,
)


def bcprun_argv(sub_stage: SubStage, step: Step, command: Sequence[str], workdir: Path) -> list[str]:
    shape = sub_stage.resources
    nodes, per_node = (shape.nodes, shape.tasks_per_node) if step.every_node or shape.nodes == 1 else (1, 1)
    devices = [] if shape.device_list is None else [f"{DEVICES_VARIABLE}={shape.device_list}"]  # part of a node
    wrapped = ["env", f"--chdir={workdir}", f"PYTHONPATH={PROJECT_ROOT}", *devices, *command]
    return ["bcprun", "--nnodes", str(nodes), "--npernode", str(per_node), "--cmd", shlex.join(wrapped)]


def bcprun_script(cfg: DictConfig, sub_stage: SubStage, config_path: Path, workdir: Path) -> list[str]:
    python = python_for(cfg)
    shape = sub_stage.resources
    lines = [
        "#!/bin/bash",
        f"# ft-exporter {sub_stage.stage}/{sub_stage.name} ({job_name(cfg, sub_stage)}) on Base Command Platform:",
        f"# {shape.nodes} node(s) x {shape.tasks_per_node} task(s), {shape.gpus_per_node} GPU(s) per node; "
        "run inside the BCP job with the command in launcher_cmd.log",
        "set -euo pipefail",
    ]
    if any(step.every_node for step in sub_stage.steps):
        lines.append("trap 'kill $(jobs -p) 2>/dev/null || true' EXIT  # background servers end with the script")
    for step in sub_stage.steps:
        command = bcprun_argv(sub_stage, step, step_argv(step, python, config_path), workdir)
        lines += ["", *notes_lines(step), shlex.join(command) + (" &" if step.every_node else "")]
    return lines


def run_bcp(cfg: DictConfig, sub_stages: Sequence[SubStage]) -> None:
    if not cfg.dry_run and shutil.which("bcprun") is None:
        raise LaunchError("cluster_type=bcp needs `bcprun` on PATH (run main.py inside a Base Command Platform job, "
                          "or set dry_run=true)")
    workdir = Path.cwd()
    for sub_stage in sub_stages:
        config_path = prepare(cfg, sub_stage)
        script = write_script(sub_stage, bcprun_script(cfg, sub_stage, config_path, workdir)).resolve()
        argv = ["bash", str(script)]
        line = record_command(sub_stage, argv)
        if cfg.dry_run:
            print(f"[dry run] {sub_stage.name}: would run: {line}")
            continue
        out, err = log_paths(sub_stage, job_name(cfg, sub_stage), "bcp")
        print(f"{sub_stage.name}: running {line} (logs: {out.name}, {err.name})")
        run_logged(sub_stage, [argv], out, err, cwd=workdir, env=dict(os.environ))
