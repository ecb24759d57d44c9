"""What a planned sub-stage asks a launcher for: a job folder, its shape, and the commands it runs.

Stages build these (a serving runtime says the shape of the job that serves its model); launchers
(exporter/launch/) turn them into an sbatch script, a bcprun script or local processes. Nothing here knows which
cluster runs it.
"""

from __future__ import annotations

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


# In a Service's client steps, the server's host name; the launcher that runs the server puts its address there.
SERVER_HOST = "{server_host}"


@dataclass(frozen=True)
class Service:
    """The same work as a sub-stage's steps, split for launchers that run a server as its own workload (k8s):
    `servers` start the server (as every_node steps: one task per node of the job's shape; `mpi`: one MPI world),
    listening on `ports` (name -> port; "http" among them), ready when HTTP GET `ready_path` on the http port answers
    200; `client` steps run beside it once it is ready, naming its host SERVER_HOST."""

    servers: tuple[Step, ...]
    ports: tuple[tuple[str, int], ...]
    ready_path: str
    client: tuple[Step, ...]


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
    service: Service | None = None  # the steps as a server and its client, for launchers that run them apart
