"""cluster_type=k8s: one Helm release per sub-stage, installed in order, each waited for before the next.

Per sub-stage, ${results_dir}/<sub_stage>/ holds `chart/` (exporter/launch/charts/substage with this sub-stage's
values.yaml) and `manifests.yaml` (`helm template` of it). A sub-stage is a Job running its steps in order; one
with a Service (a server and its client) is the server (a Deployment on one node; across nodes a StatefulSet with
a headless Service, one pod per node, MPI steps started as one MPI world from rank 0), a Service for its ports and
the client as a Job that starts once the server answers its readiness path. Every pod mounts the configured volume
(cluster.volumes), /dev/shm (an emptyDir of medium Memory, cluster.shm_size) and runs cluster.image in the
directory main.py ran in. `dry_run=true` writes the charts and manifests and applies nothing; otherwise
`helm upgrade --install --wait --wait-for-jobs` per release, a status line each, and on a failure the release's
events and the ends of its pods' logs (kubectl).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import yaml
from omegaconf import DictConfig

from ..atomic import AtomicDirectory, write_text_atomic
from ..config import k8s_volume
from ..jobs import SERVER_HOST, Resources, Step, SubStage
from .common import CONTAINER_PYTHON, PROJECT_ROOT, LaunchError, job_name, prepare, record_command, step_argv

CHART = Path(__file__).resolve().parent / "charts" / "substage"
CHART_DIR = "chart"
MANIFESTS = "manifests.yaml"
SSH_PORT = 2222  # the ranks' sshd (mpirun starts the other ranks over ssh); not 22, which an image may use
RELEASE_NAME_LIMIT = 53 - len("-client-r999")  # Helm's release limit, less what the chart appends to Job names
LOG_TAIL_LINES = 20


def release_name(cfg: DictConfig, sub_stage: SubStage) -> str:
    """<job_name_prefix><job name> as a Kubernetes name: lower case, '-' for anything else, a letter first, at
    most 42 characters (Helm's 53 less the suffixes of the objects' names). A longer name keeps its start and
    the sub-stage's name around a hash of the whole, so the releases of one run never share a name."""
    full = job_name(cfg, sub_stage)
    name = re.sub(r"[^a-z0-9-]+", "-", full.lower()).strip("-")
    if not name[:1].isalpha():  # Service names start with a letter
        name = "r-" + name
    if len(name) <= RELEASE_NAME_LIMIT:
        return name
    digest = hashlib.sha256(full.encode()).hexdigest()[:8]
    tail = re.sub(r"[^a-z0-9-]+", "-", sub_stage.name.lower()).strip("-")[:16]
    head = name[:RELEASE_NAME_LIMIT - len(tail) - len(digest) - 2].rstrip("-")
    return f"{head}-{digest}-{tail}"


def time_limit_seconds(limit: str) -> int:
    """Slurm's time formats (MM, MM:SS, H:MM:SS, D-H, D-H:MM, D-H:MM:SS) -> seconds (activeDeadlineSeconds)."""
    days, dash, clock = limit.partition("-") if "-" in limit else ("0", "", limit)
    try:
        day_count, parts = int(days), [int(part) for part in clock.split(":")]
    except ValueError:
        parts = []
    if not 1 <= len(parts) <= 3:
        raise LaunchError(f"export.run.time_limit {limit!r} is not MM, MM:SS, H:MM:SS or D-H[:MM[:SS]]")
    if dash:
        hours, minutes, seconds = (parts + [0, 0])[:3]
    else:
        hours, minutes, seconds = {1: (0, parts[0], 0), 2: (0, *parts), 3: tuple(parts)}[len(parts)]
    return ((day_count * 24 + hours) * 60 + minutes) * 60 + seconds


def pod_values(cfg: DictConfig, workdir: Path) -> dict:
    """What every pod of the release shares: image, pull secret, DNS policy, volume, shm, environment."""
    cluster = cfg.cluster
    kind, mount_path = k8s_volume(cluster)
    volumes = cluster.volumes
    if kind == "nfs":
        volume = {"nfs": {"server": volumes.nfs.server, "path": volumes.nfs.path}}
    elif kind == "hostPath":
        volume = {"hostPath": {"path": volumes.hostPath.path, "type": volumes.hostPath.type}}
    else:
        volume = {"persistentVolumeClaim": {"claimName": volumes.persistentVolumeClaim.claimName}}
    return {
        "image": cluster.image,
        "pullSecret": cluster.pull_secret,
        "dnsPolicy": cluster.dns_policy,
        "volume": volume,
        "mountPath": mount_path,
        "subPath": volumes.persistentVolumeClaim.subPath if kind == "persistentVolumeClaim" else None,
        "shmSize": cluster.shm_size,
        "workingDir": str(workdir),
        # This project's folder as main.py sees it: on the volume, or at that path in the image (harmless when the
        # image has the package installed instead).
        "env": [{"name": "PYTHONPATH", "value": str(PROJECT_ROOT)}],
    }


