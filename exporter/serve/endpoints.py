"""Where a tritonserver that has a node (or a pod) to itself listens, and how to ask it whether it is ready."""

from __future__ import annotations

from pathlib import Path

# Triton's own default ports (FT's multi-node server in exporter/runtimes/fastertransformer.py uses the same).
PORTS: tuple[tuple[str, int], ...] = (("http", 8000), ("grpc", 8001), ("metrics", 8002))
# KServe v2 server readiness: HTTP 200 once the server is up and (strict readiness, the default) every model loaded.
READY_PATH = "/v2/health/ready"


def server_argv(tritonserver: str, repository: Path) -> tuple[str, ...]:
    """A tritonserver serving `repository` on PORTS."""
    return (tritonserver, f"--model-repository={repository}", *(f"--{name}-port={port}" for name, port in PORTS))
