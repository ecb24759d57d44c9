"""LAMBADA through a running tritonserver, with both metrics, and the same metric on the source checkpoint.

Metrics:
- `last_token` (FasterTransformer's evaluate_lambada.py): context = all BPE tokens but the last; correct iff the
  greedy next token equals the last token.
- `last_word` (NeMo-Launcher's): label = the last whitespace-separated word, tokenised with its leading space;
  correct iff greedy generation reproduces every label token.

Ids come from the served tokenizer (`Encoder`): a context starts with the special tokens it puts before a prompt by
default (Llama's <s>, OPT's </s>), as preprocessing sends them; the label has none. Contexts are left-truncated
(keeping those leading special tokens) so context + label fits `max_seq_len`.

Parity: with a reference, `passed` says whether every metric's |served - reference| accuracy is within the
tolerance and, when the reference has its own tokenizer (HF's AutoTokenizer), whether the served tokenizer gave the
very same ids on every example (`same_ids_as_reference`). Without one (a NeMo source, accuracy.reference=none, no
transformers) nothing is compared: `parity` is "not checked", `passed` is null and `parity_note` says why.

The reference runs where placement.py puts it (the GPU in the checkpoint's dtype when it fits); each metric is one
pass over the batches, served then reference, with a progress bar and, after the first batch, the expected cost.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..atomic import write_text_atomic
from ..clients import common
from ..lazy import imports_without_gc
from ..progress import Progress, duration
from .placement import Placement

log = logging.getLogger(__name__)


class AccuracyMismatch(RuntimeError):
    """Served accuracy differs from the source model's by more than the tolerance."""


@dataclass(frozen=True)
class Encoder:
    """LAMBADA text -> ids as the served tokenizer encodes a prompt; `encode(text, add_special_tokens)` -> ids.

    A context gets only the special tokens the tokenizer puts *before* a text: one it appends (an eos) would sit
    between the context and the continuation scored after it. A continuation gets none.
    """

    encode: Callable[[str, bool], list[int]]

    def context(self, text: str) -> tuple[list[int], list[int]]:
        """(the special tokens put before `text`, `text`'s own ids)."""
        plain, full = self.encode(text, False), self.encode(text, True)
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                return full[:start], plain
        raise ValueError(f"the tokenizer's special tokens change the text's own ids: {full} vs {plain} for {text!r}")

    def continuation(self, text: str) -> list[int]:
        return self.encode(text, False)


@dataclass(frozen=True)
class Example:
    context: list[int]
    label: list[int]


@dataclass
class Score:
    correct: int = 0
    total: int = 0
    predictions: list[list[int]] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def summary(self) -> dict:
        return {"accuracy": self.accuracy, "correct": self.correct, "total": self.total}


def read_texts(path: Path, limit: int | None = None, stride: int = 1) -> list[str]:
    """The examples' texts: every `stride`-th one (a subset spread over the whole set), the first `limit` of them."""
    texts = []
    with open(path, encoding="utf-8") as handle:
        lines = (line for line in handle if line.strip())
        for index, line in enumerate(lines):
            if index % stride == 0:
                texts.append(json.loads(line)["text"])
            if limit is not None and len(texts) >= limit:
                break
    if not texts:
        raise ValueError(f"no examples in {path}")
    return texts


def build_examples(texts: Sequence[str], encoder: Encoder, metric: str, max_seq_len: int,
                   seq2seq: Seq2Seq | None = None) -> list[Example]:
    if seq2seq is not None:
        return build_seq2seq_examples(texts, encoder, metric, max_seq_len, seq2seq)
    examples = []
    for text in texts:
        if metric == "last_token":
            prefix, ids = encoder.context(text)
            context, label = ids[:-1], ids[-1:]
        elif metric == "last_word":
            head, word = text.rstrip().rsplit(" ", 1)
            (prefix, context), label = encoder.context(head), encoder.continuation(" " + word)
        else:
            raise ValueError(f"unknown metric {metric!r}")
        keep = max(1, max_seq_len - len(label) - len(prefix))
        examples.append(Example(prefix + context[-keep:], label))
    return examples


