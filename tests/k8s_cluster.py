"""A real Kubernetes API server for the `k8s` tests: etcd + kube-apiserver on free loopback ports.

`scripts/kube_api_server.sh install` puts kube-apiserver, kubectl (both Kubernetes 1.20.2, from Debian's
`kubernetes` sources) and etcd in one folder; $KUBE_API_SERVER_DIR names another. The server runs in a temp dir with
its own CA and serving certificate (openssl), a static bearer token and a service-account key; a kubeconfig for it is
written beside them. Started once per session, waited for on /readyz, always stopped (etcd too).

There is no kubelet, scheduler or controller manager: objects are admitted, validated, defaulted and stored, but no
pod runs (docs/kubernetes-api-server.md says why). Without the binaries the tests skip naming the missing one; in CI
(CI=true) they fail instead, so CI always runs them.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

DEFAULT_BIN_DIR = Path("/opt/ft-exporter/kubernetes-1.20.2/bin")
BINARIES = ("etcd", "kube-apiserver", "kubectl")
READY_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 15.0
SERVICE_CIDR = "10.96.0.0/16"  # ClusterIPs the server hands out; nothing is routed to them


class ApiServerError(RuntimeError):
    """The API server or etcd did not come up; the message carries their log tails."""


@dataclass(frozen=True)
class KubernetesApiServer:
    """What a test needs to talk to the running server."""

    url: str
    kubeconfig: Path
    kubectl: Path
    root: Path

    def kubectl_run(self, *args: str, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """`kubectl --kubeconfig <ours> <args>`; on failure (check=True) the error names the command and its stderr."""
        argv = [str(self.kubectl), "--kubeconfig", str(self.kubeconfig), *args]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
        return result

    def get(self, kind: str, name: str, namespace: str) -> dict:
        """The object as the API server stores it (defaults filled in)."""
        return json.loads(self.kubectl_run("get", kind, name, "--namespace", namespace, "--output", "json").stdout)


def find_binaries() -> dict[str, Path] | str:
    """{name: path} for etcd, kube-apiserver and kubectl, or one line naming what is missing.

    Looked for in $KUBE_API_SERVER_DIR, else DEFAULT_BIN_DIR (the install script's), then etcd alone on PATH.
    kubectl must be the folder's own (1.20.2): another on PATH may be a dozen versions away from the server.
    """
    folder = Path(os.environ.get("KUBE_API_SERVER_DIR") or DEFAULT_BIN_DIR)
    found, missing = {}, []
    for name in BINARIES:
        candidate = folder / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            found[name] = candidate
        elif name == "etcd" and shutil.which("etcd"):
            found[name] = Path(shutil.which("etcd"))
        else:
            missing.append(name)
    if missing:
        return f"{', '.join(missing)} not found in {folder} (run scripts/kube_api_server.sh install)"
    return found


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise ApiServerError(f"openssl {args[0]} failed: {result.stderr.strip()}")


def write_certificates(folder: Path) -> None:
    """ca.crt/ca.key, a serving certificate for 127.0.0.1/localhost signed by it, and a service-account key pair."""
    folder.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "2", "-subj", "/CN=ft-exporter-test-ca", cwd=folder)
    (folder / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=kube-apiserver", cwd=folder)
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "2", "-extfile", "server.ext", "-out", "server.crt", cwd=folder)
    _openssl("genrsa", "-out", "service-account.key", "2048", cwd=folder)
    _openssl("rsa", "-in", "service-account.key", "-pubout", "-out", "service-account.pub", cwd=folder)


def write_kubeconfig(path: Path, url: str, ca: Path, token: str) -> None:
    """A kubeconfig (JSON is valid YAML) with one cluster, one token user and a current context."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": {"server": url, "certificate-authority": str(ca)}}],
        "users": [{"name": "admin", "user": {"token": token}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "admin", "namespace": "default"}}],
        "current-context": "test",
    }
    path.write_text(json.dumps(config, indent=2))


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


