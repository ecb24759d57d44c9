"""What a planned sub-stage asks a launcher for: a job folder, its shape, and the commands it runs.

Stages build these; launchers (exporter/launch/) turn them into an sbatch script, a bcprun script or local
processes. Nothing here knows which cluster runs it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path


class JobShapeError(ValueError):
    """The parallel layout cannot be placed on the cluster's nodes; raised before anything is submitted."""


@dataclass(frozen=True)
class Resources:
    """One job's shape: `nodes` x `tasks_per_node` tasks; `gpus_per_node` GPUs asked on each node (0: none)."""

    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0


@dataclass(frozen=True)
class Step:
    """One command of a job.

    Exactly one of `argv` (a program, run as is) or `entry` (this project's code: arguments of
    `python -m exporter.run_substage <saved config> ...`; the launcher supplies the interpreter and config path).
    """

    argv: tuple[str, ...] = ()
    entry: tuple[str, ...] = ()
    every_node: bool = False  # one task on every node of the job, in the background while the next steps run
    mpi: bool = False  # the tasks form one MPI world (srun --mpi=pmix; bcprun launches with MPI)
    notes: tuple[str, ...] = ()  # written above the command in the script

    def __post_init__(self) -> None:
        if bool(self.argv) == bool(self.entry):
            raise ValueError("a Step has exactly one of argv or entry")


@dataclass(frozen=True)
class SubStage:
    name: str  # convert, accuracy, ...
    stage: str  # the stage that planned it (export)
    results_dir: Path  # ${results_dir}/<name>/: script, resolved config, logs
    config_name: str  # the resolved config is saved as <config_name>_hydra.yaml (run.name)
    job_name: str  # launchers prepend cluster.job_name_prefix
    time_limit: str  # run.time_limit
    steps: tuple[Step, ...]
    resources: Resources = field(default_factory=Resources)
    depends_on: tuple[str, ...] = ()  # names of earlier sub-stages that must succeed first


def serving_resources(
    *, runtime: str, device: str, tensor_parallel: int, pipeline_parallel: int, gpus_per_node: int
) -> Resources:
    """The serving job's shape for a parallel layout.

    python runtime: one process serves every rank on one device -> 1 node, 1 task, 1 GPU (none on CPU).
    fastertransformer: TP*PP GPUs in all. On one node, one tritonserver uses them all. Across nodes, FT's Triton
    backend runs one tritonserver (one MPI rank) per node driving all of that node's GPUs, and keeps a
    tensor-parallel group inside a node: nodes = TP*PP / gpus_per_node whole nodes, TP dividing gpus_per_node.
    """
    if runtime == "python":
        if device == "cuda" and gpus_per_node == 0:
            raise JobShapeError("triton_deployment.device=cuda but cluster.gpus_per_node=0 (CPU-only nodes)")
        gpus = 0 if device == "cpu" or gpus_per_node == 0 else 1
        return Resources(nodes=1, tasks_per_node=1, gpus_per_node=gpus)
    world = tensor_parallel * pipeline_parallel
    if gpus_per_node < 1:
        raise JobShapeError(
            f"the fastertransformer runtime needs GPUs (TP*PP = {world}) but cluster.gpus_per_node=0"
        )
    if world <= gpus_per_node:
        return Resources(nodes=1, tasks_per_node=1, gpus_per_node=world)
    nodes = math.ceil(world / gpus_per_node)
    if tensor_parallel > gpus_per_node or gpus_per_node % tensor_parallel:
        raise JobShapeError(
            f"TP={tensor_parallel} does not fit inside one node of {gpus_per_node} GPUs: FT's multi-node Triton "
            f"backend keeps each tensor-parallel group within a node (use TP dividing {gpus_per_node}, and "
            "pipeline parallelism across nodes)"
        )
    if world != nodes * gpus_per_node:
        raise JobShapeError(
            f"TP*PP = {tensor_parallel}*{pipeline_parallel} = {world} GPUs does not fill whole nodes of "
            f"{gpus_per_node} GPUs ({nodes} nodes have {nodes * gpus_per_node}): FT's multi-node Triton backend "
            "runs one process per node using every GPU of it"
        )
    return Resources(nodes=nodes, tasks_per_node=1, gpus_per_node=gpus_per_node)
