"""What the clients share: tensors for either protocol, plain and streamed inference, the ensemble's inputs."""

from __future__ import annotations

import argparse
import queue
import sys
import uuid
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np

from templates.ft_python import ft_interface

PROTOCOLS = ("http", "grpc")
DEFAULT_URLS = {"http": "127.0.0.1:8000", "grpc": "127.0.0.1:8001"}

# Per-row sampling inputs shared by the model and the ensemble: Triton name -> (numpy dtype, CLI option), from the
# request interface's table (the word lists are sent as text to the ensemble: INPUT_2 / INPUT_3).
SAMPLING_OPTIONS = {tensor.name: (tensor.numpy_dtype, tensor.option)
                    for tensor in ft_interface.SAMPLING_INPUTS if tensor.option is not None}


class ClientError(RuntimeError):
    """The server answered with an error, or the answers disagree."""


def protocol_module(protocol: str):
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if protocol == "http":
        import tritonclient.http as module
    else:
        import tritonclient.grpc as module
    return module


def make_client(url: str, protocol: str):
    return protocol_module(protocol).InferenceServerClient(url)


def tensor(protocol: str, name: str, array: np.ndarray):
    """An InferInput holding `array` (numpy dtype -> Triton dtype; object arrays are BYTES)."""
    from tritonclient.utils import np_to_triton_dtype

    array = np.asarray(array)
    module = protocol_module(protocol)
    dtype = "BYTES" if array.dtype == object else np_to_triton_dtype(array.dtype)
    infer_input = module.InferInput(name, list(array.shape), dtype)
    infer_input.set_data_from_numpy(array)
    return infer_input


def per_row(value, rows: int, dtype) -> np.ndarray:
    """A [rows, 1] array of one value (or of `rows` values)."""
    values = np.asarray(value, dtype=dtype).reshape(-1)
    if values.size == 1:
        values = np.repeat(values, rows)
    if values.size != rows:
        raise ValueError(f"{values.size} values for {rows} rows")
    return values.reshape(rows, 1)


def sampling_arrays(options: dict, rows: int) -> dict[str, np.ndarray]:
    """{Triton name: [rows, 1] array} for every sampling option that is set (not None)."""
    arrays = {}
    for name, (dtype, key) in SAMPLING_OPTIONS.items():
        if options.get(key) is not None:
            arrays[name] = per_row(options[key], rows, dtype)
    return arrays


def text_array(texts: Sequence[str | bytes]) -> np.ndarray:
    """[rows, 1] BYTES array of utf-8 strings (bytes are sent as they are)."""
    return np.array([[t.encode("utf-8") if isinstance(t, str) else bytes(t)] for t in texts], dtype=object)


def ensemble_arrays(prompts: Sequence[str | bytes], output_len: int | None, bad_words: str | None = None,
                    stop_words: str | None = None, **options) -> dict[str, np.ndarray]:
    """The ensemble's inputs: INPUT_0 prompts, INPUT_1 output length (None: not sent, the model's default),
    INPUT_2/3 CSV word lists, sampling options."""
    rows = len(prompts)
    arrays = {"INPUT_0": text_array(prompts)}
    if output_len is not None:
        arrays["INPUT_1"] = per_row(output_len, rows, np.uint32)
    if bad_words is not None:
        arrays["INPUT_2"] = text_array([bad_words] * rows)
    if stop_words is not None:
        arrays["INPUT_3"] = text_array([stop_words] * rows)
    arrays.update(sampling_arrays(options, rows))
    return arrays


@dataclass
class Result:
    """One response's outputs as numpy arrays."""

    outputs: dict[str, np.ndarray]
    final: bool = True

    def __getitem__(self, name: str) -> np.ndarray:
        return self.outputs[name]


def infer(url: str, protocol: str, model: str, arrays: dict[str, np.ndarray],
          output_names: Iterable[str] | None = None, client=None) -> Result:
    """One plain request; raises ClientError with the server's message on failure.

    output_names None asks for every output of the model. The clients ask the plain ensemble for all its
    outputs: tritonserver 2.51 answers "unexpected deadlock, at least one output is not set" when a request asks
    it for OUTPUT_0 alone (any request that also names one of the model's outputs works).
    """
    from tritonclient.utils import InferenceServerException

    module = protocol_module(protocol)
    own = client is None
    client = client or make_client(url, protocol)
    try:
        inputs = [tensor(protocol, name, array) for name, array in arrays.items()]
        names = list(output_names) if output_names is not None else _output_names(client, model, protocol)
        outputs = [module.InferRequestedOutput(name) for name in names]
        try:
            response = client.infer(model, inputs, outputs=outputs)
        except InferenceServerException as error:
            raise ClientError(f"{model}: {error.message()}") from None
        return Result({name: response.as_numpy(name) for name in names})
    finally:
        if own:
            client.close()


