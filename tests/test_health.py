"""The zombie server, pinned, and the liveness check that sees it (exporter/serve/health.py).

Bug pinned: when the python-backend stub of the served model dies (what an OOM kill does), tritonserver 2.51 keeps
reporting the server and the model ready while every request fails with "Stub process 'gpt2_0_0' is not healthy.",
and the python backend never starts a new stub by itself. Readiness probes therefore keep routing traffic to it.
The check infers (one tiny request per model), exits 1 from its CLI, and `ensure_healthy` restarts the server.

Tried and not used (tritonserver 2.51, explicit model control): `load` of the loaded model is a no-op that keeps the
dead stub, with or without its config as an override; in one try, unload + load started a new instance yet the
probe still failed.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from exporter.clients import common
from serving_fixtures import tritonserver_or_skip

pytestmark = pytest.mark.triton

MODEL = "gpt2"
REQUEST = {"input_ids": np.array([[464, 2068, 7586]], dtype=np.uint32),
           "input_lengths": np.array([[3]], dtype=np.uint32),
           "request_output_len": np.array([[2]], dtype=np.uint32)}


def stub_pids(server, model: str) -> list[int]:
    """The python-backend stubs of `model` in the server's process group (argv[1] is the model's model.py)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        group = int(stat[stat.rfind(")") + 2:].split()[2])
        if (group == server.process.pid and argv[0].endswith(b"triton_python_backend_stub")
                and Path(os.fsdecode(argv[1])).parts[-3:-2] == (model,)):  # <repository>/<model>/<version>/model.py
            pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_gpt2):
    pytest.importorskip("tritonclient.grpc")
    from exporter.parallel import ParallelLayout
    from exporter.runtimes import ModelSettings
    from exporter.serve.tritonserver import TritonServer
    from exporter.stages.export import build_repository

    install = tritonserver_or_skip()
    root = tmp_path_factory.mktemp("health")
    settings = ModelSettings(name=MODEL, runtime="python", max_batch_size=2, layout=ParallelLayout(1, 1),
                             data_type="fp32", device="cpu")
    repo = build_repository(root / "model_repo", tiny_gpt2, settings, "fp32")
    with TritonServer(repo, root / "tritonserver.log", install=install, startup_timeout_s=240) as running:
        yield running


def test_warm_up_request_ran_before_the_model_was_ready(server):
    """model_warmup (exporter/triton/render.py add_warmup): by the time the server reports ready, the model has
    executed exactly one request of one prompt token, as its own metrics count (no request was sent yet)."""
    from test_metrics import scrape

    metrics = scrape(server.metrics_url)
    assert metrics[("ft_python_requests_total", MODEL)] == 1
    assert metrics[("ft_python_prompt_tokens_total", MODEL)] == 1
    assert metrics[("ft_python_request_failures_total", MODEL)] == 0
    assert metrics[("ft_python_generated_tokens_total", MODEL)] <= 1


def test_killed_stub_is_a_zombie_the_check_sees_and_a_restart_cures(server, capsys):
    from exporter.serve import health

    import tritonclient.http as http

    assert health.check(server.grpc_url) == []
    assert health.main(["--url", server.grpc_url, "--timeout", "20"]) == 0
    common.infer(server.http_url, "http", MODEL, REQUEST)

    (pid,) = stub_pids(server, MODEL)
    os.kill(pid, signal.SIGKILL)  # what the OOM killer does
    time.sleep(1)
    client = http.InferenceServerClient(server.http_url)
    for _ in range(2):  # every later request fails: the backend does not restart the stub
        with pytest.raises(common.ClientError, match=r"Stub process 'gpt2_0_0' is not healthy"):
            common.infer(server.http_url, "http", MODEL, REQUEST)
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)  # the lie
    client.close()

    problems = health.check(server.grpc_url, [MODEL])
    assert [(problem.model, problem.dead_stub_model) for problem in problems] == [(MODEL, MODEL)]
    capsys.readouterr()
    assert health.main(["--url", server.grpc_url]) == 1
    assert "unhealthy: gpt2: Stub process 'gpt2_0_0' is not healthy." in capsys.readouterr().err

    cured = health.ensure_healthy(server)  # restarts the server
    assert MODEL in [problem.model for problem in cured]  # with any model that calls it (BLS)
    assert health.check(server.grpc_url) == []
    result = common.infer(server.http_url, "http", MODEL, REQUEST)
    assert result["output_ids"].shape[-1] == 5
