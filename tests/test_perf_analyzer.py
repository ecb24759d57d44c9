"""NVIDIA's perf_analyzer (scripts/install_perf_analyzer.sh) drives the served model as benchmarks/seed003_latency.py
drives it: --input-data JSON of input_ids / input_lengths / request_output_len / end_id, a bounded request count.

perf_analyzer must finish without error and the server's own statistics must count the requests it reports.
Its `validation_data` cannot check this model's outputs: perf_analyzer 2.51 refuses validation data for outputs
of variable shape ("needs to have its shape fully defined"; --shape sets inputs only); tests/test_interface.py
compares them with transformers. Without perf_analyzer the test skips, saying how to install it; with CI=true
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


def inference_count(url: str) -> int:
    import tritonclient.grpc as grpc

    client = grpc.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
        return int(stats["inference_stats"]["success"].get("count", 0))
    finally:
        client.close()


def test_perf_analyzer_drives_the_served_model(served, tmp_path):
    binary = perf_analyzer_or_skip()
    row = {"input_ids": {"content": PROMPT, "shape": [len(PROMPT)]}, "input_lengths": [len(PROMPT)],
           "request_output_len": {"content": [OUTPUT_LEN], "shape": [1]}, "end_id": [END_ID]}
    data = tmp_path / "input.json"
    data.write_text(json.dumps({"data": [row]}))
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
