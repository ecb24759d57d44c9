"""Send one request described by a JSON file and print every output as JSON.

    ft-exporter-issue-request request.json [--url 127.0.0.1:8000]

The file: {"config": {"model_name": "gpt2", "protocol": "http", "url": "127.0.0.1:8000", "stream": false},
           "request": [{"name": "input_ids", "data": [[818, 262]], "dtype": "uint32"}, ...]}
dtype is a numpy type name ("uint32", "float32", "bool", ...) or "bytes" for strings. Command-line options win
over the file's config. With "stream": true (gRPC, decoupled model) every response is printed, one JSON per line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from . import common


class RequestFileError(ValueError):
    """The JSON request file is malformed; the message names the entry."""


def load_request(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(config, {name: array}) from the JSON file."""
    try:
        document = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise RequestFileError(f"{path}: {error}") from None
    if not isinstance(document, dict) or not isinstance(document.get("request"), list):
        raise RequestFileError(f"{path}: expected an object with a 'request' list")
    config = document.get("config", {})
    arrays = {}
    for index, entry in enumerate(document["request"]):
        if not isinstance(entry, dict) or not {"name", "data", "dtype"} <= set(entry):
            raise RequestFileError(f"{path}: request[{index}] needs name, data and dtype")
        name, dtype = entry["name"], entry["dtype"]
        if dtype in ("bytes", "string", "BYTES"):
            arrays[name] = np.array(entry["data"], dtype=object)
            arrays[name] = np.vectorize(lambda s: s.encode("utf-8") if isinstance(s, str) else s,
                                        otypes=[object])(arrays[name])
        else:
            try:
                arrays[name] = np.array(entry["data"], dtype=np.dtype(dtype))
            except TypeError as error:
                raise RequestFileError(f"{path}: request[{index}] ({name}): dtype {dtype!r}: {error}") from None
    return config, arrays


def jsonable(array: np.ndarray):
    """Nested lists; BYTES become str (invalid utf-8 shown as U+FFFD)."""
    if array.dtype == object:
        return [jsonable(item) if isinstance(item, np.ndarray) else bytes(item).decode("utf-8", "replace")
                for item in array]
    return array.tolist()


def main(argv: list[str] | None = None, out=sys.stdout) -> int:
    p = argparse.ArgumentParser(prog="ft-exporter-issue-request", description=__doc__.splitlines()[0])
    p.add_argument("request_file", type=Path)
    p.add_argument("-u", "--url")
    p.add_argument("-i", "--protocol", choices=common.PROTOCOLS)
    p.add_argument("-m", "--model")
    p.add_argument("--stream", action="store_true", default=None)
    args = p.parse_args(argv)
    try:
        config, arrays = load_request(args.request_file)
    except RequestFileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    streaming = args.stream if args.stream is not None else bool(config.get("stream", False))
    protocol = args.protocol or config.get("protocol", "grpc" if streaming else "http")
    url = args.url or config.get("url") or common.DEFAULT_URLS[protocol]
    model = args.model or config.get("model_name", "ensemble")
    if streaming and protocol != "grpc":
        print("error: streaming needs the grpc protocol", file=sys.stderr)
        return 2
    try:
        if streaming:
            for result in common.stream(url, model, arrays):
                print(json.dumps({name: jsonable(value) for name, value in result.outputs.items()}), file=out)
        else:
            result = common.infer(url, protocol, model, arrays)
            print(json.dumps({name: jsonable(value) for name, value in result.outputs.items()}), file=out)
    except common.ClientError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