@dataclass(frozen=True)
class Seq2Seq:
    """LAMBADA as a seq2seq task, for encoder-decoder models (T5, UL2): the encoder reads the context (with the
    tokenizer's special tokens where it puts them: T5's </s> after it), the decoder must answer the missing end as
    its first tokens. `mode_token`: text put before every context, as UL2's paradigm tokens ("[NLG]", "[S2S]",
    "[NLU]") are prepended to its inputs; "" for T5 / Flan-T5."""

    mode_token: str = ""


def build_seq2seq_examples(texts: Sequence[str], encoder: Encoder, metric: str, max_seq_len: int,
                           seq2seq: Seq2Seq) -> list[Example]:
    """last_word: encoder input = mode token + the text without its last word, label = the word's ids (a word alone,
    as a decoder answer starts); last_token: encoder input = the text's ids without the last one, label = that id.
    The context is left-truncated so it and its special tokens fit max_seq_len encoder positions."""
    examples = []
    prefix_text = f"{seq2seq.mode_token} " if seq2seq.mode_token else ""
    for text in texts:
        head, word = text.rstrip().rsplit(" ", 1)
        full = encoder.encode(prefix_text + (head if metric == "last_word" else text.rstrip()), True)
        plain = encoder.encode(prefix_text + (head if metric == "last_word" else text.rstrip()), False)
        start = next((index for index in range(len(full) - len(plain) + 1)
                      if full[index : index + len(plain)] == plain), None)
        if start is None:
            raise ValueError(f"the tokenizer's special tokens change the text's own ids: {full} vs {plain}")
        before, after = full[:start], full[start + len(plain):]
        if metric == "last_word":
            context, label = plain, encoder.encode(word, False)
        elif metric == "last_token":
            context, label = plain[:-1], plain[-1:]
        else:
            raise ValueError(f"unknown metric {metric!r}")
        keep = max(1, max_seq_len - len(before) - len(after))
        examples.append(Example(before + context[-keep:] + after, label))
    return examples


def score(
    examples: Sequence[Example],
    generate: Callable[[list[Example]], list[list[int]]],
    batch_size: int,
    label: str = "",
) -> Score:
    """`generate` maps a batch of examples to greedy continuations of len(label) tokens (shorter if it stopped).

    Shows progress (exporter/progress.py) under `label`."""
    result = Score()
    with Progress(len(examples), label or "scoring", unit="example", logger=log) as progress:
        for start in range(0, len(examples), batch_size):
            batch = list(examples[start : start + batch_size])
            _tally(result, batch, generate(batch))
            progress.update(len(batch))
    return result


def _tally(result: Score, batch: list[Example], generated: list[list[int]]) -> None:
    for example, continuation in zip(batch, generated):
        prediction = list(continuation[: len(example.label)])
        result.predictions.append(prediction)
        result.correct += prediction == example.label
        result.total += 1


