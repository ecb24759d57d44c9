"""One served repository for the request-interface tests (interface, streaming, bad requests, clients, load).

Imported by tests/conftest.py so the session-scoped server starts once for all of those files. The repository
holds the tiny HF GPT-2 of conftest.py exported twice: `gpt2` + `ensemble` (plain responses) and `gpt2_stream`
+ `ensemble_stream` (decoupled: one response per generated token), sharing preprocessing and postprocessing, and the
TensorRT-LLM-compatible `trtllm` / `trtllm_stream` over each.
Dynamic batching waits QUEUE_DELAY_US so concurrent requests share a batch.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

MAX_BATCH_SIZE = 8
MAX_BEAM_WIDTH = 4
QUEUE_DELAY_US = 20_000
MODEL, STREAM_MODEL = "gpt2", "gpt2_stream"
ENSEMBLE, STREAM_ENSEMBLE = "ensemble", "ensemble_stream"
TRTLLM, TRTLLM_STREAM = "trtllm", "trtllm_stream"  # the TensorRT-LLM-compatible model over each


def tritonserver_or_skip():
    """The tritonserver install the tests use ($FT_TRITONSERVER, else PATH, else nvidia-pytriton's); a skip naming
    what is missing when there is none."""
    from exporter.serve.tritonserver import TritonServerError, find_tritonserver

    try:
        return find_tritonserver(os.environ.get("FT_TRITONSERVER") or None)
    except TritonServerError as error:
        pytest.skip(f"no tritonserver: {error}")


@dataclass(frozen=True)
class Served:
    """What a test needs to reach the shared server."""

    http_url: str
    grpc_url: str
    repository: Path
    server: object  # exporter.serve.tritonserver.TritonServer
    max_positions: int


def build_serving_repository(root: Path, checkpoint: Path) -> Path:
    """`root/model_repo` with both the plain and the decoupled model and their ensembles."""
    from exporter.triton import render
    from exporter.parallel import ParallelLayout
    from exporter.runtimes import ModelSettings
    from exporter.stages.export import build_repository

    def settings(name: str, decoupled: bool) -> ModelSettings:
        return ModelSettings(
            name=name, runtime="python", max_batch_size=MAX_BATCH_SIZE, layout=ParallelLayout(1, 1),
            data_type="fp32", device="cpu", max_queue_delay_microseconds=QUEUE_DELAY_US,
            decoupled=decoupled, max_beam_width=MAX_BEAM_WIDTH,
        )

    repo = build_repository(root / "model_repo", checkpoint, settings(MODEL, False), "fp32")
    streaming = build_repository(root / "stream_repo", checkpoint, settings(STREAM_MODEL, True), "fp32")
    shutil.copytree(streaming / STREAM_MODEL, repo / STREAM_MODEL)
    ensemble = render.ensemble_config(STREAM_MODEL, MAX_BATCH_SIZE, decoupled=True)
    ensemble.name = STREAM_ENSEMBLE
    (repo / STREAM_ENSEMBLE / "1").mkdir(parents=True)
    render.write_config(ensemble, repo / STREAM_ENSEMBLE)
    # The TensorRT-LLM-compatible model over the decoupled model too (the plain export made TRTLLM over MODEL).
    shutil.copytree(streaming / TRTLLM, repo / TRTLLM_STREAM)
    config_path = repo / TRTLLM_STREAM / "config.pbtxt"
    config_path.write_text(config_path.read_text().replace(f'name: "{TRTLLM}"', f'name: "{TRTLLM_STREAM}"', 1))
    shutil.rmtree(streaming)
    return repo


@pytest.fixture(scope="session")
def served(tmp_path_factory, tiny_gpt2):
    """The shared tritonserver (started once per session, always stopped)."""
    pytest.importorskip("tritonclient.grpc")
    from exporter.serve.tritonserver import TritonServer

    install = tritonserver_or_skip()
    root = tmp_path_factory.mktemp("serving")
    repo = build_serving_repository(root, tiny_gpt2)
    with TritonServer(repo, root / "tritonserver.log", install=install, startup_timeout_s=240) as server:
        yield Served(server.http_url, server.grpc_url, repo, server, max_positions=128)
