"""Random token ids straight to the model (no tokenizer), outputs saved to .npz, like FT's identity_test.py.

    ft-exporter-identity --url 127.0.0.1:8000 --model gpt2 --batch-size 8 --input-len 8 --output-len 24 \
        --save results/identity.npz

Prompts are `--input-len` ids drawn uniformly from [0, --vocab-size) with `--id-seed`; the first id of each row is
the random start id. Prints the generated ids and, with --save, writes every output tensor plus the inputs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import common


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ft-exporter-identity", description=__doc__.splitlines()[0])
    common.add_connection_args(p, "gpt2")
    p.add_argument("-b", "--batch-size", type=int, default=8)
    p.add_argument("-s", "--input-len", type=int, default=8, help="prompt length of every row")
    p.add_argument("-o", "--output-len", type=int, default=24, help="request_output_len")
    p.add_argument("--vocab-size", type=int, default=50257, help="random ids are drawn below this")
    p.add_argument("--id-seed", type=int, default=0, help="seed of the random prompt ids")
    p.add_argument("--stream", action="store_true", help="the model is decoupled: read its stream (gRPC)")
    p.add_argument("--save", type=Path, help="write inputs and outputs to this .npz file")
    common.add_sampling_args(p)
    return p


def run(args: argparse.Namespace, out=sys.stdout) -> dict[str, np.ndarray]:
    if min(args.batch_size, args.input_len, args.output_len, args.vocab_size) < 1:
        raise common.ClientError("--batch-size, --input-len, --output-len and --vocab-size must be >= 1")
    rng = np.random.default_rng(args.id_seed)
    ids = rng.integers(0, args.vocab_size, size=(args.batch_size, args.input_len)).astype(np.uint32)
    arrays = {
        "input_ids": ids,
        "input_lengths": common.per_row(args.input_len, args.batch_size, np.uint32),
        "request_output_len": common.per_row(args.output_len, args.batch_size, np.uint32),
        **common.sampling_arrays(common.sampling_options(args), args.batch_size),
    }
    url = common.resolve_url(args)
    names = ["output_ids", "sequence_length", "cum_log_probs", "output_log_probs"]
    started = time.perf_counter()
    if args.stream:
        if args.protocol != "grpc":
            raise common.ClientError("--stream needs --protocol grpc")
        responses = common.stream(url, args.model, arrays, output_names=names)
        result, count = responses[-1], len(responses)
    else:
        result, count = common.infer(url, args.protocol, args.model, arrays, output_names=names), 1
    elapsed = time.perf_counter() - started
    outputs = {name: result[name] for name in names}
    for row in range(args.batch_size):
        length = int(outputs["sequence_length"][row, 0])
        print(f"[{row}] start id {int(ids[row, 0])}: generated {outputs['output_ids'][row, 0, args.input_len:length].tolist()}",
              file=out)
    print(f"{args.batch_size} x ({args.input_len} + {args.output_len}) tokens in {elapsed:.3f}s "
          f"({count} response{'s' if count != 1 else ''})", file=out)
    saved = {**{f"input.{name}": array for name, array in arrays.items()}, **outputs}
    if args.save is not None:
        save_npz(args.save, saved)
        print(f"saved {args.save}", file=out)
    return saved


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez into a temporary sibling, renamed over `path` when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    return common.run_cli(parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