class TritonGenerator:
    """Greedy continuations from the served model over Triton's HTTP API (token ids in, token ids out)."""

    def __init__(self, url: str, model_name: str, end_id: int, seq2seq: bool = False):
        import tritonclient.http as httpclient

        self.url = url
        # One client for every batch, with timeouts long enough for a large batch on a slow runtime.
        self.client = httpclient.InferenceServerClient(url, network_timeout=600.0, connection_timeout=600.0)
        self.model_name = model_name
        self.end_id = end_id
        # An encoder-decoder model takes FT's T5 tensors and answers the generated tokens only.
        self.names = (("input_ids", "sequence_length", "max_output_len") if seq2seq
                      else ("input_ids", "input_lengths", "request_output_len"))
        self.seq2seq = seq2seq

    def __call__(self, batch: list[Example]) -> list[list[int]]:
        lengths = np.array([[len(example.context)] for example in batch], dtype=np.uint32)
        ids = np.full((len(batch), int(lengths.max())), self.end_id, dtype=np.uint32)
        for row, example in enumerate(batch):
            ids[row, : len(example.context)] = example.context
        output_len = np.array([[len(example.label)] for example in batch], dtype=np.uint32)
        arrays = {
            **dict(zip(self.names, (ids, lengths, output_len))),
            **common.sampling_arrays({"top_k": 1, "top_p": 0.0}, len(batch)),  # greedy
        }
        response = common.infer(self.url, "http", self.model_name, arrays,
                                output_names=("output_ids", "sequence_length"), client=self.client)
        output_ids = response["output_ids"]  # [batch, beam, T]
        sequence_length = response["sequence_length"]  # [batch, beam]
        return [
            output_ids[row, 0, 0 if self.seq2seq else len(example.context) : int(sequence_length[row, 0])].tolist()
            for row, example in enumerate(batch)
        ]


class HFGenerator:
    """Greedy continuations from the source checkpoint with HF transformers, in-process (the independent reference)."""

    def __init__(self, checkpoint: Path, end_id: int, placement: Placement = Placement(), seq2seq: bool = False):
        with imports_without_gc("transformers"):
            import torch
            from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

        # An encoder-decoder loads the same way; its generate() answers after the decoder start token.
        auto_model = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
        self.seq2seq = seq2seq
        self.torch = torch
        self.placement = placement
        dtype = getattr(torch, placement.dtype)
        checkpoint = Path(checkpoint)
        if checkpoint.is_file():  # a GGUF file: transformers reads it from its directory, de-quantised
            self.model = auto_model.from_pretrained(str(checkpoint.parent), gguf_file=checkpoint.name, dtype=dtype)
        elif placement.device == "cpu":
            self.model = auto_model.from_pretrained(str(checkpoint)).float()
        else:
            self.model = auto_model.from_pretrained(str(checkpoint), dtype=dtype)
        self.model = self.model.to(placement.device).eval()
        self.parameters = sum(parameter.numel() for parameter in self.model.parameters())
        log.info("HF reference: %.1fM parameters on %s", self.parameters / 1e6, placement.reason)
        self.end_id = end_id
        # The eos ids HF's generate stops at: generation_config.json's (or config.json's) own, as the served model's.
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = [end_id] if eos is None else (eos if isinstance(eos, list) else [eos])

    def tokens_per_second(self, rows: int = 8, length: int = 64) -> float:
        """This device's forward rate on the model, measured on `rows` x `length` tokens after a small warm-up."""
        torch = self.torch
        length = min(length, getattr(self.model.config, "max_position_embeddings", length) or length)
        ids = torch.full((rows, length), self.end_id, dtype=torch.long, device=self.placement.device)
        # An encoder-decoder's forward also takes decoder ids: one step each, the encoder reads the whole length.
        step = (lambda rows_ids: {"decoder_input_ids": rows_ids[:, :1]}) if self.seq2seq else (lambda rows_ids: {})
        with torch.inference_mode():
            self.model(ids[:1, :8], **step(ids[:1, :8]))
            started = time.monotonic()
            self.model(ids, **step(ids))
            if self.placement.device != "cpu":
                torch.cuda.synchronize()
        return rows * length / max(time.monotonic() - started, 1e-9)

    def __call__(self, batch: list[Example]) -> list[list[int]]:
        if self.seq2seq:
            return self._seq2seq(batch)
        torch = self.torch
        width = max(len(example.context) for example in batch)
        # Left padding so every row's next token follows its last context token.
        ids = torch.full((len(batch), width), self.end_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, example in enumerate(batch):
            ids[row, width - len(example.context) :] = torch.tensor(example.context)
            mask[row, width - len(example.context) :] = 1
        steps = max(len(example.label) for example in batch)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids.to(self.placement.device),
                attention_mask=mask.to(self.placement.device),
                max_new_tokens=steps,
                do_sample=False,
                num_beams=1,
                pad_token_id=self.end_id,
                eos_token_id=self.eos_ids,
            )
        generated = out[:, width:].tolist()
        # Rows that ended at an eos id are padded by generate; keep the end token, drop the padding.
        return [_cut_after_end(row, self.eos_ids) for row in generated]

    def _seq2seq(self, batch: list[Example]) -> list[list[int]]:
        """The encoder reads each right-padded context (masked); generate's rows start with the decoder start
        token, which is no answer."""
        torch = self.torch
        width = max(len(example.context) for example in batch)
        pad = self.model.config.pad_token_id if self.model.config.pad_token_id is not None else self.end_id
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, example in enumerate(batch):
            ids[row, : len(example.context)] = torch.tensor(example.context)
            mask[row, : len(example.context)] = 1
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids.to(self.placement.device),
                                      attention_mask=mask.to(self.placement.device),
                                      max_new_tokens=max(len(example.label) for example in batch),
                                      do_sample=False, num_beams=1, pad_token_id=pad, eos_token_id=self.eos_ids)
        return [_cut_after_end(row, self.eos_ids) for row in out[:, 1:].tolist()]


