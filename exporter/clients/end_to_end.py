"""Ask preprocessing, the model, postprocessing and the ensemble in turn and check that they agree.

    ft-exporter-end-to-end --url 127.0.0.1:8000 --model gpt2 --prompts "Thank you for" "Q: Are you going for lunch?"

The chained answer (preprocessing -> model -> postprocessing, each called on its own) must equal the ensemble's:
the same text, and (non-streaming) the same output_ids. Exit status 0 when they agree, 1 otherwise.
With --stream (gRPC, a decoupled export) the model and the ensemble are read through streams and their final
responses compared.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from . import common

PROMPTS = ["Thank you for", "Q: Are you going for lunch?"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ft-exporter-end-to-end", description=__doc__.splitlines()[0])
    common.add_connection_args(p, "gpt2")
    p.add_argument("--ensemble", default="ensemble", help="the ensemble model (default ensemble)")
    p.add_argument("--prompts", nargs="+", default=PROMPTS)
    p.add_argument("--output-len", type=int, default=16, help="tokens to generate (0: send none, the model's default)")
    p.add_argument("--bad-words", help="comma-separated words never to generate")
    p.add_argument("--stop-words", help="comma-separated words that end generation")
    p.add_argument("--stream", action="store_true", help="the model and ensemble are decoupled (gRPC)")
    common.add_sampling_args(p)
    return p


def run(args: argparse.Namespace, out=sys.stdout) -> dict:
    """Every stage's outputs plus `agree` (bool) and `problems` (list of str)."""
    url, protocol = common.resolve_url(args), args.protocol
    if args.stream and protocol != "grpc":
        raise common.ClientError("--stream needs --protocol grpc")
    rows = len(args.prompts)
    options = common.sampling_options(args)
    output_len = args.output_len or None  # None: neither preprocessing nor the ensemble is sent one
    pre_in = {"QUERY": common.text_array(args.prompts)}
    if output_len is not None:
        pre_in["REQUEST_OUTPUT_LEN"] = common.per_row(output_len, rows, np.uint32)
    if args.bad_words is not None:
        pre_in["BAD_WORDS_DICT"] = common.text_array([args.bad_words] * rows)
    if args.stop_words is not None:
        pre_in["STOP_WORDS_DICT"] = common.text_array([args.stop_words] * rows)
    pre = common.infer(url, protocol, "preprocessing", pre_in)

    model_in = {
        "input_ids": pre["INPUT_ID"], "input_lengths": pre["REQUEST_INPUT_LEN"],
        "request_output_len": pre["REQUEST_OUTPUT_LEN"],
        "bad_words_list": pre["BAD_WORDS_IDS"], "stop_words_list": pre["STOP_WORDS_IDS"],
        **common.sampling_arrays(options, rows),
    }
    names = ["output_ids", "sequence_length", "cum_log_probs", "output_log_probs"]
    if args.stream:
        model = common.stream(url, args.model, model_in, output_names=names)[-1]
    else:
        model = common.infer(url, protocol, args.model, model_in, output_names=names)

    post_in = {"TOKENS_BATCH": model["output_ids"], "SEQUENCE_LENGTH": model["sequence_length"],
               "INPUT_LENGTHS": pre["REQUEST_INPUT_LEN"]}
    post = common.infer(url, protocol, "postprocessing", post_in, output_names=["OUTPUT"])

    ensemble_in = common.ensemble_arrays(args.prompts, output_len, args.bad_words, args.stop_words, **options)
    if args.stream:
        ensemble = common.stream(url, args.ensemble, ensemble_in, output_names=["OUTPUT_0"])[-1]
    else:
        ensemble = common.infer(url, protocol, args.ensemble, ensemble_in)  # every output: see common.infer

    problems = []
    if ensemble["OUTPUT_0"].tolist() != post["OUTPUT"].tolist():
        problems.append(f"text differs: ensemble {ensemble['OUTPUT_0'].tolist()} vs chained {post['OUTPUT'].tolist()}")
    if "output_ids" in ensemble.outputs and not np.array_equal(ensemble["output_ids"], model["output_ids"]):
        problems.append("output_ids differ between the ensemble and the model")
    for row, prompt in enumerate(args.prompts):
        for beam, text in enumerate(post["OUTPUT"][row]):
            print(f"{prompt!r} [{beam}] -> {text.decode('utf-8')!r}", file=out)
    print("agree" if not problems else "DISAGREE:\n  " + "\n  ".join(problems), file=out)
    return {"preprocessing": pre.outputs, "model": model.outputs, "postprocessing": post.outputs,
            "ensemble": ensemble.outputs, "agree": not problems, "problems": problems}


def main(argv: list[str] | None = None) -> int:
    return common.run_cli(parser(), run, argv, lambda result: result["agree"])


if __name__ == "__main__":
    sys.exit(main())