def resources(cfg: DictConfig, shape: Resources) -> dict[str, str]:
    """Extended resources one pod asks for: its GPUs; IB devices for the pods of a multi-node job.

    Quantities are strings, as the API's schema types them: an integer is refused by server-side apply (Helm 4's
    default) on Kubernetes before 1.21 ("expected string, got 1", kubernetes/kubernetes#94275).

    No CUDA device list is set: the device plugin gives the pod exactly the GPUs it asks for, numbered from 0 (a
    list of a node's device numbers, as Slurm jobs use, could name devices the pod does not have)."""
    asked = {}
    if shape.gpus_per_node:
        asked[cfg.cluster.gpu_resource_name] = str(shape.gpus_per_node)
    if shape.nodes > 1 and cfg.cluster.ib_resource_name:
        asked[cfg.cluster.ib_resource_name] = str(int(cfg.cluster.ib_count))
    return asked


def _single(steps: Sequence[Step], what: str, sub_stage: SubStage) -> Step:
    if len(steps) != 1:
        raise LaunchError(f"sub-stage {sub_stage.name}: cluster_type=k8s runs one {what} step per pod, "
                          f"the plan has {len(steps)}")
    return steps[0]


def chart_values(cfg: DictConfig, sub_stage: SubStage, config_path: Path, workdir: Path) -> dict:
    """The chart's values.yaml for one sub-stage: a Job of its steps, or its Service's server and client."""
    release = release_name(cfg, sub_stage)
    values = {
        "subStage": sub_stage.name,
        "activeDeadlineSeconds": time_limit_seconds(sub_stage.time_limit),
        "pod": pod_values(cfg, workdir),
        "job": None,
        "server": None,
        "client": None,
    }
    service, shape = sub_stage.service, sub_stage.resources
    if service is None:
        if shape.nodes > 1 or any(step.every_node for step in sub_stage.steps):
            raise LaunchError(f"sub-stage {sub_stage.name} needs {shape.nodes} nodes but plans no server to run "
                              "across them; cluster_type=k8s runs such a sub-stage as one Job")
        values["job"] = {"steps": [step_argv(step, CONTAINER_PYTHON, config_path) for step in sub_stage.steps],
                         "resources": resources(cfg, shape)}
        return values
    server = _single(service.servers, "server", sub_stage)
    ports = [{"name": name, "port": port} for name, port in service.ports]
    argv = step_argv(server, CONTAINER_PYTHON, config_path)
    mpi = server.mpi and shape.nodes > 1
    if mpi:
        hosts = [f"{release}-server-{rank}.{release}-ranks" for rank in range(shape.nodes)]
        env = [{"name": "MPI_HOSTS", "value": ",".join(hosts)}, {"name": "SSH_PORT", "value": str(SSH_PORT)}]
        argv = ["bash", "/etc/ft-exporter/mpi/mpi-world.sh", *argv]
    values["server"] = {"replicas": shape.nodes, "command": argv, "env": env if mpi else [], "ports": ports,
                        "readyPath": service.ready_path, "mpi": mpi, "sshPort": SSH_PORT,
                        # One pod: its own server answers the probe. Across pods only rank 0 takes requests.
                        "liveness": [CONTAINER_PYTHON, *service.liveness] if service.liveness and not mpi else None,
                        "resources": resources(cfg, shape)}
    host = f"{release}-server.{cfg.cluster.namespace}.svc"  # the Service in front of the server (rank 0)
    client = _single(service.client, "client", sub_stage)
    http = dict(service.ports)["http"]
    values["client"] = {
        "steps": [[word.replace(SERVER_HOST, host) for word in step_argv(client, CONTAINER_PYTHON, config_path)]],
        "readyUrl": f"http://{host}:{http}{service.ready_path}",
    }
    return values


def write_chart(cfg: DictConfig, sub_stage: SubStage, config_path: Path, workdir: Path) -> Path:
    """${results_dir}/<sub_stage>/chart/: the chart's files and this sub-stage's values.yaml (replacing an older
    chart). Returns the chart's folder. Also what a caller that applies a chart itself uses."""
    values = chart_values(cfg, sub_stage, config_path, workdir)
    target = sub_stage.results_dir / CHART_DIR
    with AtomicDirectory(target) as partial:
        shutil.copytree(CHART, partial, dirs_exist_ok=True)
        (partial / "values.yaml").write_text("# Written by exporter/launch/k8s.py for this sub-stage.\n"
                                             + yaml.safe_dump(values, sort_keys=False, width=1000))
    return target


def helm_common(cfg: DictConfig, release: str, chart: Path) -> list[str]:
    return [release, str(chart), "--namespace", cfg.cluster.namespace]


