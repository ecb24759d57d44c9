"""LAMBADA through a running tritonserver, with both metrics, and the same metric on the source checkpoint.

Metrics:
- `last_token` (FasterTransformer's evaluate_lambada.py): context = all BPE tokens but the last; correct iff the
  greedy next token equals the last token.
- `last_word` (NeMo-Launcher's): label = the last whitespace-separated word, tokenised with its leading space;
  correct iff greedy generation reproduces every label token.

Contexts are left-truncated so context + label fits `max_seq_len`.
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

log = logging.getLogger(__name__)


class AccuracyMismatch(RuntimeError):
    """Served accuracy differs from the source model's by more than the tolerance."""


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


def read_texts(path: Path, limit: int | None = None) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                texts.append(json.loads(line)["text"])
            if limit is not None and len(texts) >= limit:
                break
    if not texts:
        raise ValueError(f"no examples in {path}")
    return texts


def build_examples(texts: Sequence[str], encode: Callable[[str], list[int]], metric: str, max_seq_len: int) -> list[Example]:
    examples = []
    for text in texts:
        if metric == "last_token":
            ids = encode(text)
            context, label = ids[:-1], ids[-1:]
        elif metric == "last_word":
            head, word = text.rstrip().rsplit(" ", 1)
            context, label = encode(head), encode(" " + word)
        else:
            raise ValueError(f"unknown metric {metric!r}")
        keep = max(1, max_seq_len - len(label))
        examples.append(Example(context[-keep:], label))
    return examples


def score(
    examples: Sequence[Example],
    generate: Callable[[list[Example]], list[list[int]]],
    batch_size: int,
    label: str = "",
) -> Score:
    """`generate` maps a batch of examples to greedy continuations of len(label) tokens (shorter if it stopped).

    Logs progress about every tenth of the way."""
    result = Score()
    started = time.monotonic()
    next_report = len(examples) / 10
    for start in range(0, len(examples), batch_size):
        batch = list(examples[start : start + batch_size])
        for example, generated in zip(batch, generate(batch)):
            prediction = list(generated[: len(example.label)])
            result.predictions.append(prediction)
            result.correct += prediction == example.label
            result.total += 1
        if label and result.total >= next_report and result.total < len(examples):
            log.info("%s: %d/%d examples (%.1fs)", label, result.total, len(examples), time.monotonic() - started)
            next_report += len(examples) / 10
    return result


class TritonGenerator:
    """Greedy continuations from the served model over Triton's HTTP API (token ids in, token ids out)."""

    def __init__(self, url: str, model_name: str, end_id: int):
        import tritonclient.http as httpclient

        self.url = url
        # One client for every batch, with timeouts long enough for a large batch on a slow runtime.
        self.client = httpclient.InferenceServerClient(url, network_timeout=600.0, connection_timeout=600.0)
        self.model_name = model_name
        self.end_id = end_id

    def __call__(self, batch: list[Example]) -> list[list[int]]:
        lengths = np.array([[len(example.context)] for example in batch], dtype=np.uint32)
        ids = np.full((len(batch), int(lengths.max())), self.end_id, dtype=np.uint32)
        for row, example in enumerate(batch):
            ids[row, : len(example.context)] = example.context
        output_len = np.array([[len(example.label)] for example in batch], dtype=np.uint32)
        arrays = {
            "input_ids": ids,
            "input_lengths": lengths,
            "request_output_len": output_len,
            **common.sampling_arrays({"top_k": 1, "top_p": 0.0}, len(batch)),  # greedy
        }
        response = common.infer(self.url, "http", self.model_name, arrays,
                                output_names=("output_ids", "sequence_length"), client=self.client)
        output_ids = response["output_ids"]  # [batch, beam, T]
        sequence_length = response["sequence_length"]  # [batch, beam]
        return [
            output_ids[row, 0, len(example.context) : int(sequence_length[row, 0])].tolist()
            for row, example in enumerate(batch)
        ]


class HFGenerator:
    """Greedy continuations from the source checkpoint with HF transformers, in-process (the independent reference)."""

    def __init__(self, checkpoint: Path, end_id: int):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        checkpoint = Path(checkpoint)
        if checkpoint.is_file():  # a GGUF file: transformers reads it from its directory, de-quantised to float32
            self.model = AutoModelForCausalLM.from_pretrained(str(checkpoint.parent), gguf_file=checkpoint.name,
                                                              dtype=torch.float32).eval()
        else:
            self.model = AutoModelForCausalLM.from_pretrained(str(checkpoint)).float().eval()
        self.end_id = end_id

    def __call__(self, batch: list[Example]) -> list[list[int]]:
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
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=steps,
                do_sample=False,
                num_beams=1,
                pad_token_id=self.end_id,
                eos_token_id=self.end_id,
            )
        generated = out[:, width:].tolist()
        # Rows that ended at end_id are padded with it by generate; keep the end token, drop the padding.
        return [_cut_after_end(row, self.end_id) for row in generated]


def _cut_after_end(tokens: list[int], end_id: int) -> list[int]:
    return tokens[: tokens.index(end_id) + 1] if end_id in tokens else tokens


def evaluate(
    *,
    texts: Sequence[str],
    encode: Callable[[str], list[int]],
    served: Callable[[list[Example]], list[list[int]]],
    reference: Callable[[list[Example]], list[list[int]]] | None,
    metrics: Sequence[str],
    batch_size: int,
    max_seq_len: int,
    tolerance: float,
    output_path: Path,
    info: dict | None = None,
) -> dict:
    """Score every metric on the served model (and the reference when given); write and return the results."""
    results: dict = {"examples": len(texts), "batch_size": batch_size, "tolerance": tolerance, **(info or {})}
    results["metrics"] = {}
    failures = []
    for metric in metrics:
        examples = build_examples(texts, encode, metric, max_seq_len)
        started = time.monotonic()
        served_score = score(examples, served, batch_size, f"{metric} served")
        served_seconds = time.monotonic() - started
        entry: dict = {
            "served": served_score.summary(),
            "served_predictions": served_score.predictions,
            "served_seconds": round(served_seconds, 3),
            "served_examples_per_second": round(len(examples) / served_seconds, 2) if served_seconds else None,
        }
        log.info("%s: served accuracy %.4f (%d/%d) in %.1fs", metric, served_score.accuracy, served_score.correct,
                 served_score.total, served_seconds)
        if reference is not None:
            started = time.monotonic()
            reference_score = score(examples, reference, batch_size, f"{metric} reference")
            difference = served_score.accuracy - reference_score.accuracy
            agreement = sum(
                a == b for a, b in zip(served_score.predictions, reference_score.predictions)
            ) / len(examples)
            entry.update(
                reference=reference_score.summary(),
                reference_predictions=reference_score.predictions,
                reference_seconds=round(time.monotonic() - started, 3),
                difference=difference,
                prediction_agreement=agreement,
            )
            log.info("%s: reference accuracy %.4f, difference %+.4f, same predictions on %.2f%% of examples",
                     metric, reference_score.accuracy, difference, 100 * agreement)
            if abs(difference) > tolerance:
                failures.append(f"{metric}: served {served_score.accuracy:.4f} vs reference "
                                f"{reference_score.accuracy:.4f} (|difference| {abs(difference):.4f} > {tolerance})")
        results["metrics"][metric] = entry
    results["passed"] = not failures
    write_text_atomic(Path(output_path), json.dumps(results, indent=2))
    if failures:
        raise AccuracyMismatch("; ".join(failures) + f" (details in {output_path})")
    return results
