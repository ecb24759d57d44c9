"""The accuracy stage at the scale of real models: subsets that bound it, the cost said up front, the reference
placed where it fits, and progress with rate and time left."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from exporter import progress
from exporter.evaluate import lambada, placement
from exporter.evaluate.lambada import Encoder, evaluate, read_texts
from exporter.evaluate.placement import Placement, reference_placement
from tokenizer_fixtures import LAMBADA


def test_stride_takes_every_kth_example_then_the_limit():
    lines = [json.loads(line)["text"] for line in LAMBADA.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(lines) == 5153
    assert read_texts(LAMBADA, None, 1000) == lines[::1000]
    assert read_texts(LAMBADA, 3, 500) == [lines[0], lines[500], lines[1000]]
    assert read_texts(LAMBADA, 4) == lines[:4]


def test_expected_cost_is_logged_after_the_first_batch_before_the_rest(tmp_path, caplog):
    """The whole run's cost (both metrics, served + reference) is said after the first batch, with the keys that
    bound it, before the second batch is scored."""
    texts = ["one two three", "four five six", "seven eight nine", "ten eleven twelve"]
    encoder = Encoder(lambda text, special: [len(word) for word in text.split()])
    seen_before_call = []

    def served(batch):
        seen_before_call.append(any("expected cost" in record.getMessage() for record in caplog.records))
        return [example.label for example in batch]

    with caplog.at_level(logging.INFO, logger="exporter.evaluate.lambada"):
        results = evaluate(texts=texts, encoder=encoder, served=served, reference=served,
                           metrics=["last_word", "last_token"], batch_size=2, max_seq_len=16, tolerance=0.0,
                           output_path=tmp_path / "out.json", bounds="export.accuracy.limit=4")
    assert results["passed"] is True
    # served and reference share the callable: calls go served, reference per batch, metric after metric
    assert seen_before_call == [False, False, True, True, True, True, True, True]
    (line,) = [record.getMessage() for record in caplog.records if "expected cost" in record.getMessage()]
    assert "4 examples x 2 metric(s)" in line and "export.accuracy.limit=4" in line


def test_half_precision_reference_widens_the_tolerance_and_says_so():
    assert Placement().tolerance(0.005, 24) == (0.005, "")
    tolerance, note = Placement("cuda", "bfloat16").tolerance(0.005, 1000)
    assert tolerance == placement.HALF_PRECISION_TOLERANCE and "bfloat16" in note
    assert Placement("cuda", "float16").tolerance(0.005, 24)[0] == 1 / 24  # one flipped example of 24
    assert Placement("cuda", "float16").tolerance(0.2, 24) == (0.2, "")


def _checkpoint(tmp_path, dtype: str, weight_bytes: int):
    (tmp_path / "config.json").write_text(json.dumps({"dtype": dtype}))
    (tmp_path / "model.safetensors").write_bytes(b"\0" * weight_bytes)
    return tmp_path


def test_reference_goes_to_the_gpu_in_its_dtype_only_where_it_fits(tmp_path, monkeypatch):
    checkpoint = _checkpoint(tmp_path, "bfloat16", 1000)
    if not torch.cuda.is_available():
        assert reference_placement(checkpoint) == Placement(reason="the CPU, in float32 (no CUDA device)")
        with pytest.raises(ValueError, match="no CUDA device"):
            reference_placement(checkpoint, "cuda")
    # The decision on a GPU with a given free memory (torch's answers stand in for a device).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (80 << 30, 80 << 30))
    placed = reference_placement(checkpoint)
    assert (placed.device, placed.dtype) == ("cuda", "bfloat16")
    assert reference_placement(checkpoint, "cpu").device == "cpu"
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (1 << 30, 80 << 30))  # 1 GiB free: not even headroom
    assert reference_placement(checkpoint).device == "cpu"
    with pytest.raises(ValueError, match="do not fit"):
        reference_placement(checkpoint, "cuda")


def test_progress_in_a_log_says_rate_and_time_left(monkeypatch, caplog):
    monkeypatch.setenv(progress.ENV, "log")
    logger = logging.getLogger("test.progress")
    with caplog.at_level(logging.INFO, logger="test.progress"):
        with progress.Progress(4, "scoring", unit="example", logger=logger, interval_s=0.0) as bar:
            for _ in range(4):
                bar.update(1)
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 4  # three while it runs (interval 0), one at the end
    assert lines[0].startswith("scoring:  25% 1/4 [") and "example/s" in lines[0] and "<" in lines[0]
    assert lines[-1].startswith("scoring: 100% 4/4 [")


def test_progress_on_a_terminal_is_a_bar_and_off_is_silent(monkeypatch, capsys, caplog):
    monkeypatch.setenv(progress.ENV, "bar")
    with progress.Progress(3 << 20, "writing FT shards", unit="B") as bar:
        bar.update(3 << 20)
    assert "writing FT shards: 100%" in capsys.readouterr().err
    monkeypatch.setenv(progress.ENV, "off")
    with caplog.at_level(logging.INFO):
        with progress.Progress(2, "quiet") as bar:
            bar.update(2)
    assert capsys.readouterr().err == "" and not caplog.records


def test_reference_cost_is_said_before_scoring(tiny_gpt2):
    """Before anything is scored: the examples' tokens (as HF's own tokenizer counts them) through the model's
    parameters, at a forward rate measured on this device."""
    from transformers import GPT2TokenizerFast

    tokenizer = GPT2TokenizerFast.from_pretrained(tiny_gpt2)
    texts = read_texts(LAMBADA, 8, 100)
    encoder = Encoder(lambda text, special: tokenizer(text, add_special_tokens=special).input_ids)
    reference = lambada.HFGenerator(tiny_gpt2, 50256)
    seconds, line = lambada.reference_cost(texts, encoder, 2, reference, 4, "export.accuracy.limit=8")
    tokens = 2 * sum(len(tokenizer(text).input_ids) for text in texts)
    parameters = sum(parameter.numel() for parameter in reference.model.parameters())
    assert f"8 examples x 2 metric(s) = {tokens} tokens through {parameters / 1e6:.1f}M parameters on cpu" in line
    assert line.endswith("export.accuracy.limit=8") and 0 < seconds < 60
