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
    """One job's shape: `nodes` x `tasks_per_node` tasks; `gpus_per_node` GPUs asked on each node (0: none).

    `visible_devices`: when the job uses part of each node's GPUs, the CUDA devices its processes see on every node
    (CUDA_VISIBLE_DEVICES, e.g. (0, 1, 2, 3) for 4 GPUs of an 8-GPU node); () when it sees all it was given.
    """

    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    visible_devices: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.visible_devices and len(self.visible_devices) != self.gpus_per_node:
            raise ValueError(f"visible_devices {self.visible_devices} do not match gpus_per_node={self.gpus_per_node}")

    @property
    def device_list(self) -> str | None:
        """CUDA_VISIBLE_DEVICES for the job's processes ("0,1,2,3"), or None to leave it as the node sets it."""
        return ",".join(str(device) for device in self.visible_devices) if self.visible_devices else None


def node_share(gpus: int, gpus_per_node: int) -> tuple[int, ...]:
    """The devices a job using `gpus` of a node's `gpus_per_node` GPUs sees: the first `gpus` (the order FT's and
    torch's device ids follow); () when it uses every GPU of the node (or none)."""
    return tuple(range(gpus)) if 0 < gpus < gpus_per_node else ()


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
    200; `client` steps run beside it once it is ready, naming its host SERVER_HOST. `liveness`: arguments of
    `python` (this project's code) that exit non-zero when the running server no longer answers inferences (its
    readiness can stay true with a dead model process); empty: none."""

    servers: tuple[Step, ...]
    ports: tuple[tuple[str, int], ...]
    ready_path: str
    client: tuple[Step, ...]
    liveness: tuple[str, ...] = ()


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