def render(helm: str, cfg: DictConfig, sub_stage: SubStage, chart: Path) -> Path:
    """`helm template` of the sub-stage's chart -> ${results_dir}/<sub_stage>/manifests.yaml."""
    argv = [helm, "template", *helm_common(cfg, release_name(cfg, sub_stage), chart)]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise LaunchError(f"helm template failed for {sub_stage.name} (exit {done.returncode}): "
                          f"{done.stderr.strip()}")
    path = sub_stage.results_dir / MANIFESTS
    write_text_atomic(path, done.stdout)
    return path


def render_sub_stage(cfg: DictConfig, sub_stage: SubStage, helm: str = "helm") -> tuple[Path, Path]:
    """Write one sub-stage's saved config, chart and rendered manifests into ${results_dir}/<sub_stage>/, applying
    nothing: (chart folder, manifests.yaml). For callers that apply a chart themselves, e.g. with the sub-stages of
    `exporter.stages.export.plan(validate(cfg))`."""
    config_path = prepare(cfg, sub_stage)
    chart = write_chart(cfg, sub_stage, config_path, Path.cwd())
    return chart, render(helm, cfg, sub_stage, chart)


def install_argv(helm: str, cfg: DictConfig, sub_stage: SubStage, chart: Path) -> list[str]:
    """Install or upgrade the release and wait: its Deployment/StatefulSet ready, its Jobs complete."""
    timeout = f"{time_limit_seconds(sub_stage.time_limit)}s"
    return [helm, "upgrade", "--install", *helm_common(cfg, release_name(cfg, sub_stage), chart),
            "--wait", "--wait-for-jobs", "--timeout", timeout]


def diagnose(cfg: DictConfig, release: str) -> str:
    """The release's events and the ends of its pods' logs, for a failed install (best effort: kubectl)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return "(no kubectl on PATH: no events or logs)"
    namespace = ["--namespace", cfg.cluster.namespace]
    selector = f"app.kubernetes.io/instance={release}"
    sections = []
    pods = subprocess.run([kubectl, "get", "pods", *namespace, "-l", selector, "-o", "name"],
                          capture_output=True, text=True)
    names = [line.split("/", 1)[-1] for line in pods.stdout.split()]
    for name in names:
        events = subprocess.run([kubectl, "get", "events", *namespace, "--field-selector",
                                 f"involvedObject.name={name}", "--sort-by=.lastTimestamp"],
                                capture_output=True, text=True)
        logs = subprocess.run([kubectl, "logs", *namespace, name, "--all-containers", "--prefix",
                               f"--tail={LOG_TAIL_LINES}"], capture_output=True, text=True)
        sections.append(f"-- events of pod {name}:\n{(events.stdout or events.stderr).strip()}"
                        f"\n-- end of its logs:\n{(logs.stdout or logs.stderr).strip()}")
    if not names:
        sections.append(f"-- no pods with {selector}: {pods.stderr.strip()}")
    return "\n".join(sections)


def find_helm() -> str | None:
    """helm on PATH, else beside this interpreter (scripts/install_helm.sh puts it in the virtual environment)."""
    return shutil.which("helm") or shutil.which("helm", path=str(Path(sys.executable).parent))


def run_k8s(cfg: DictConfig, sub_stages: Sequence[SubStage]) -> None:
    """Write every sub-stage's chart and manifests; unless dry_run, install them in order, each waited for."""
    helm = find_helm()
    if helm is None:
        raise LaunchError("cluster_type=k8s needs `helm` on PATH (it renders the charts, for dry_run too): "
                          "scripts/install_helm.sh installs one")
    rendered = []
    for sub_stage in sub_stages:  # every chart renders before anything is applied
        chart, manifests = render_sub_stage(cfg, sub_stage, helm)
        argv = install_argv(helm, cfg, sub_stage, chart)
        rendered.append((sub_stage, chart, argv, record_command(sub_stage, argv)))
        print(f"{sub_stage.name}: chart {chart}, manifests {manifests}")
    for sub_stage, chart, argv, line in rendered:
        release = release_name(cfg, sub_stage)
        if cfg.dry_run:
            print(f"[dry run] {sub_stage.name}: would run: {line}")
            continue
        print(f"{sub_stage.name}: installing release {release} in namespace {cfg.cluster.namespace}: {line}")
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode != 0:
            raise LaunchError(f"helm failed for {sub_stage.name} (release {release}, exit {done.returncode}): "
                              f"{(done.stderr or done.stdout).strip()}\n{diagnose(cfg, release)}")
        status = subprocess.run([helm, "status", release, "--namespace", cfg.cluster.namespace, "-o", "json"],
                                capture_output=True, text=True)
        state = yaml.safe_load(status.stdout).get("info", {}).get("status", "?") if status.returncode == 0 else "?"
        print(f"{sub_stage.name}: release {release} {state} (namespace {cfg.cluster.namespace}; remove with "
              f"helm uninstall {release} --namespace {cfg.cluster.namespace})")
