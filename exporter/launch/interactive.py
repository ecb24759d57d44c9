"""cluster_type=interactive: run each sub-stage's commands here, one after the other, teeing their logs.

The same commands a cluster job runs (`python -m exporter.run_substage <saved config> ...`), with the same folder:
launcher.sh (for reference and re-running), the resolved config, launcher_cmd.log and log-<job>_local.out/.err.
"""

from __future__ import annotations

import logging
import os
import shlex
import time
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig

from ..jobs import SubStage
from ..prestart import substage_environment
from .common import (
    DEVICES_VARIABLE,
    LaunchError,
    job_name,
    log_paths,
    notes_lines,
    prepare,
    python_for,
    pythonpath_line,
    record_command,
    run_logged,
    step_argv,
    write_script,
)

log = logging.getLogger(__name__)


def local_commands(cfg: DictConfig, sub_stage: SubStage, config_path: Path) -> list[list[str]]:
    shape = sub_stage.resources
    if shape.nodes > 1 or any(step.every_node for step in sub_stage.steps):
        raise LaunchError(f"sub-stage {sub_stage.name} needs {shape.nodes} nodes; cluster_type=interactive runs on "
                          "this machine only (use cluster_type=bcm or bcp)")
    return [step_argv(step, python_for(cfg), config_path) for step in sub_stage.steps]


def local_devices(sub_stage: SubStage, given: str | None) -> str | None:
    """CUDA_VISIBLE_DEVICES for a sub-stage run here, or None to leave the environment's as it is.

    The plan's devices are the first GPUs of the node; where this process was itself given GPUs
    (CUDA_VISIBLE_DEVICES=`given`), the first ones of those (given 4,5,6,7, a plan of 0,1 -> 4,5).
    """
    shape = sub_stage.resources
    if given is None:
        return shape.device_list
    devices = [device.strip() for device in given.split(",") if device.strip()]
    if not devices or shape.gpus_per_node == 0:
        return None  # no GPUs given (a runtime that can falls back to the CPU), or none needed
    if len(devices) < shape.gpus_per_node:
        raise LaunchError(
            f"sub-stage {sub_stage.name} uses {shape.gpus_per_node} GPU(s) but this process was given "
            f"{len(devices)} (CUDA_VISIBLE_DEVICES={given}): list at least {shape.gpus_per_node} there, or unset it, "
            "or change the layout (TP*PP GPUs)"
        )
    return ",".join(devices[:shape.gpus_per_node])


def run_interactive(cfg: DictConfig, sub_stages: Sequence[SubStage]) -> None:
    workdir = Path.cwd()
    # The project on PYTHONPATH; the sub-stage's output is piped (teed), so progress bars when ours goes to a
    # terminal (exporter/progress.py). The same as main.py's early sub-stage interpreter's (exporter/prestart.py).
    base_env = substage_environment()
    # Every sub-stage is checked before the first one runs.
    planned = [(sub_stage, prepare(cfg, sub_stage)) for sub_stage in sub_stages]
    commands = [local_commands(cfg, sub_stage, config_path) for sub_stage, config_path in planned]
    devices = [local_devices(sub_stage, os.environ.get(DEVICES_VARIABLE)) for sub_stage, _ in planned]
    for (sub_stage, _), argvs, listed in zip(planned, commands, devices):
        lines = ["#!/bin/bash", f"# ft-exporter {sub_stage.stage}/{sub_stage.name}, run here", "set -euo pipefail",
                 f"cd {shlex.quote(str(workdir))}", pythonpath_line()]
        if listed is not None:
            lines.append(f"export {DEVICES_VARIABLE}={listed}  # the GPUs the sub-stage uses")
        for step, argv in zip(sub_stage.steps, argvs):
            lines += [*notes_lines(step), shlex.join(argv)]
        script = write_script(sub_stage, lines)
        record_command(sub_stage, ["bash", str(script.resolve())])
    if cfg.dry_run:
        for (sub_stage, _), argvs in zip(planned, commands):
            for argv in argvs:
                print(f"[dry run] {sub_stage.name}: would run: {shlex.join(argv)}")
        return
    for (sub_stage, _), argvs, listed in zip(planned, commands, devices):
        env = base_env if listed is None else {**base_env, DEVICES_VARIABLE: listed}
        out, err = log_paths(sub_stage, job_name(cfg, sub_stage), "local")
        log.info("== %s == (logs: %s, %s)", sub_stage.name, out, err)
        started = time.monotonic()
        run_logged(sub_stage, argvs, out, err, cwd=workdir, env=env)
        log.info("== %s done in %.1fs ==", sub_stage.name, time.monotonic() - started)