@contextmanager
def _process(argv: list[str], log: Path) -> Iterator[subprocess.Popen]:
    """A background process with its output in `log`; terminated (then killed) when the block ends."""
    with open(log, "wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_ready(url: str, ca: Path, token: str, processes: dict[str, tuple[subprocess.Popen, Path]]) -> None:
    """Poll GET /readyz until it answers 200; fail with the logs when a process exits or time runs out."""
    context = ssl.create_default_context(cafile=str(ca))
    request = urllib.request.Request(f"{url}/readyz", headers={"Authorization": f"Bearer {token}"})
    deadline = time.monotonic() + READY_TIMEOUT_S
    last = "no answer yet"
    while time.monotonic() < deadline:
        for name, (process, log) in processes.items():
            if process.poll() is not None:
                raise ApiServerError(f"{name} exited {process.returncode} while starting:\n{_log_tail(log)}")
        try:
            with urllib.request.urlopen(request, context=context, timeout=5) as response:
                if response.status == 200:
                    return
        except urllib.error.HTTPError as error:  # 500 while post-start hooks run
            last = f"HTTP {error.code}"
        except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
            last = str(error)
        time.sleep(0.5)
    logs = "\n".join(f"--- {name}:\n{_log_tail(log)}" for name, (_, log) in processes.items())
    raise ApiServerError(f"kube-apiserver not ready after {READY_TIMEOUT_S:.0f} s ({last})\n{logs}")


@contextmanager
def start_api_server(root: Path, binaries: dict[str, Path]) -> Iterator[KubernetesApiServer]:
    """etcd + kube-apiserver under `root`, ready; both stopped when the block ends, whatever happens."""
    from exporter.serve.tritonserver import free_port

    certs = root / "certs"
    write_certificates(certs)
    token = os.urandom(16).hex()
    (root / "tokens.csv").write_text(f'{token},admin,admin,"system:masters"\n')
    etcd_client, etcd_peer, api_port = free_port(), free_port(), free_port()
    etcd_url = f"http://127.0.0.1:{etcd_client}"
    url = f"https://127.0.0.1:{api_port}"
    etcd_argv = [
        str(binaries["etcd"]), "--name", "test", "--data-dir", str(root / "etcd"),
        "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
        "--listen-peer-urls", f"http://127.0.0.1:{etcd_peer}",
        "--initial-advertise-peer-urls", f"http://127.0.0.1:{etcd_peer}",
        "--initial-cluster", f"test=http://127.0.0.1:{etcd_peer}",
    ]
    apiserver_argv = [
        str(binaries["kube-apiserver"]),
        "--etcd-servers", etcd_url,
        "--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1", "--secure-port", str(api_port),
        "--cert-dir", str(root / "apiserver-certs"),
        "--tls-cert-file", str(certs / "server.crt"), "--tls-private-key-file", str(certs / "server.key"),
        "--client-ca-file", str(certs / "ca.crt"),
        "--token-auth-file", str(root / "tokens.csv"),
        "--authorization-mode", "RBAC",
        "--service-account-issuer", "https://kubernetes.default.svc",
        "--service-account-key-file", str(certs / "service-account.pub"),
        "--service-account-signing-key-file", str(certs / "service-account.key"),
        "--service-cluster-ip-range", SERVICE_CIDR,
        # No controller manager creates the `default` service account, so pods could not be admitted with
        # ServiceAccount admission on; the rest of the default admission chain stays.
        "--disable-admission-plugins", "ServiceAccount",
    ]
    with ExitStack() as stack:
        etcd = stack.enter_context(_process(etcd_argv, root / "etcd.log"))
        apiserver = stack.enter_context(_process(apiserver_argv, root / "kube-apiserver.log"))
        _wait_ready(url, certs / "ca.crt", token, {
            "etcd": (etcd, root / "etcd.log"), "kube-apiserver": (apiserver, root / "kube-apiserver.log")})
        kubeconfig = root / "kubeconfig"
        write_kubeconfig(kubeconfig, url, certs / "ca.crt", token)
        yield KubernetesApiServer(url=url, kubeconfig=kubeconfig, kubectl=binaries["kubectl"], root=root)


@pytest.fixture(scope="session")
def kubernetes_api_server(tmp_path_factory) -> Iterator[KubernetesApiServer]:
    """The session's API server; skipped (failed when CI=true) naming the missing binary."""
    binaries = find_binaries()
    if isinstance(binaries, str):
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the Kubernetes API server tests: {binaries}")
        pytest.skip(binaries)
    with start_api_server(tmp_path_factory.mktemp("kubernetes"), binaries) as server:
        yield server
