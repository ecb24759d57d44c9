"""Python-runtime single-node serving manifests applied to a real Kubernetes API server (tests/k8s_cluster.py).

What this proves: the objects pass a real kube-apiserver's decoding, validation and admission, and come back with
the server's defaults filled in (a Job's generated selector, a Service's ClusterIP, a Deployment's strategy) — none
of which a schema check or a mock does. What it cannot: no pod runs (no kubelet or container runtime can be had here,
see docs/kubernetes-api-server.md), so the accuracy Job is created but never started.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
from pathlib import Path

import pytest

from k8s_cluster import SERVICE_CIDR, KubernetesApiServer, kubernetes_api_server  # noqa: F401 (fixture)
from test_k8s import helm  # noqa: F401 (fixture: scripts/install_helm.sh's helm)

pytestmark = pytest.mark.k8s

NAMESPACE = "ft-exporter"
RELEASE = "gpt2-python"
IMAGE = "nvcr.io/nvidia/tritonserver:24.08-py3"
PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
GPUS = 1
SHM_SIZE = "512Mi"
CLAIM = "ft-exporter-workspace"
REPOSITORY = "/workspace/results/export/model_repo"


def serving_manifests() -> list[dict]:
    """Namespace, Deployment (one tritonserver pod), Service and accuracy Job, shaped as python-runtime single-node
    serving is: the repository on a shared claim, /dev/shm in memory, GPUs as a limit, readiness on Triton's
    /v2/health/ready, a client Job that waits for the Service before reading LAMBADA through it."""
    labels = {"app.kubernetes.io/name": RELEASE, "app.kubernetes.io/component": "server"}
    workspace = {"name": "workspace", "persistentVolumeClaim": {"claimName": CLAIM}}
    shm = {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": SHM_SIZE}}
    server = {
        "name": "tritonserver",
        "image": IMAGE,
        "command": ["tritonserver", f"--model-repository={REPOSITORY}",
                    f"--http-port={PORTS['http']}", f"--grpc-port={PORTS['grpc']}",
                    f"--metrics-port={PORTS['metrics']}"],
        "ports": [{"name": name, "containerPort": port} for name, port in PORTS.items()],
        "resources": {"limits": {"nvidia.com/gpu": str(GPUS)}},
        "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": "http"}},
        "volumeMounts": [{"name": "workspace", "mountPath": "/workspace"}, {"name": "shm", "mountPath": "/dev/shm"}],
    }
    service_host = f"{RELEASE}.{NAMESPACE}.svc"
    client = {
        "name": "accuracy",
        "image": IMAGE,
        "command": ["python3", "-m", "exporter.run_substage", "/workspace/results/accuracy/export_gpt2_hydra.yaml",
                    "export", "accuracy", f"--server-url=http://{service_host}:{PORTS['http']}",
                    f"--server-grpc-url={service_host}:{PORTS['grpc']}"],
        "volumeMounts": [{"name": "workspace", "mountPath": "/workspace"}],
    }
    wait_for_server = {
        "name": "wait-for-server",
        "image": IMAGE,
        "command": ["sh", "-c", f"until curl -sf http://{service_host}:{PORTS['http']}/v2/health/ready; "
                                "do sleep 5; done"],
    }
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        {
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": RELEASE, "namespace": NAMESPACE, "labels": labels},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {"metadata": {"labels": labels},
                             "spec": {"containers": [server], "volumes": [workspace, shm]}},
            },
        },
        {
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": RELEASE, "namespace": NAMESPACE},
            "spec": {"selector": labels,
                     "ports": [{"name": name, "port": port, "targetPort": name} for name, port in PORTS.items()]},
        },
        {
            "apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": f"{RELEASE}-accuracy", "namespace": NAMESPACE},
            "spec": {
                "backoffLimit": 0,
                "template": {"spec": {"restartPolicy": "Never", "initContainers": [wait_for_server],
                                      "containers": [client], "volumes": [workspace]}},
            },
        },
    ]


def apply(server: KubernetesApiServer, manifests: list[dict], folder: Path, check: bool = True):
    path = folder / "manifests.json"
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": manifests}, indent=2))
    return server.kubectl_run("apply", "--filename", str(path), check=check)


@pytest.fixture(scope="module")
def applied(kubernetes_api_server, tmp_path_factory) -> KubernetesApiServer:
    result = apply(kubernetes_api_server, serving_manifests(), tmp_path_factory.mktemp("manifests"))
    assert f"deployment.apps/{RELEASE} created" in result.stdout
    return kubernetes_api_server


def test_server_reports_its_version(kubernetes_api_server):
    version = json.loads(kubernetes_api_server.kubectl_run("version", "--output", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == "v1.20.2"


def test_deployment_is_stored_as_given_with_server_defaults(applied):
    deployment = applied.get("deployment", RELEASE, NAMESPACE)
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert spec["replicas"] == 1
    assert container["command"][0] == "tritonserver"
    assert f"--model-repository={REPOSITORY}" in container["command"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == PORTS
    assert all(p["protocol"] == "TCP" for p in container["ports"])  # defaulted by the server
    assert container["resources"]["limits"] == {"nvidia.com/gpu": str(GPUS)}
    probe = container["readinessProbe"]
    assert probe["httpGet"]["path"] == "/v2/health/ready" and probe["httpGet"]["port"] == "http"
    assert probe["httpGet"]["scheme"] == "HTTP" and probe["periodSeconds"] == 10  # server defaults
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["shm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": SHM_SIZE}
    assert volumes["workspace"]["persistentVolumeClaim"]["claimName"] == CLAIM
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/workspace", "/dev/shm"}
    assert spec["strategy"]["type"] == "RollingUpdate"  # server default
    assert pod["restartPolicy"] == "Always" and pod["dnsPolicy"] == "ClusterFirst"  # server defaults


def test_service_gets_a_cluster_ip_and_targets_the_named_ports(applied):
    service = applied.get("service", RELEASE, NAMESPACE)["spec"]
    assert service["type"] == "ClusterIP"
    assert ipaddress.ip_address(service["clusterIP"]) in ipaddress.ip_network(SERVICE_CIDR)
    assert {p["name"]: (p["port"], p["targetPort"], p["protocol"]) for p in service["ports"]} == {
        name: (port, name, "TCP") for name, port in PORTS.items()}


def test_accuracy_job_gets_a_generated_selector_and_waits_for_the_server(applied):
    job = applied.get("job", f"{RELEASE}-accuracy", NAMESPACE)
    spec = job["spec"]
    # The server generates the selector and the pod labels it matches (controller-uid = the Job's uid).
    assert spec["selector"]["matchLabels"]["controller-uid"] == job["metadata"]["uid"]
    assert spec["template"]["metadata"]["labels"]["controller-uid"] == job["metadata"]["uid"]
    assert spec["backoffLimit"] == 0 and spec["completions"] == 1 and spec["parallelism"] == 1
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["initContainers"][0]["name"] == "wait-for-server"
    assert pod["containers"][0]["command"][:3] == ["python3", "-m", "exporter.run_substage"]
    # Nothing runs it: no controller manager, no kubelet (see the module docstring).
    assert job.get("status", {}).get("active") is None


def test_server_refuses_a_job_that_would_restart_forever(kubernetes_api_server, tmp_path):
    """A Job's pods may not restart Always: the API server's validation refuses it and stores nothing."""
    job = serving_manifests()[3]
    job["metadata"]["name"] = "restarts-always"
    job["metadata"]["namespace"] = "default"
    job["spec"]["template"]["spec"]["restartPolicy"] = "Always"
    result = apply(kubernetes_api_server, [job], tmp_path, check=False)
    assert result.returncode != 0
    assert "spec.template.spec.restartPolicy" in result.stderr
    missing = kubernetes_api_server.kubectl_run("get", "job", "restarts-always", "--namespace", "default", check=False)
    assert missing.returncode != 0 and "NotFound" in missing.stderr


def test_server_refuses_a_gpu_request_above_its_limit(kubernetes_api_server, tmp_path):
    """GPUs cannot be overcommitted: requests above the limit are refused by validation."""
    deployment = serving_manifests()[1]
    deployment["metadata"]["name"] = "overcommitted"
    deployment["metadata"]["namespace"] = "default"
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["resources"] = {"limits": {"nvidia.com/gpu": "1"}, "requests": {"nvidia.com/gpu": "2"}}
    result = apply(kubernetes_api_server, [deployment], tmp_path, check=False)
    assert result.returncode != 0
    assert "nvidia.com/gpu" in result.stderr


# The k8s launcher's own charts (exporter/launch/k8s.py), as `cluster_type=k8s dry_run=true` writes them.

def assert_stored_as_rendered(rendered, stored, path: str = "") -> None:
    """Every field the chart rendered is stored with the same value; the server may only add fields (defaults, a
    generated selector). Quantities compare as text: the chart's `nvidia.com/gpu: 1` is stored as "1"."""
    if isinstance(rendered, dict):
        assert isinstance(stored, dict), f"{path}: {stored!r} is not an object"
        for key, value in rendered.items():
            assert key in stored, f"{path}.{key} was not stored"
            assert_stored_as_rendered(value, stored[key], f"{path}.{key}")
    elif isinstance(rendered, list):
        assert isinstance(stored, list) and len(stored) == len(rendered), f"{path}: {stored!r}"
        for index, (item, stored_item) in enumerate(zip(rendered, stored)):
            assert_stored_as_rendered(item, stored_item, f"{path}[{index}]")
    else:
        same = rendered == stored or (type(rendered) in (int, float) and str(rendered) == stored)
        assert same, f"{path}: rendered {rendered!r}, stored {stored!r}"