def _output_names(client, model: str, protocol: str) -> list[str]:
    config = client.get_model_config(model)
    if protocol == "grpc":
        return [output.name for output in config.config.output]
    return [output["name"] for output in config["output"]]


def stream(url: str, model: str, arrays: dict[str, np.ndarray], output_names: Iterable[str] | None = None,
           timeout_s: float = 300.0, on_response=None) -> list[Result]:
    """One request to a decoupled model over a gRPC stream: every response until the final one, in order.

    on_response(result) is called as each arrives (e.g. to print partial text).
    """
    import tritonclient.grpc as grpc

    responses: queue.Queue = queue.Queue()
    client = grpc.InferenceServerClient(url)
    try:
        names = list(output_names) if output_names is not None else _output_names(client, model, "grpc")
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        request_id = uuid.uuid4().hex
        client.async_stream_infer(
            model, [tensor("grpc", name, array) for name, array in arrays.items()], request_id=request_id,
            outputs=[grpc.InferRequestedOutput(name) for name in names], enable_empty_final_response=True,
        )
        results = []
        while True:
            try:
                result, error = responses.get(timeout=timeout_s)
            except queue.Empty:
                raise ClientError(f"{model}: no response within {timeout_s:g}s") from None
            if error is not None:
                raise ClientError(f"{model}: {getattr(error, 'message', lambda: str(error))()}")
            response = result.get_response()
            final = response.parameters["triton_final_response"].bool_param
            if response.outputs:  # an empty final response only carries the flag
                item = Result({name: result.as_numpy(name) for name in names}, final=final)
                results.append(item)
                if on_response is not None:
                    on_response(item)
            if final:
                return results
    finally:
        client.stop_stream()
        client.close()


def add_connection_args(parser: argparse.ArgumentParser, model: str) -> None:
    parser.add_argument("-u", "--url", default=None, help="host:port (default 127.0.0.1:8000 http, :8001 grpc)")
    parser.add_argument("-i", "--protocol", choices=PROTOCOLS, default="http")
    parser.add_argument("-m", "--model", default=model, help=f"model to ask (default {model})")


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """The FT sampling inputs; unset ones are not sent (the model's defaults apply)."""
    group = parser.add_argument_group("sampling (FT backend inputs; unset = not sent)")
    group.add_argument("--top-k", type=int)
    group.add_argument("--top-p", type=float)
    group.add_argument("--temperature", type=float)
    group.add_argument("--repetition-penalty", type=float)
    group.add_argument("--len-penalty", type=float)
    group.add_argument("--beam-width", type=int)
    group.add_argument("--diversity-rate", type=float, help="beam_search_diversity_rate")
    group.add_argument("--seed", type=int, help="random_seed")
    group.add_argument("--start-id", type=int)
    group.add_argument("--end-id", type=int)
    group.add_argument("--top-p-decay", type=float)
    group.add_argument("--top-p-min", type=float)
    group.add_argument("--top-p-reset-ids", type=int)
    group.add_argument("--return-log-probs", type=lambda v: v.lower() in ("1", "true", "yes"), default=None,
                       help="is_return_log_probs (true/false)")


def sampling_options(args: argparse.Namespace) -> dict:
    return {key: getattr(args, key) for _, key in SAMPLING_OPTIONS.values()}


def resolve_url(args: argparse.Namespace) -> str:
    return args.url or DEFAULT_URLS[args.protocol]


def run_cli(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], object], argv: list[str] | None,
            succeeded: Callable[[object], bool] = lambda result: True) -> int:
    """Parse argv, run; exit status 0 when `succeeded(result)`, 1 (with the message on stderr) on a ClientError."""
    args = parser.parse_args(argv)
    try:
        result = run(args)
    except ClientError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0 if succeeded(result) else 1
