"""A GenerationRequest -> the served model's tensor interface through tritonclient -> Choices.

The front end tokenizes with the repository's own served tokenizer.json (the one preprocessing uses), so token
counts are the model's; completions encode as preprocessing does (the tokenizer's post-processor adds the special
tokens), chat prompts are the rendered template encoded without added special tokens (as transformers'
apply_chat_template). Text is decoded skipping special tokens, as postprocessing does. Every prompt x n choices is
one row of one Triton request; streaming reads the decoupled model's per-token responses over gRPC.
"""

from __future__ import annotations

import configparser
import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..clients import common
from .chat_template import ChatTemplate, ChatTemplateError
from .protocol import Choice, GenerationRequest, OpenAIError, bad_request

MODEL_OUTPUTS = ["output_ids", "sequence_length"]


def tokenizer_directory(repository: Path, model: str) -> Path:
    """`<repository>/<model>/1/<tp>-gpu/`: the shards' directory, holding the checkpoint's tokenizer files."""
    found = sorted(Path(repository, model, "1").glob("*-gpu/tokenizer.json"))
    if not found:
        raise FileNotFoundError(f"no {model}/1/<tp>-gpu/tokenizer.json under {repository}: is it a repository "
                                f"written by the export, and {model!r} its model?")
    return found[0].parent


@dataclass
class ModelFiles:
    """What the front end reads from the repository: tokenizer, chat template, context length, eos ids."""

    tokenizer: object  # tokenizers.Tokenizer
    chat_template: ChatTemplate | None
    max_positions: int
    eos_ids: set[int]
    pad_id: int

    @classmethod
    def load(cls, directory: Path) -> "ModelFiles":
        from tokenizers import Tokenizer

        ini = configparser.ConfigParser()
        ini.read(directory / "config.ini")
        section = next(s for s in ini.sections() if ini.has_option(s, "max_pos_seq_len"))
        generation = json.loads((directory / "generation_config.json").read_text())
        eos_ids = set(generation["eos_token_id"])
        return cls(Tokenizer.from_file(str(directory / "tokenizer.json")), ChatTemplate.load(directory),
                   ini.getint(section, "max_pos_seq_len"), eos_ids, min(eos_ids))


