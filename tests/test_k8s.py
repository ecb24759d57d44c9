"""cluster_type=k8s: every shape of the Kubernetes seed rendered by a real Helm, linted, validated against the
OpenAPI schemas of a current Kubernetes (kubernetes-validate, strict), and read field by field.

Expected values come from the seed's tables written out here (TP x PP -> pods x GPUs), not from the launcher.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from exporter.config import ConfigError, validate
from exporter.launch import LaunchError
from exporter.launch.k8s import find_helm, release_name, time_limit_seconds
from test_config import composed

pytestmark = pytest.mark.k8s

IMAGE = "nvcr.io/nvidia/tritonserver:24.08-py3"
K8S = ("cluster=k8s", "cluster_type=k8s", f"cluster.image={IMAGE}", "export.model.checkpoint_path=builtin:tiny-gpt2")
FT = ("export.triton_deployment.runtime=fastertransformer",)  # FT's backend: one tritonserver per pod across nodes
KUBERNETES_VERSION = "1.37.0"  # the newest schemas kubernetes-validate ships


@pytest.fixture(scope="module")
def helm() -> str:
    found = find_helm()
    if found is None:
        message = "helm is not installed (scripts/install_helm.sh)"
        if os.environ.get("CI") == "true":
            pytest.fail(message + "; CI installs it")
        pytest.skip(message)
    return found


@pytest.fixture(scope="module")
def schemas():
    return pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed (the test extra)")


def volume_overrides(kind: str, root: Path) -> tuple[str, ...]:
    """The volume under `root` (which holds base_results_dir) as each kind mounts it."""
    if kind == "hostPath":
        return (f"cluster.volumes.hostPath.path={root}", "cluster.volumes.hostPath.type=DirectoryOrCreate")
    if kind == "nfs":
        return ("cluster.volumes.nfs.server=nfs.example.internal", f"cluster.volumes.nfs.path={root}")
    # A claim (e.g. over a CSI host-path driver), its folder mounted at /<subPath> = root.
    return ("cluster.volumes.persistentVolumeClaim.claimName=ft-workspace",
            f"cluster.volumes.persistentVolumeClaim.subPath={str(root).lstrip('/')}")


def render(tmp_path: Path, monkeypatch, volume: str, *overrides: str):
    """main.run with dry_run=true from tmp_path -> (cfg, {sub-stage: [manifest documents]}, {sub-stage: folder})."""
    from main import run

    monkeypatch.chdir(tmp_path)
    cfg = validate(composed(f"base_results_dir={tmp_path / 'results'}", "dry_run=true", *K8S,
                            *volume_overrides(volume, tmp_path), *overrides))
    run(cfg)
    results = Path(cfg.export.run.results_dir)
    folders = {name: results / name for name in ("convert", "accuracy")}
    documents = {name: [doc for doc in yaml.safe_load_all((folder / "manifests.yaml").read_text()) if doc]
                 for name, folder in folders.items()}
    return cfg, documents, folders


def only(documents: list[dict], kind: str, name_suffix: str = "") -> dict:
    found = [doc for doc in documents if doc["kind"] == kind and doc["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"{kind} *{name_suffix}: {[doc['metadata']['name'] for doc in found]}"
    return found[0]


def container(pod: dict, name: str) -> dict:
    (found,) = [c for c in pod["containers"] + pod.get("initContainers", []) if c["name"] == name]
    return found


def env_of(container_spec: dict) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container_spec.get("env", [])}


def check_pod_common(pod: dict, mount_path: str, *, sub_path: str | None, volume: dict, shm: str,
                     workdir: Path, pull_secret: str | None, dns_policy: str | None, kinds: set[str]) -> None:
    """Volumes, mounts, /dev/shm, image, working directory, PYTHONPATH, pull secret and DNS policy of one pod."""
    volumes = {entry["name"]: entry for entry in pod["volumes"]}
    assert {key: value for key, value in volumes["workspace"].items() if key != "name"} == volume
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": shm}
    for spec in pod["containers"]:
        assert spec["image"] == IMAGE
        assert spec["workingDir"] == str(workdir)
        mounts = {mount["name"]: mount for mount in spec["volumeMounts"]}
        assert mounts["workspace"]["mountPath"] == mount_path
        assert mounts["workspace"].get("subPath") == sub_path
        assert mounts["dshm"]["mountPath"] == "/dev/shm"
        env = env_of(spec)
        assert env["PYTHONPATH"] == str(Path(__file__).resolve().parents[1])
        assert ("MPI_HOSTS" in env) == (spec["name"] == "tritonserver" and "StatefulSet" in kinds)
    assert pod.get("imagePullSecrets") == ([{"name": pull_secret}] if pull_secret else None)
    assert pod.get("dnsPolicy") == dns_policy


def validate_and_lint(helm: str, schemas, folders: dict[str, Path], documents: dict[str, list[dict]]) -> None:
    for name, folder in folders.items():
        lint = subprocess.run([helm, "lint", "--strict", str(folder / "chart")], capture_output=True, text=True)
        assert lint.returncode == 0, f"helm lint {name}: {lint.stdout}{lint.stderr}"
        for document in documents[name]:
            schemas.validate(document, KUBERNETES_VERSION, strict=True)


# The seed's shapes: (id, overrides, volume kind, pods, GPUs per pod, IB devices per pod).
SHAPES = [
    ("one-node-1-gpu", ("export.triton_deployment.device=auto",), "hostPath", 1, 1, 0),
    ("three-nodes-1-gpu-shared-claim", (*FT, "cluster.gpus_per_node=1",
                                        "export.triton_deployment.pipeline_model_parallel_size=3",
                                        "cluster.ib_resource_name=nvidia.com/hostdev", "cluster.ib_count=1"),
     "persistentVolumeClaim", 3, 1, 1),
    ("nfs", (), "nfs", 1, 1, 0),
    ("cpu-only-nodes", ("cluster.gpus_per_node=0",), "hostPath", 1, 0, 0),  # the python runtime on CPU: no GPU asked
    # Seed 003's TP x PP rows on nodes of 8 GPUs: TP 1/2/4/8 on one node, TP 8 x PP 2 on 2 nodes.
    ("tp1", (*FT, "export.model.tensor_model_parallel_size=1"), "hostPath", 1, 1, 0),
    ("tp2", (*FT, "export.model.tensor_model_parallel_size=2"), "hostPath", 1, 2, 0),
    ("tp4", (*FT, "export.model.tensor_model_parallel_size=4"), "nfs", 1, 4, 0),
    ("tp8", (*FT, "export.model.tensor_model_parallel_size=8"), "persistentVolumeClaim", 1, 8, 0),
    ("tp8-pp2", (*FT, "export.model.tensor_model_parallel_size=8",
                 "export.triton_deployment.pipeline_model_parallel_size=2",
                 "cluster.ib_resource_name=nvidia.com/hostdev"), "persistentVolumeClaim", 2, 8, 8),
]


@pytest.mark.parametrize("shape_id, overrides, volume, pods, gpus, ib", SHAPES, ids=[shape[0] for shape in SHAPES])
def test_every_shape_renders_lints_validates_and_reads_right(helm, schemas, tmp_path, monkeypatch, shape_id,
                                                             overrides, volume, pods, gpus, ib):
    extras = ("cluster.pull_secret=ngc-registry", "cluster.dns_policy=ClusterFirstWithHostNet",
              "cluster.shm_size=64Gi", "cluster.namespace=llm") if shape_id != "nfs" else ()
    cfg, documents, folders = render(tmp_path, monkeypatch, volume, *overrides, *extras)
    validate_and_lint(helm, schemas, folders, documents)

    expected_volume = {
        "hostPath": {"hostPath": {"path": str(tmp_path), "type": "DirectoryOrCreate"}},
        "nfs": {"nfs": {"server": "nfs.example.internal", "path": str(tmp_path)}},
        "persistentVolumeClaim": {"persistentVolumeClaim": {"claimName": "ft-workspace"}},
    }[volume]
    common = dict(mount_path=str(tmp_path), sub_path=str(tmp_path).lstrip("/") if volume == "persistentVolumeClaim"
                  else None, volume=expected_volume, shm="64Gi" if extras else "16Gi", workdir=tmp_path,
                  pull_secret="ngc-registry" if extras else None,
                  dns_policy="ClusterFirstWithHostNet" if extras else None,
                  kinds={doc["kind"] for doc in documents["accuracy"]})
    namespace = "llm" if extras else "default"
    results = Path(cfg.export.run.results_dir)

    # convert: one Job, no GPUs, running the saved config's convert sub-stage.
    (convert,) = documents["convert"]
    assert convert["kind"] == "Job" and convert["spec"]["backoffLimit"] == 0
    assert convert["spec"]["activeDeadlineSeconds"] == 2 * 3600  # run.time_limit 2:00:00
    pod = convert["spec"]["template"]["spec"]
    check_pod_common(pod, **common)
    assert pod["restartPolicy"] == "Never"
    (step,) = pod["containers"]
    assert step["command"] == ["python3", "-m", "exporter.run_substage",
                               str(results / "convert" / f"{cfg.export.run.name}_hydra.yaml"), "export", "convert"]
    assert "resources" not in step

    # accuracy: the server, its Service, the client Job.
    accuracy = documents["accuracy"]
    release = "ft-exporter-export-gpt2-accuracy"
    server = only(accuracy, "StatefulSet" if pods > 1 else "Deployment", "-server")
    assert server["metadata"]["name"] == f"{release}-server"
    assert server["spec"]["replicas"] == pods
    pod = server["spec"]["template"]["spec"]
    check_pod_common(pod, **common)
    triton = container(pod, "tritonserver")
    asked = {**({"nvidia.com/gpu": str(gpus)} if gpus else {}), **({"nvidia.com/hostdev": str(ib)} if ib else {})}
    assert triton.get("resources") == ({"requests": asked, "limits": asked} if asked else None)
    ports = {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert {port["name"]: port["containerPort"] for port in triton["ports"]} == ports
    command = triton["command"]
    server_argv = command[command.index("tritonserver"):]
    assert server_argv == ["tritonserver", f"--model-repository={results / 'model_repo'}", "--http-port=8000",
                           "--grpc-port=8001", "--metrics-port=8002"]
    assert triton["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    if pods == 1:  # liveness that infers (exporter.serve.health), probed once the server has started
        assert triton["startupProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
        assert triton["livenessProbe"]["exec"]["command"] == [
            "python3", "-m", "exporter.serve.health", "--url", "127.0.0.1:8001", "--timeout", "30"]
        assert triton["livenessProbe"]["timeoutSeconds"] > 30
    else:  # only rank 0 takes requests
        assert "livenessProbe" not in triton and "startupProbe" not in triton

    service = only(accuracy, "Service", "-server")
    assert {port["name"]: (port["port"], port["targetPort"]) for port in service["spec"]["ports"]} == {
        name: (port, name) for name, port in ports.items()}
    selector = service["spec"]["selector"]
    labels = server["spec"]["template"]["metadata"]["labels"]
    assert all(labels[key] == value for key, value in selector.items() if key != "statefulset.kubernetes.io/pod-name")
    host = f"{release}-server.{namespace}.svc"

    if pods > 1:  # one MPI world over the pods, started by rank 0 (pod -0), which the Service selects
        assert server["spec"]["serviceName"] == f"{release}-ranks"
        assert server["spec"]["podManagementPolicy"] == "Parallel"
        assert selector["statefulset.kubernetes.io/pod-name"] == f"{release}-server-0"
        ranks = only(accuracy, "Service", "-ranks")
        assert ranks["spec"]["clusterIP"] == "None" and ranks["spec"]["publishNotReadyAddresses"] is True
        assert command[:2] == ["bash", "/etc/ft-exporter/mpi/mpi-world.sh"]
        env = env_of(triton)
        assert env["MPI_HOSTS"].split(",") == [f"{release}-server-{rank}.{release}-ranks" for rank in range(pods)]
        script = only(accuracy, "ConfigMap", "-mpi-world")["data"]["mpi-world.sh"]
        assert "mpirun" in script and '"$@"' in script
        subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # the script parses
        assert only(accuracy, "Secret", "-mpi-key")["stringData"]["id_ecdsa"].startswith("-----BEGIN EC PRIVATE KEY")
    else:
        assert command == server_argv
        assert "statefulset.kubernetes.io/pod-name" not in selector
        assert not [doc for doc in accuracy if doc["kind"] in ("StatefulSet", "ConfigMap", "Secret")]

    client = only(accuracy, "Job", "-client-r1")
    pod = client["spec"]["template"]["spec"]
    check_pod_common(pod, **common)
    wait = container(pod, "wait-for-server")
    assert env_of(wait)["READY_URL"] == f"http://{host}:8000/v2/health/ready"
    assert wait["command"][:2] == ["python3", "-c"] and wait["image"] == IMAGE
    run = container(pod, "client")
    assert run["command"] == ["python3", "-m", "exporter.run_substage",
                              str(results / "accuracy" / f"{cfg.export.run.name}_hydra.yaml"), "export", "accuracy",
                              "--server-url", f"http://{host}:8000", "--server-grpc-url", f"{host}:8001"]
    assert "resources" not in run  # the client needs no GPU

    # dry run: what would be installed is recorded, with the chart written beside it.
    line = (folders["accuracy"] / "launcher_cmd.log").read_text().strip()
    argv = shlex.split(line)
    assert argv[1:5] == ["upgrade", "--install", release, str(folders["accuracy"] / "chart")]
    assert argv[argv.index("--namespace") + 1] == namespace and "--wait-for-jobs" in argv


def test_dry_run_applies_nothing(helm, tmp_path, monkeypatch):
    """With dry_run=true, helm is called for `template` only: a helm on PATH that records its calls sees nothing else,
    and no kubectl is run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.log"
    for tool, real in (("helm", helm), ("kubectl", "false")):
        wrapper = bin_dir / tool
        wrapper.write_text(f'#!/bin/sh\necho "{tool} $1" >> {calls}\nexec {real} "$@"\n')
        wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    render(tmp_path, monkeypatch, "hostPath")
    assert calls.read_text().splitlines() == ["helm template", "helm template"]