def _cut_after_end(tokens: list[int], eos_ids: list[int]) -> list[int]:
    ends = [step for step, token in enumerate(tokens) if token in eos_ids]
    return tokens[: ends[0] + 1] if ends else tokens


def evaluate(
    *,
    texts: Sequence[str],
    encoder: Encoder,
    served: Callable[[list[Example]], list[list[int]]],
    reference: Callable[[list[Example]], list[list[int]]] | None,
    metrics: Sequence[str],
    batch_size: int,
    max_seq_len: int,
    tolerance: float,
    output_path: Path,
    info: dict | None = None,
    no_reference_reason: str = "no reference given",
    reference_encoder: Encoder | None = None,
    bounds: str = "",
    seq2seq: Seq2Seq | None = None,
) -> dict:
    """Score every metric on the served model (and the reference when given); write and return the results.

    One pass per metric: each batch goes to the served model, then to the reference, so the first batch measures
    both and the expected cost of the whole run is logged before the bulk of it (`bounds`: the keys that bound it).
    `reference_encoder`: the reference's own tokenizer; the reference then scores its own ids, and any example whose
    ids differ from the served tokenizer's fails parity. Without it the reference scores the served ids.
    Without a reference, parity is recorded as not checked, with `no_reference_reason`. `seq2seq`: an
    encoder-decoder model, scored as a seq2seq task (Seq2Seq, build_seq2seq_examples)."""
    results: dict = {"examples": len(texts), "batch_size": batch_size, "tolerance": tolerance, **(info or {})}
    if seq2seq is not None:  # how the examples were posed to an encoder-decoder model
        results["task"] = {"kind": "seq2seq", "mode_token": seq2seq.mode_token}
    results["metrics"] = {}
    failures = []
    for number, metric in enumerate(metrics):
        examples = build_examples(texts, encoder, metric, max_seq_len, seq2seq)
        entry: dict = {}
        reference_examples = examples
        if reference is not None and reference_encoder is not None:
            reference_examples = build_examples(texts, reference_encoder, metric, max_seq_len, seq2seq)
            differ = [index for index, (a, b) in enumerate(zip(examples, reference_examples)) if a != b]
            entry["same_ids_as_reference"] = 1 - len(differ) / len(examples)
            if differ:
                failures.append(f"{metric}: the served tokenizer's ids differ from the reference tokenizer's on "
                                f"{len(differ)} of {len(examples)} examples (first: example {differ[0]})")
        served_score, reference_score = Score(), Score()
        served_seconds = reference_seconds = 0.0
        sides = "served + reference" if reference is not None else "served"
        with Progress(len(examples), f"{metric} ({sides})", unit="example", logger=log) as progress:
            for start in range(0, len(examples), batch_size):
                batch = list(examples[start : start + batch_size])
                started = time.monotonic()
                _tally(served_score, batch, served(batch))
                served_seconds += time.monotonic() - started
                if reference is not None:
                    reference_batch = list(reference_examples[start : start + batch_size])
                    started = time.monotonic()
                    _tally(reference_score, reference_batch, reference(reference_batch))
                    reference_seconds += time.monotonic() - started
                progress.update(len(batch))
                if number == 0 and start == 0:
                    log.info("%s", expected_cost(len(batch), served_seconds, reference_seconds, len(examples),
                                                 len(metrics), bounds))
        entry.update(
            served=served_score.summary(),
            served_predictions=served_score.predictions,
            served_seconds=round(served_seconds, 3),
            served_examples_per_second=round(len(examples) / served_seconds, 2) if served_seconds else None,
        )
        log.info("%s: served accuracy %.4f (%d/%d) in %.1fs", metric, served_score.accuracy, served_score.correct,
                 served_score.total, served_seconds)
        if reference is not None:
            difference = served_score.accuracy - reference_score.accuracy
            agreement = sum(
                a == b for a, b in zip(served_score.predictions, reference_score.predictions)
            ) / len(examples)
            entry.update(
                reference=reference_score.summary(),
                reference_predictions=reference_score.predictions,
                reference_seconds=round(reference_seconds, 3),
                difference=difference,
                prediction_agreement=agreement,
            )
            log.info("%s: reference accuracy %.4f, difference %+.4f, same predictions on %.2f%% of examples",
                     metric, reference_score.accuracy, difference, 100 * agreement)
            if abs(difference) > tolerance:
                failures.append(f"{metric}: served {served_score.accuracy:.4f} vs reference "
                                f"{reference_score.accuracy:.4f} (|difference| {abs(difference):.4f} > {tolerance})")
        results["metrics"][metric] = entry
    if reference is None:
        results.update(parity="not checked", passed=None, parity_note=no_reference_reason)
    else:
        results.update(parity="failed" if failures else "passed", passed=not failures,
                       reference_ids="its own tokenizer's" if reference_encoder else "the served tokenizer's")
    write_text_atomic(Path(output_path), json.dumps(results, indent=2))
    if failures:
        raise AccuracyMismatch("; ".join(failures) + f" (details in {output_path})")
    return results


