"""A liveness check that really infers, and the repair of what it finds.

Triton's own health endpoints do not see a dead python-backend stub: when the stub of a model dies (an OOM kill,
a crash in torch), tritonserver 2.51 keeps answering /v2/health/ready and /v2/models/<m>/ready with 200 while every
request to that model fails with "Stub process '<model>_0_0' is not healthy.", and the python backend does not
restart the stub by itself (tests/test_health.py shows both with the real server). So the check sends each probed
model one tiny request (every required input 1 / "1", one token to generate) over gRPC with a short timeout.

Recovery is a restart of the server: the check's non-zero exit is a failed liveness probe, so Kubernetes restarts
the container and a Slurm / local step fails fast; the local launcher restarts it itself (TritonServer.restart(),
used by `ensure_healthy`). Reloading the model through the repository API is no way out in tritonserver 2.51: `load`
of a loaded model whose files did not change is a no-op that keeps the dead stub (even with its config as an
override); in one try, unload + load started a new instance yet the probe still failed (not pursued).

    python -m exporter.serve.health --url 127.0.0.1:8001 [--model gpt2] [--timeout 10]

exits 0 when every probed model answered, 1 otherwise, with one line per failing model. By default every ready
model except the ensembles is probed (an ensemble runs no stub of its own, and a request through it would generate
as many tokens as preprocessing's default output length).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

# "Stub process 'gpt2_0_0' is not healthy.": the model's name, then its instance group and instance indices.
_STUB_MESSAGE = re.compile(r"Stub process '(?P<model>.+)_\d+_\d+' is not healthy")
_NUMPY_TYPES = {"BOOL": np.bool_, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
                "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
                "FP16": np.float16, "FP32": np.float32, "FP64": np.float64}


@dataclass(frozen=True)
class Problem:
    """A probed model that did not answer: its name, the error, and the model whose stub is dead (if named)."""

    model: str
    message: str
    dead_stub_model: str | None = None

    def __str__(self) -> str:
        return f"{self.model}: {self.message}"


def probe_request(config) -> dict[str, np.ndarray]:
    """One row of ones for every required input of a model (its gRPC ModelConfig): a -1 dimension becomes 1, a
    string is "1". For a decoder: one prompt token, one token to generate."""
    arrays = {}
    batched = config.max_batch_size > 0
    for tensor in config.input:
        if tensor.optional:
            continue
        dims = [1 if d < 0 else d for d in tensor.dims]
        shape = ([1] if batched else []) + dims
        type_name = model_type(tensor.data_type)
        if type_name == "STRING":
            arrays[tensor.name] = np.full(shape, b"1", dtype=object)
        else:
            arrays[tensor.name] = np.ones(shape, dtype=_NUMPY_TYPES[type_name])
    return arrays


def model_type(data_type: int) -> str:
    from tritonclient.grpc import model_config_pb2 as pb

    return pb.DataType.Name(data_type).removeprefix("TYPE_")


def default_models(client, timeout_s: float | None = None) -> list[str]:
    """Every ready model that is not an ensemble."""
    index = client.get_model_repository_index(client_timeout=timeout_s).models
    ready = [entry.name for entry in index if entry.state == "READY"]
    return [name for name in ready
            if client.get_model_config(name, client_timeout=timeout_s).config.platform != "ensemble"]


def probe_model(url: str, model: str, timeout_s: float, client=None) -> Problem | None:
    """None when `model` answers one tiny request within `timeout_s`, else the Problem."""
    import tritonclient.grpc as grpc
    from tritonclient.utils import InferenceServerException

    from ..clients import common

    own = client is None
    client = client or grpc.InferenceServerClient(url)
    try:
        config = client.get_model_config(model, client_timeout=timeout_s).config
        arrays = probe_request(config)
        outputs = [output.name for output in config.output]
        if config.model_transaction_policy.decoupled:
            common.stream(url, model, arrays, output_names=outputs, timeout_s=timeout_s)
        else:
            client.infer(model, [common.tensor("grpc", name, array) for name, array in arrays.items()],
                         outputs=[grpc.InferRequestedOutput(name) for name in outputs], client_timeout=timeout_s)
    except (InferenceServerException, common.ClientError) as error:
        message = error.message() if isinstance(error, InferenceServerException) else str(error)
        message = " ".join(str(message).split())
        dead = _STUB_MESSAGE.search(message)
        return Problem(model, message, dead["model"] if dead else None)
    finally:
        if own:
            client.close()
    return None


def check(url: str, models: Sequence[str] | None = None, timeout_s: float = 10.0) -> list[Problem]:
    """The Problems of the probed models (none: healthy). `url` is the gRPC host:port."""
    import tritonclient.grpc as grpc
    from tritonclient.utils import InferenceServerException

    client = grpc.InferenceServerClient(url)
    try:
        try:
            names = list(models) if models else default_models(client, timeout_s)
        except InferenceServerException as error:
            return [Problem("<server>", " ".join(str(error.message()).split()))]
        return [problem for name in names if (problem := probe_model(url, name, timeout_s, client)) is not None]
    finally:
        client.close()


class UnhealthyServer(RuntimeError):
    """The served models still fail the liveness check after a restart."""


def ensure_healthy(server, models: Sequence[str] | None = None, timeout_s: float = 10.0) -> list[Problem]:
    """Probe a local TritonServer; restart it once when a model fails. Returns the Problems that caused a restart
    (none: it was healthy); raises UnhealthyServer when the restarted server fails too."""
    problems = check(server.grpc_url, models, timeout_s)
    if problems:
        server.restart()
        still = check(server.grpc_url, models, timeout_s)
        if still:
            raise UnhealthyServer("after a restart: " + "; ".join(map(str, still)))
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="127.0.0.1:8001", help="tritonserver's gRPC host:port (default %(default)s)")
    parser.add_argument("--model", action="append", default=None,
                        help="a model to probe (repeatable; default: every ready model but the ensembles)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds each probe may take (default 10)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    problems = check(args.url, args.model, args.timeout)
    for problem in problems:
        print(f"unhealthy: {problem}", file=sys.stderr)
    if not problems:
        print(f"healthy ({time.monotonic() - started:.2f}s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