def test_python_runtime_single_node_chart_installs_as_rendered(kubernetes_api_server, helm, tmp_path, monkeypatch):
    """The python runtime on one node with 1 GPU: the convert Job's chart and the accuracy chart (Deployment,
    Service, client Job), installed with `helm upgrade --install` into the real API server, are stored as rendered.

    Helm 4's default server-side apply: Kubernetes 1.20 refused the chart's GPU quantities when they were rendered
    as integers ("expected string, got 1", kubernetes/kubernetes#94275); they are strings now.
    """
    from test_k8s import render

    cfg, documents, folders = render(tmp_path, monkeypatch, "hostPath", "export.triton_deployment.device=auto")
    namespace = cfg.cluster.namespace
    assert [doc["kind"] for doc in documents["accuracy"]].count("Deployment") == 1  # one node: no StatefulSet
    for name, folder in folders.items():
        release = documents[name][0]["metadata"]["labels"]["app.kubernetes.io/instance"]
        install = [helm, "upgrade", "--install", release, str(folder / "chart"), "--namespace", namespace,
                   "--kubeconfig", str(kubernetes_api_server.kubeconfig)]
        done = subprocess.run(install, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"helm upgrade --install {name}: {done.stderr}"
        # Helm's release record is a Secret in the API server (what `helm list` reads).
        kubernetes_api_server.get("secret", f"sh.helm.release.v1.{release}.v1", namespace)
        for document in documents[name]:
            stored = kubernetes_api_server.get(document["kind"], document["metadata"]["name"], namespace)
            assert_stored_as_rendered(document, stored, f"{document['kind']}/{document['metadata']['name']}")
            if document["kind"] == "Job":
                assert stored["spec"]["selector"]["matchLabels"]["controller-uid"] == stored["metadata"]["uid"]
            if document["kind"] == "Service":
                cluster_ip = ipaddress.ip_address(stored["spec"]["clusterIP"])
                assert cluster_ip in ipaddress.ip_network(SERVICE_CIDR)