def expected_cost(batch: int, served_seconds: float, reference_seconds: float, examples: int, metrics: int,
                  bounds: str = "") -> str:
    """One line: the whole run's time extrapolated from its first batch (which includes any warm-up: an upper
    estimate)."""
    per_example = (served_seconds + reference_seconds) / batch
    line = (f"expected cost: about {duration(per_example * examples * metrics)} for {examples} examples x "
            f"{metrics} metric(s) (first batch of {batch}: served {served_seconds:.1f}s")
    line += f", reference {reference_seconds:.1f}s)" if reference_seconds else ")"
    return line + (f"; bounded by {bounds}" if bounds else "")


def reference_cost(texts: Sequence[str], encoder: Encoder, metrics: int, reference: HFGenerator, batch_size: int,
                   bounds: str = "") -> tuple[float, str]:
    """(seconds, one line) before any scoring: the examples' tokens x the model's parameters at the forward rate
    measured here on a few rows (a full batch runs faster per token, generation steps slower: an estimate that the
    first batch's measure then refines)."""
    tokens = metrics * sum(len(encoder.encode(text, True)) for text in texts)
    rows = min(batch_size, 8)
    rate = reference.tokens_per_second(rows)
    seconds = tokens / rate
    line = (f"reference cost up front: {len(texts)} examples x {metrics} metric(s) = {tokens} tokens through "
            f"{reference.parameters / 1e6:.1f}M parameters on {reference.placement.device} "
            f"({reference.placement.dtype}) at {rate:.0f} tokens/s ({rows} rows, measured here): about "
            f"{duration(seconds)}")
    return seconds, line + (f"; bounded by {bounds}" if bounds else "")
