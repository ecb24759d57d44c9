"""Find and run a stock `tritonserver` on a model repository.

Where the binary comes from (`find_tritonserver`), in this order:
  1. an explicitly configured path (the binary, or an install root holding `bin/tritonserver`);
  2. a `tritonserver` on PATH (NVIDIA's container: backends in /opt/tritonserver/backends);
  3. the binary embedded in the `nvidia-pytriton` wheel. That wheel ships the python backend without its stub;
     we copy `pytriton/tritonserver/backends/` once into a cache folder and add the
     `python_backend_stubs/<py>/triton_python_backend_stub` matching this interpreter.

`TritonServer` is a context manager: free loopback ports, logs to a file, waits until the server and every
model is ready, and always stops the server (SIGTERM, then SIGKILL of its whole process group) on exit.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Mapping, Sequence

STUB_NAME = "triton_python_backend_stub"


class TritonServerError(RuntimeError):
    """tritonserver could not be found, did not start, or a model failed to load."""


@dataclasses.dataclass(frozen=True)
class TritonInstall:
    """A runnable tritonserver: the binary, its backend folder and the environment it needs."""

    binary: Path
    backend_dir: Path | None  # None: let the server use its built-in default (/opt/tritonserver/backends)
    source: str  # "configured" | "path" | "pytriton"
    version: str | None = None  # the nvidia-pytriton version for the embedded binary, else unknown
    lib_dirs: tuple[Path, ...] = ()  # prepended to LD_LIBRARY_PATH

    def env(self, base: Mapping[str, str] | None = None, python_bin_dir: Path | None = None) -> dict[str, str]:
        """Environment for the server process.

        `python_bin_dir` goes first on PATH: the python backend stub embeds libpython and locates its prefix
        (and so the site-packages that model.py imports torch/numpy/tokenizers from) via `python3` on PATH.
        """
        env = dict(os.environ if base is None else base)
        env.pop("PYTHONHOME", None)  # would override the prefix the stub derives from PATH
        if python_bin_dir is not None:
            env["PATH"] = os.pathsep.join([str(python_bin_dir)] + [p for p in [env.get("PATH")] if p])
        if self.lib_dirs:
            old = env.get("LD_LIBRARY_PATH")
            env["LD_LIBRARY_PATH"] = os.pathsep.join([str(d) for d in self.lib_dirs] + ([old] if old else []))
        return env


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ft-exporter"


def _python_lib_dirs() -> list[Path]:
    """The folder holding this interpreter's libpython, if it was built shared.

    The stub is linked against `libpython3.X.so.1.0`; putting this interpreter's copy first makes the stub run
    exactly the same Python build as the environment (else the system one, e.g. Debian's libpython3.X, is used).
    """
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return []
    libdir = sysconfig.get_config_var("LIBDIR")
    soname = sysconfig.get_config_var("INSTSONAME") or ""
    if libdir and soname and (Path(libdir) / soname).exists():
        return [Path(libdir)]
    return []


def _backends_of(binary: Path) -> Path | None:
    """`<root>/backends` for a binary at `<root>/bin/tritonserver`, if that folder exists."""
    candidate = binary.resolve().parent.parent / "backends"
    return candidate if candidate.is_dir() else None


def _backend_dir_ok(path: Path) -> bool:
    return (path / "python" / "libtriton_python.so").is_file() and (path / "python" / STUB_NAME).is_file()


def _prepare_pytriton_backends(dist_dir: Path, stub: Path, target: Path) -> Path:
    """Copy the wheel's `backends/` plus the stub to `target`, atomically (safe against concurrent runs)."""
    if _backend_dir_ok(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        staged = tmp / "backends"
        shutil.copytree(dist_dir / "backends", staged, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(stub, staged / "python" / STUB_NAME)
        os.chmod(staged / "python" / STUB_NAME, 0o755)
        try:
            os.rename(staged, target)
        except OSError:
            # Another process won the race (target now exists and is non-empty); use theirs if complete.
            if not _backend_dir_ok(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _embedded_install(cache_dir: Path | None) -> TritonInstall | None:
    """The tritonserver shipped in the nvidia-pytriton wheel, with a prepared backend folder; None if absent."""
    # Locate the wheel's files without importing pytriton (slow, and pytriton itself is not used).
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    dist_dir = Path(list(spec.submodule_search_locations)[0]).resolve() / "tritonserver"
    binary = dist_dir / "bin" / "tritonserver"
    if not binary.is_file():
        return None
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist_dir / "python_backend_stubs" / py / STUB_NAME
    if not stub.is_file():
        raise TritonServerError(
            f"the nvidia-pytriton wheel at {dist_dir} has no python backend stub for Python {py} "
            f"(looked for {stub}); use a supported Python or configure a tritonserver path"
        )
    try:
        from importlib.metadata import version

        pt_version = version("nvidia-pytriton")
    except Exception:  # pragma: no cover - metadata missing in odd installs
        pt_version = "unknown"
    name = f"triton-backends-{pt_version}-py{py}"
    try:
        backend_dir = _prepare_pytriton_backends(dist_dir, stub, (cache_dir or _default_cache_dir()) / name)
    except OSError:
        if cache_dir is not None:
            raise
        # Read-only or missing HOME (some CI runners): fall back to a per-user folder in the temp dir.
        fallback = Path(tempfile.gettempdir()) / f"ft-exporter-{os.getuid()}"
        backend_dir = _prepare_pytriton_backends(dist_dir, stub, fallback / name)
    # Copied out of the wheel, the stub's RPATH ($ORIGIN/../../../../nvidia_pytriton.libs) no longer resolves,
    # so the wheel's bundled libraries must be on LD_LIBRARY_PATH.
    libs = dist_dir.parent.parent / "nvidia_pytriton.libs"
    lib_dirs = tuple(_python_lib_dirs()) + ((libs,) if libs.is_dir() else ())
    return TritonInstall(binary, backend_dir, "pytriton", pt_version, lib_dirs)


def find_tritonserver(
    configured: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None
) -> TritonInstall:
    """Locate tritonserver: configured path, then PATH, then the nvidia-pytriton wheel (see module doc)."""
    if configured:
        path = Path(configured).expanduser()
        if path.is_dir():
            path = path / "bin" / "tritonserver"
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise TritonServerError(f"configured tritonserver {configured!r} is not an executable file ({path})")
        return TritonInstall(path, _backends_of(path), "configured")
    on_path = shutil.which("tritonserver")
    if on_path:
        return TritonInstall(Path(on_path), _backends_of(Path(on_path)), "path")
    embedded = _embedded_install(Path(cache_dir) if cache_dir else None)
    if embedded is not None:
        return embedded
    raise TritonServerError(
        "no tritonserver found: not configured, none on PATH, and the nvidia-pytriton wheel "
        "(pip install nvidia-pytriton) is not installed"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS reports free right now (bind to port 0). Racy by nature; callers retry on conflict."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def _tail(path: Path, offset: int = 0, n_lines: int = 25, max_chars: int = 6000) -> str:
    """What to show when startup fails: model load errors first, then the log's last lines.

    Triton's option/model/backend tables (lines starting with '+' or '|') are dropped from the tail, except
    model rows reporting UNAVAILABLE; only the part of the log written since `offset` (this start) is used.
    """
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return "<no server log>"
    errors = [ln for ln in lines if "failed to load '" in ln or "UNAVAILABLE" in ln]
    tail = [ln for ln in lines if not ln.startswith(("+", "|"))][-n_lines:]
    text = ""
    if errors:
        text += "model load errors:\n" + "\n".join(errors)[-max_chars // 2 :] + "\n---- log tail:\n"
    return text + "\n".join(tail)[-max_chars:]


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: SIGTERM the server if our (thread) dies
    except Exception:
        pass


def _failed_models(client, expected: Sequence[str]) -> dict[str, str]:
    """{model: reason} for expected models the repository index reports UNAVAILABLE with a reason."""
    failed = {}
    for entry in client.get_model_repository_index():
        name, reason = entry.get("name"), entry.get("reason") or ""
        if name in expected and entry.get("state") == "UNAVAILABLE" and reason:
            failed[name] = reason
    return failed


def _repo_models(model_repository: Path) -> list[str]:
    """Models tritonserver will load in MODE_NONE: subfolders that have a config.pbtxt."""
    return sorted(p.name for p in model_repository.iterdir() if p.is_dir() and (p / "config.pbtxt").is_file())


class TritonServer:
    """Run tritonserver on `model_repository` for the duration of a `with` block.

    with TritonServer(repo, log_path=results / "tritonserver.log") as server:
        client = tritonclient.http.InferenceServerClient(server.http_url)

    `load_models`: None loads the whole repository (`--model-control-mode=none`); a list switches to explicit
    mode and loads just those. `extra_args` are appended to the command line (e.g. `--log-verbose=1`).
    """

    def __init__(
        self,
        model_repository: str | os.PathLike,
        log_path: str | os.PathLike,
        *,
        install: TritonInstall | None = None,
        tritonserver: str | None = None,
        load_models: Sequence[str] | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout_s: float = 300.0,
        stop_timeout_s: float = 30.0,
        host: str = "127.0.0.1",
        python_bin_dir: str | os.PathLike | None = None,
        env: Mapping[str, str] | None = None,
        port_retries: int = 3,
    ):
        self.model_repository = Path(model_repository).resolve()
        self.log_path = Path(log_path).resolve()
        self.install = install or find_tritonserver(tritonserver)
        self.load_models = list(load_models) if load_models is not None else None
        self.extra_args = list(extra_args)
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.host = host
        # Default: the bin folder of the interpreter running us (a venv's bin has `python3`).
        self.python_bin_dir = Path(python_bin_dir) if python_bin_dir else Path(sys.executable).parent
        self.base_env = env
        self.port_retries = port_retries
        self.process: subprocess.Popen | None = None
        self.http_port = self.grpc_port = self.metrics_port = 0
        self.server_id = f"ft-exporter-{os.getpid()}-{secrets.token_hex(4)}"  # server metadata "name"
        self.last_pid: int | None = None  # pid (= process group) of the latest server, kept after stop()
        self._log_offset = 0  # where this start's output begins in the (appended) log

    # -- urls --------------------------------------------------------------------------------------------------
    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    @property
    def http_url(self) -> str:
        """host:port for tritonclient.http (no scheme, as tritonclient expects)."""
        return f"{self._client_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self.metrics_port}/metrics"

    # -- command -----------------------------------------------------------------------------------------------
    def command(self) -> list[str]:
        """The argv for the current ports (no shell involved)."""
        argv = [
            str(self.install.binary),
            f"--id={self.server_id}",
            f"--model-repository={self.model_repository}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            f"--exit-timeout-secs={max(1, int(self.stop_timeout_s) - 5)}",
            # Unique shm region names: two servers on one machine must not share python-backend regions.
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix()}",
        ]
        if self.install.backend_dir is not None:
            argv.append(f"--backend-directory={self.install.backend_dir}")
        if self.load_models is None:
            argv.append("--model-control-mode=none")
        else:
            argv.append("--model-control-mode=explicit")
            argv += [f"--load-model={name}" for name in self.load_models]
        return argv + self.extra_args

    def _shm_prefix(self) -> str:
        """Name prefix of this server's python-backend shared-memory regions (/dev/shm/<prefix>...)."""
        return f"ftexp{os.getpid()}_{self.http_port}_"

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def __enter__(self) -> "TritonServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "TritonServer":
        """Start and wait until ready; on any failure (or Ctrl-C) the server is stopped before raising."""
        return self.spawn().wait_ready()

    def spawn(self) -> "TritonServer":
        """Start the server's process and return at once; `wait_ready()` waits for it, so that what the caller does
        in between overlaps the start. The process is spawned from the calling thread, which must outlive it
        (PR_SET_PDEATHSIG: the server is sent SIGTERM when that thread ends). On failure the server is stopped
        before raising."""
        if not self.model_repository.is_dir():
            raise TritonServerError(f"model repository {self.model_repository} is not a directory")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._spawn()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self) -> "TritonServer":
        """Wait until the spawned server and every model are ready, spawning it again on other ports when another
        process took one meanwhile (`port_retries` starts in all); on any failure (or Ctrl-C) the server is stopped
        before raising."""
        try:
            for attempt in range(1, self.port_retries + 1):
                try:
                    self._wait_ready()
                    return self
                except _PortConflict:
                    self.stop()
                    if attempt == self.port_retries:
                        raise self._error(f"could not bind free ports in {self.port_retries} attempts") from None
                    self._spawn()
        except BaseException:
            self.stop()
            raise
        return self  # pragma: no cover

    def _spawn(self) -> None:
        self.http_port, self.grpc_port, self.metrics_port = self._three_ports()
        env = self.install.env(self.base_env, self.python_bin_dir)
        with open(self.log_path, "ab") as log:
            log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(self.command())}\n".encode())
            log.flush()
            self._log_offset = log.tell()
            try:
                self.process = subprocess.Popen(
                    self.command(),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,  # own process group: stop() can reach the python backend stubs too
                    preexec_fn=_set_pdeathsig if sys.platform.startswith("linux") else None,
                )
            except OSError as e:
                raise TritonServerError(f"cannot execute {self.install.binary}: {e}") from e
        self.last_pid = self.process.pid

    def _three_ports(self) -> tuple[int, int, int]:
        ports: list[int] = []
        while len(ports) < 3:
            p = free_port(self._client_host)
            if p not in ports:
                ports.append(p)
        return ports[0], ports[1], ports[2]

    def _log_since_start(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def _wait_ready(self) -> None:
        import tritonclient.http as httpclient

        assert self.process is not None
        expected = self.load_models if self.load_models is not None else _repo_models(self.model_repository)
        deadline = time.monotonic() + self.startup_timeout_s
        client = httpclient.InferenceServerClient(self.http_url, connection_timeout=5.0, network_timeout=10.0)
        try:
            while True:
                code = self.process.poll()
                if code is not None:
                    # e.g. 'failed to start HTTP service: Unavailable - Socket '127.0.0.1:N' already in use'
                    log = self._log_since_start()
                    if "already in use" in log or "failed to bind" in log.lower():
                        raise _PortConflict()
                    raise self._error(f"tritonserver exited with code {code} during startup")
                if time.monotonic() > deadline:
                    raise self._error(f"tritonserver not ready after {self.startup_timeout_s:g}s (models {expected})")
                try:
                    ready, failed = self._probe(client, expected)
                except Exception:
                    ready, failed = False, {}  # not listening yet
                if ready and self.process.poll() is None:
                    return
                if failed:  # e.g. with --exit-on-error=false the server stays up without the model
                    reasons = "; ".join(f"{name}: {reason}" for name, reason in failed.items())
                    raise self._error(f"models failed to load: {reasons}")
                time.sleep(0.25)
        finally:
            client.close()

    def _probe(self, client, expected: Sequence[str]) -> tuple[bool, dict[str, str]]:
        """(all ready, {model: load error}) as our server reports them.

        The ports were free when picked, but the server binds them only after loading the models, so another
        server may hold one meanwhile: only the one answering with our `--id` counts.
        """
        if not client.is_server_live() or client.get_server_metadata().get("name") != self.server_id:
            return False, {}
        if client.is_server_ready() and all(client.is_model_ready(m) for m in expected):
            return True, {}
        return False, _failed_models(client, expected)

    def _error(self, what: str) -> TritonServerError:
        tail = _tail(self.log_path, self._log_offset)
        return TritonServerError(f"{what}; repository {self.model_repository}, log {self.log_path}:\n{tail}")

    def stop(self) -> None:
        """SIGTERM (graceful), wait `stop_timeout_s`, then SIGKILL the server's whole process group."""
        proc, self.process = self.process, None
        if proc is None:
            return
        pgid = proc.pid  # start_new_session=True: the server leads its own group
        try:
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(timeout=self.stop_timeout_s)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            # Kill whatever is left: a stuck server and/or python backend stubs it leaves behind.
            if proc.poll() is None:
                _killpg(pgid, signal.SIGKILL)
                proc.wait()
            # After a graceful exit the stubs are already gone. A server killed before it installed its signal
            # handlers (SIGTERM in its first ~0.1 s) orphans stubs that never exit: give them 1 s, then SIGKILL.
            deadline = time.monotonic() + 1.0
            while process_group_alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if process_group_alive(pgid):
                _killpg(pgid, signal.SIGKILL)
                time.sleep(0.2)
            # A killed server/stub leaves its regions behind; only names with our unique prefix are touched.
            for region in Path("/dev/shm").glob(self._shm_prefix() + "*"):
                try:
                    region.unlink()
                except OSError:
                    pass

    def restart(self) -> "TritonServer":
        """Stop and start again (new free ports: read the urls afterwards), e.g. when a model's python-backend stub
        died and the server keeps reporting ready (exporter/serve/health.py)."""
        self.stop()
        return self.start()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class _PortConflict(Exception):
    """The server exited because a port we picked was taken meanwhile; retry with new ports."""


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def process_group_alive(pgid: int) -> bool:
    """Whether any non-zombie process is left in process group `pgid`.

    Zombies count as gone: they hold no ports or memory, and are reaped by init at init's own pace (some
    container inits reap only every few seconds), so `killpg(pgid, 0)` alone would keep reporting them.
    """
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():  # no procfs: fall back to the signal probe
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        # "pid (comm) state ppid pgrp ...": comm may contain spaces/parens, so split after the last ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False