class Row:
    """One choice while it is generated: decoded text, stop strings, how many tokens it kept."""

    def __init__(self, index: int, files: ModelFiles, stops: list[str], max_tokens: int):
        self.index, self.files, self.stops, self.max_tokens = index, files, stops, max_tokens
        self.sent = ""  # text already streamed
        self.finish_reason: str | None = None
        self.tokens = 0

    def _decode(self, ids) -> str:
        return self.files.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def _first_stop(self, text: str) -> int | None:
        positions = [text.find(stop) for stop in self.stops if stop in text]
        return min(positions) if positions else None

    def update(self, generated: np.ndarray, final: bool) -> str | None:
        """Take the ids generated so far; return the new text that may be sent (none past a stop string, none
        that could still become one, no split multi-byte character unless final); None once the row has ended."""
        if self.finish_reason is not None:
            return None
        text = self._decode(generated)
        self.tokens = len(generated)
        stop_at = self._first_stop(text)
        if stop_at is not None:
            text = text[:stop_at]
            # The tokens it took to produce the stop string (OpenAI counts those).
            self.tokens = next(k for k in range(1, len(generated) + 1)
                               if self._first_stop(self._decode(generated[:k])) is not None)
            self.finish_reason = "stop"
        elif final:
            ended = len(generated) > 0 and int(generated[-1]) in self.files.eos_ids
            self.finish_reason = "length" if len(generated) >= self.max_tokens and not ended else "stop"
        else:
            text = text.rstrip("\ufffd")  # a multi-byte character the next token completes
            held = max((k for stop in self.stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
            text = text[:len(text) - held]
        delta = text[len(self.sent):] if text.startswith(self.sent) else ""
        self.sent += delta
        return delta


class TritonBackend:
    """Runs GenerationRequests on `model` (plain) and `stream_model` (decoupled) of one tritonserver; either may be
    None (a decoupled-only repository answers every request through the stream)."""

    def __init__(self, files: ModelFiles, http_url: str, model: str | None, max_batch_size: int,
                 grpc_url: str | None = None, stream_model: str | None = None):
        self.files, self.http_url, self.model, self.max_batch_size = files, http_url, model, max_batch_size
        self.grpc_url, self.stream_model = grpc_url, stream_model

    def prompt_ids(self, request: GenerationRequest) -> list[list[int]]:
        tokenizer = self.files.tokenizer
        if request.kind == "chat":
            if self.files.chat_template is None:
                raise bad_request("this model has no chat template (tokenizer_config.json chat_template or "
                                  "chat_template.jinja); use /v1/completions", "messages")
            try:
                text = self.files.chat_template.render(request.messages)
            except ChatTemplateError as error:
                raise bad_request(str(error), "messages") from None
            return [tokenizer.encode(text, add_special_tokens=False).ids]
        vocab = tokenizer.get_vocab_size(with_added_tokens=True)
        prompts = []
        for prompt in request.prompts:
            if isinstance(prompt, str):
                prompts.append(tokenizer.encode(prompt).ids)
            elif all(0 <= t < vocab for t in prompt):
                prompts.append(list(prompt))
            else:
                raise bad_request(f"prompt token ids must be in [0, {vocab})", "prompt")
        return prompts

    def _arrays(self, request: GenerationRequest, prompts: list[list[int]]) -> tuple[dict, list[int], int]:
        """The model's inputs (one row per prompt x n), each row's prompt length and the max_tokens used."""
        rows = [ids for ids in prompts for _ in range(request.n)]
        if len(rows) > self.max_batch_size:
            raise bad_request(f"{len(prompts)} prompt(s) x n={request.n} = {len(rows)} sequences; this model takes "
                              f"at most {self.max_batch_size} per request", "n")
        longest = max(map(len, rows))
        if longest == 0:
            raise bad_request("the prompt is empty", "prompt")
        room = self.files.max_positions - longest
        max_tokens = room if request.max_tokens is None else request.max_tokens
        if max_tokens > room:
            raise bad_request(f"this model's maximum context length is {self.files.max_positions} tokens; the prompt "
                              f"has {longest} and max_tokens is {max_tokens}", "max_tokens",
                              "context_length_exceeded")
        ids = np.full((len(rows), longest), self.files.pad_id, dtype=np.uint32)
        for row, row_ids in enumerate(rows):
            ids[row, :len(row_ids)] = row_ids
        count = len(rows)
        greedy = request.temperature == 0.0
        seed = secrets.randbits(63) if request.seed is None else request.seed
        arrays = {
            "input_ids": ids,
            "input_lengths": np.array([[len(r)] for r in rows], dtype=np.uint32),
            "request_output_len": common.per_row(max_tokens, count, np.uint32),
            "runtime_top_k": common.per_row(1 if greedy else 0, count, np.uint32),
            "runtime_top_p": common.per_row(0.0 if greedy else request.top_p, count, np.float32),
            "temperature": common.per_row(1.0 if greedy else request.temperature, count, np.float32),
            # n samples of one prompt differ: consecutive seeds, one per row.
            "random_seed": np.array([[(seed + row) % (1 << 64)] for row in range(count)], dtype=np.uint64),
            "beam_width": common.per_row(1, count, np.uint32),
            "is_return_log_probs": np.zeros((count, 1), dtype=bool),
        }
        return arrays, [len(r) for r in rows], max_tokens

    def check(self, request: GenerationRequest, prompts: list[list[int]]) -> None:
        """Raise the OpenAIError `generate` would raise for the request's shape (before a stream starts)."""
        self._arrays(request, prompts)

    def generate(self, request: GenerationRequest, prompts: list[list[int]],
                 on_delta: Callable[[Row, str], None] | None = None) -> list[Row]:
        """Every choice's Row, finished. on_delta(row, text) is called with new text as it is generated when the
        request streams and a decoupled model is served (else once per row with the whole text)."""
        arrays, lengths, max_tokens = self._arrays(request, prompts)
        rows = [Row(index, self.files, request.stop, max_tokens) for index in range(len(lengths))]

        def take(result: common.Result, final: bool) -> None:
            for row, length in zip(rows, lengths):
                end = int(result["sequence_length"][row.index, 0])
                delta = row.update(result["output_ids"][row.index, 0, length:max(end, length)], final)
                if on_delta is not None and delta is not None and (delta or row.finish_reason):
                    on_delta(row, delta)

        try:
            if self.stream_model is not None and (request.stream or self.model is None):
                responses = common.stream(self.grpc_url, self.stream_model, arrays, output_names=MODEL_OUTPUTS,
                                          on_response=lambda result: take(result, result.final))
                if not responses or not responses[-1].final:
                    raise common.ClientError(f"{self.stream_model}: the stream ended without a final response")
            else:
                take(common.infer(self.http_url, "http", self.model, arrays, output_names=MODEL_OUTPUTS), True)
        except common.ClientError as error:
            raise OpenAIError(500, f"the model failed: {error}", error_type="server_error") from None
        return rows


def choices(rows: list[Row]) -> list[Choice]:
    return [Choice(row.index, row.sent, row.tokens, row.finish_reason) for row in rows]
