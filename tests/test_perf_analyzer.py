"""NVIDIA's perf_analyzer (scripts/install_perf_analyzer.sh) drives the served model as benchmarks/seed003_latency.py
drives it: --input-data JSON of input_ids / input_lengths / request_output_len / end_id, a bounded request count.

perf_analyzer checks every response against the `validation_data` of that file, here HF transformers' greedy
`generate` of the same prompt (the independent reference), and the server's own statistics must count exactly the
requests perf_analyzer reports. Without perf_analyzer the test skips, saying how to install it; with CI=true
(.ci/run installs it) it fails instead.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from serving_fixtures import MODEL

pytestmark = pytest.mark.triton

PROMPT = [464, 3139, 286, 4881, 318, 257]  # GPT-2 ids of "The capital of France is a"
OUTPUT_LEN, REQUESTS, END_ID = 8, 6, 50256


def perf_analyzer_or_skip() -> str:
    found = shutil.which("perf_analyzer") or shutil.which("perf_analyzer", path=str(Path(sys.executable).parent))
    if found is None:
        message = "no perf_analyzer on PATH or beside this interpreter: scripts/install_perf_analyzer.sh"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


def hf_greedy(model) -> tuple[list[int], int]:
    """output_ids as the served model returns them (prompt, generated, end_id padding) and the sequence length."""
    with torch.inference_mode():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=OUTPUT_LEN, do_sample=False,
                             eos_token_id=END_ID, pad_token_id=END_ID)[0].tolist()
    generated = out[len(PROMPT):]
    if END_ID in generated:
        generated = generated[:generated.index(END_ID) + 1]
    length = len(PROMPT) + len(generated)
    return (PROMPT + generated + [END_ID] * OUTPUT_LEN)[:len(PROMPT) + OUTPUT_LEN], length


def inference_count(url: str) -> int:
    import tritonclient.grpc as grpc

    client = grpc.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
        return int(stats["inference_stats"]["success"].get("count", 0))
    finally:
        client.close()


def test_perf_analyzer_requests_match_transformers(served, hf_model, tmp_path):
    binary = perf_analyzer_or_skip()
    expected_ids, expected_length = hf_greedy(hf_model)
    row = {"input_ids": {"content": PROMPT, "shape": [len(PROMPT)]}, "input_lengths": [len(PROMPT)],
           "request_output_len": {"content": [OUTPUT_LEN], "shape": [1]}, "end_id": [END_ID]}
    validation = {"output_ids": {"content": expected_ids, "shape": [1, len(expected_ids)]},
                  "sequence_length": {"content": [expected_length], "shape": [1]}}
    data = tmp_path / "input.json"
    data.write_text(json.dumps({"data": [row], "validation_data": [validation]}))
    before = inference_count(served.grpc_url)
    run = subprocess.run([binary, "-m", MODEL, "-i", "grpc", "-u", served.grpc_url, "-b", "1", "--input-data",
                          str(data), "--concurrency-range", "2", "--request-count", str(REQUESTS),
                          "--measurement-mode", "count_windows", "-f", str(tmp_path / "out.csv")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    with open(tmp_path / "out.csv") as f:
        result = next(csv.DictReader(f))
    assert float(result["Inferences/Second"]) > 0
    # perf_analyzer's own warm-up and tail requests may add a few beyond the measured count, never fewer.
    assert inference_count(served.grpc_url) - before >= REQUESTS
