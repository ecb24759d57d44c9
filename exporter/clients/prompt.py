"""Send text prompts through the ensemble and print the generated text.

    ft-exporter-client --url 127.0.0.1:8000 --prompts "Thank you for" "Q: Are you going for lunch?" --output-len 16
    ft-exporter-client -i grpc -u 127.0.0.1:8001 -m ensemble --stream --prompts "Once upon a time"

--stream needs gRPC and a repository exported with triton_deployment.decoupled=True: each streamed response holds
the text generated so far, printed as it grows.
"""

from __future__ import annotations

import argparse
import sys

from . import common


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ft-exporter-client", description=__doc__.splitlines()[0])
    common.add_connection_args(p, "ensemble")
    p.add_argument("--prompts", nargs="+", required=True, help="one or more prompts (one row each)")
    p.add_argument("--output-len", type=int, default=None,
                   help="tokens to generate per prompt (INPUT_1); default: the model's (its generation_config.json "
                        "max_new_tokens / max_length, else 20 new tokens as HF's generate)")
    p.add_argument("--bad-words", help="comma-separated words never to generate (INPUT_2)")
    p.add_argument("--stop-words", help="comma-separated words that end generation (INPUT_3)")
    p.add_argument("--stream", action="store_true", help="stream partial text (gRPC, decoupled model)")
    p.add_argument("--prompt-task", help="the model's prompt-learning task for every row (PROMPT_TASK_NAME)")
    common.add_sampling_args(p)
    return p


def run(args: argparse.Namespace, out=sys.stdout) -> list[list[str]]:
    """The final texts, [prompt][beam]; partial texts are printed as they arrive when streaming."""
    arrays = common.ensemble_arrays(args.prompts, args.output_len, args.bad_words, args.stop_words,
                                    **common.sampling_options(args))
    if args.prompt_task:
        arrays["PROMPT_TASK_NAME"] = common.text_array([args.prompt_task] * len(args.prompts))
    url = common.resolve_url(args)
    if args.stream:
        if args.protocol != "grpc":
            raise common.ClientError("--stream needs --protocol grpc")
        shown: dict[int, str] = {}

        def show(result):
            for row, text in enumerate(decode(result["OUTPUT_0"])):
                new = text[0][len(shown.get(row, "")):]
                if new:
                    print(f"[{row}] +{new!r}", file=out, flush=True)
                shown[row] = text[0]

        results = common.stream(url, args.model, arrays, output_names=["OUTPUT_0"], on_response=show)
        final = results[-1]
    else:
        final = common.infer(url, args.protocol, args.model, arrays)  # every output: see common.infer
    texts = decode(final["OUTPUT_0"])
    for prompt, beams in zip(args.prompts, texts):
        for beam, text in enumerate(beams):
            label = "" if len(beams) == 1 else f" (beam {beam})"
            print(f"{prompt!r}{label} -> {text!r}", file=out)
    return texts


def decode(output: "object") -> list[list[str]]:
    """OUTPUT_0 [rows, beams] of utf-8 bytes -> nested lists of str."""
    return [[item.decode("utf-8") for item in row] for row in output]


def main(argv: list[str] | None = None) -> int:
    return common.run_cli(parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