def test_install_failure_says_which_release_and_why(helm, tmp_path, monkeypatch):
    """Not a dry run, no reachable cluster: a LaunchError naming the sub-stage, the release and helm's own reason,
    before the next sub-stage is tried."""
    from main import run

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "none",
        "clusters": [{"name": "none", "cluster": {"server": "https://127.0.0.1:1"}}],
        "contexts": [{"name": "none", "context": {"cluster": "none", "user": "none"}}],
        "users": [{"name": "none", "user": {}}]}))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.chdir(tmp_path)
    cfg = validate(composed(f"base_results_dir={tmp_path / 'results'}", *K8S,
                            *volume_overrides("hostPath", tmp_path), "export.run.time_limit=0:01:00"))
    with pytest.raises(LaunchError) as failure:
        run(cfg)
    message = str(failure.value)
    assert message.startswith("helm failed for convert (release ft-exporter-export-gpt2-convert, exit 1)")
    assert "127.0.0.1:1" in message  # helm's reason: the API server it could not reach
    assert not (Path(cfg.export.run.results_dir) / "model_repo").exists()


def test_schema_validation_is_live(schemas):
    """The validator refuses what Kubernetes would: an unknown field, and a port given as text."""
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "x"},
           "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "i"}]}}}}
    schemas.validate(job, KUBERNETES_VERSION, strict=True)
    bad = {**job, "spec": {**job["spec"], "replica": 2}}
    with pytest.raises(schemas.ValidationError):
        schemas.validate(bad, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize(
    "overrides, key",
    [
        ((), "cluster.volumes"),  # no volume
        (("cluster.volumes.hostPath.path=/data", "cluster.volumes.nfs.server=n", "cluster.volumes.nfs.path=/data"),
         "cluster.volumes"),
        (("cluster.volumes.nfs.path=/data",), "cluster.volumes.nfs.server"),
        (("cluster.volumes.hostPath.path=data",), "cluster.volumes.hostPath.path"),
        (("cluster.volumes.hostPath.path=/data", "cluster.volumes.hostPath.type=Folder"),
         "cluster.volumes.hostPath.type"),
        (("cluster.volumes.persistentVolumeClaim.claimName=ws",), "cluster.volumes.persistentVolumeClaim.mountPath"),
        (("cluster.volumes.persistentVolumeClaim.claimName=ws", "cluster.volumes.persistentVolumeClaim.subPath=/ws"),
         "cluster.volumes.persistentVolumeClaim.subPath"),
        (("cluster.volumes.persistentVolumeClaim.claimName=Work_Space",
          "cluster.volumes.persistentVolumeClaim.mountPath=/data"), "cluster.volumes.persistentVolumeClaim.claimName"),
        (("cluster.volumes.hostPath.path=/elsewhere",), "base_results_dir"),
        (("cluster.volumes.hostPath.path=/data", "cluster.shm_size=lots"), "cluster.shm_size"),
        (("cluster.volumes.hostPath.path=/data", "cluster.namespace=LLM_Team"), "cluster.namespace"),
        (("cluster.volumes.hostPath.path=/data", "cluster.dns_policy=Cluster"), "cluster.dns_policy"),
        (("cluster.volumes.hostPath.path=/data", "cluster.ib_count=eight"), "cluster.ib_count"),
        (("cluster.volumes.hostPath.path=/data", "cluster.ib_resource_name=hostdev"), "cluster.ib_resource_name"),
        (("cluster.volumes.hostPath.path=/data", "cluster.gpu_resource_name=gpu"), "cluster.gpu_resource_name"),
        (("cluster.volumes.hostPath.path=/data", "cluster.pull_secret=NGC Key"), "cluster.pull_secret"),
        (("cluster.volumes.hostPath.path=/data", "cluster.image=null"), "cluster.image"),
    ],
)
def test_bad_k8s_config_names_the_key(overrides, key):
    with pytest.raises(ConfigError) as error:
        validate(composed("cluster=k8s", "cluster_type=k8s", f"cluster.image={IMAGE}", "base_results_dir=/data/results",
                          *overrides))
    assert str(error.value).startswith(f"{key}: ")


def test_k8s_cluster_keys_are_nemo_launchers():
    cfg = composed("cluster=k8s")
    for key in ("pull_secret", "shm_size", "volumes", "ib_resource_name", "ib_count", "dns_policy"):
        assert key in cfg.cluster, key
    assert set(cfg.cluster.volumes) == {"nfs", "hostPath", "persistentVolumeClaim"}
    assert {"server", "path"} <= set(cfg.cluster.volumes.nfs)
    assert {"path", "type"} <= set(cfg.cluster.volumes.hostPath)
    assert {"claimName", "subPath"} <= set(cfg.cluster.volumes.persistentVolumeClaim)
    assert cfg.cluster.gpu_resource_name == "nvidia.com/gpu"


@pytest.mark.parametrize("limit, seconds", [("30", 1800), ("5:30", 330), ("2:00:00", 7200), ("1-0", 86400),
                                             ("1-2:30", 95400), ("0-0:0:45", 45)])
def test_time_limit_in_slurm_formats(limit, seconds):
    assert time_limit_seconds(limit) == seconds


def test_release_names_are_kubernetes_names():
    """Kubernetes-safe release names; long ones stay distinct per sub-stage (plain truncation gave convert and
    accuracy one release name, so installing accuracy would have replaced convert's release)."""
    from types import SimpleNamespace

    cfg = SimpleNamespace(cluster=SimpleNamespace(job_name_prefix="9_Team."))
    long_run = "export_" + "very_long_model_name" * 4
    names = {sub_stage: release_name(cfg, SimpleNamespace(name=sub_stage, job_name=f"{long_run}_{sub_stage}"))
             for sub_stage in ("convert", "accuracy")}
    for sub_stage, name in names.items():
        assert name.startswith("r-9-team-export-very") and name.endswith(sub_stage) and len(name) <= 42
        assert name.replace("-", "").isalnum() and name == name.lower() and "--" not in name
    assert names["convert"] != names["accuracy"]
    short = release_name(SimpleNamespace(cluster=SimpleNamespace(job_name_prefix="ft-exporter-")),
                         SimpleNamespace(name="convert", job_name="export_gpt2_convert"))
    assert short == "ft-exporter-export-gpt2-convert"


def test_client_waits_until_the_server_is_ready(tmp_path, monkeypatch, helm):
    """The client Job's init container, run here as rendered: it keeps polling while the readiness path answers 503
    and returns once it answers 200."""
    import http.server
    import threading

    _, documents, _ = render(tmp_path, monkeypatch, "hostPath")
    wait = container(only(documents["accuracy"], "Job", "-client-r1")["spec"]["template"]["spec"], "wait-for-server")
    answers = iter([503, 503, 200])
    seen = []

    class Ready(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802  (http.server's name)
            seen.append(self.path)
            self.send_response(next(answers, 200))
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ready)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v2/health/ready"
        script = wait["command"][2].replace("time.sleep(5)", "time.sleep(0.1)")  # the same loop, polled faster
        done = subprocess.run([sys.executable, "-c", script], env={**os.environ, "READY_URL": url},
                              capture_output=True, text=True, timeout=60)
    finally:
        server.shutdown()
    assert done.returncode == 0, done.stderr
    assert seen == ["/v2/health/ready"] * 3
    assert done.stdout.count("waiting for") == 2
