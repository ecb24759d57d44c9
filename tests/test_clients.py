"""The command-line clients (exporter/clients/, `[project.scripts]`) against the shared server, checked with HF.

The venv used in development installs the project from another checkout, so the clients are run in-process
(`main(argv)` / `run(args, out)`) and with `python -m`; one test checks that the entry points are declared and
importable, which is what `pip install` turns into commands.
"""

from __future__ import annotations

import importlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from exporter.clients import end_to_end, identity, issue_request, prompt
from serving_fixtures import ENSEMBLE, MODEL, STREAM_ENSEMBLE, STREAM_MODEL

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
END_ID = 50256
PROMPTS = ["Thank you for", "Q: Are you going for lunch?"]
SCRIPTS = {
    "ft-exporter-client": "exporter.clients.prompt:main",
    "ft-exporter-end-to-end": "exporter.clients.end_to_end:main",
    "ft-exporter-identity": "exporter.clients.identity:main",
    "ft-exporter-issue-request": "exporter.clients.issue_request:main",
    "ft-exporter-load": "exporter.clients.load:main",
}


def declared_scripts() -> dict:
    """pyproject.toml's [project.scripts] (tomllib from Python 3.11; setuptools' reader before)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        from setuptools.config.pyprojecttoml import read_configuration

        return read_configuration(ROOT / "pyproject.toml")["project"]["scripts"]
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def test_entry_points_are_declared_and_importable():
    declared = declared_scripts()
    assert {name: declared.get(name) for name in SCRIPTS} == SCRIPTS
    for target in SCRIPTS.values():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function))
        done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0 and "usage:" in done.stdout, done.stderr


@pytest.fixture(scope="module")
def tokenizer(tiny_gpt2):
    return transformers.GPT2TokenizerFast.from_pretrained(tiny_gpt2)


def hf_greedy_ids(model, ids: list[int], output_len: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=output_len, do_sample=False, pad_token_id=END_ID)
    new = out[0, len(ids):].tolist()
    return new[: new.index(END_ID) + 1] if END_ID in new else new


@pytest.mark.triton
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_prompt_client_prints_hf_greedy_text(served, hf_model, tokenizer, protocol):
    url = served.http_url if protocol == "http" else served.grpc_url
    out = io.StringIO()
    args = prompt.parser().parse_args(["-u", url, "-i", protocol, "--prompts", *PROMPTS, "--output-len", "6"])
    texts = prompt.run(args, out=out)
    for row, text in enumerate(PROMPTS):
        expected = tokenizer.decode([t for t in hf_greedy_ids(hf_model, tokenizer(text).input_ids, 6) if t != END_ID])
        assert texts[row] == [expected]
        assert f"{text!r} -> {expected!r}" in out.getvalue()


@pytest.mark.triton
def test_prompt_client_without_output_len_prints_hfs_default_generation(served, hf_model, tokenizer):
    """Without --output-len the client sends no INPUT_1 and the text is HF's generate(**tok(prompt)): this
    checkpoint's generation_config.json sets no length, so HF's 20 new tokens (preprocessing fills them in)."""
    args = prompt.parser().parse_args(["-u", served.http_url, "--prompts", *PROMPTS])
    assert args.output_len is None
    texts = prompt.run(args, out=io.StringIO())
    for row, text in enumerate(PROMPTS):
        inputs = tokenizer(text, return_tensors="pt")
        with torch.inference_mode():
            new = hf_model.generate(**inputs)[0, inputs.input_ids.shape[1]:].tolist()
        assert texts[row] == [tokenizer.decode(new, skip_special_tokens=True)]


@pytest.mark.triton
def test_prompt_client_streams_growing_text(served):
    out = io.StringIO()
    argv = ["-u", served.grpc_url, "-i", "grpc", "-m", STREAM_ENSEMBLE, "--stream", "--prompts", PROMPTS[0],
            "--output-len", "6", "--top-k", "4", "--seed", "9"]
    streamed = prompt.run(prompt.parser().parse_args(argv), out=out)
    plain = prompt.run(prompt.parser().parse_args(
        ["-u", served.http_url, "--prompts", PROMPTS[0], "--output-len", "6", "--top-k", "4", "--seed", "9"]),
        out=io.StringIO())
    assert streamed == plain
    pieces = [line for line in out.getvalue().splitlines() if line.startswith("[0] +")]
    assert len(pieces) >= 3  # printed piece by piece as the text grew
    assert "".join(eval(line[len("[0] +"):]) for line in pieces) == plain[0][0]  # noqa: S307 - repr of a str
    assert prompt.main(["-u", served.http_url, "--stream", "--prompts", "x"]) == 1  # streaming needs gRPC


@pytest.mark.triton
# output_len 0: neither preprocessing nor the ensemble is sent one (both fill in the same default).
@pytest.mark.parametrize("protocol, stream, output_len", [("http", False, "5"), ("grpc", False, "5"),
                                                          ("grpc", True, "5"), ("http", False, "0")])
def test_end_to_end_client_stages_agree(served, protocol, stream, output_len):
    url = served.http_url if protocol == "http" else served.grpc_url
    argv = ["-u", url, "-i", protocol, "--output-len", output_len, "--bad-words", " the", "--stop-words", ".",
            "--top-k", "3", "--seed", "21"]
    if stream:
        argv += ["--stream", "-m", STREAM_MODEL, "--ensemble", STREAM_ENSEMBLE]
    result = end_to_end.run(end_to_end.parser().parse_args(argv), out=io.StringIO())
    assert result["agree"], result["problems"]
    assert result["postprocessing"]["OUTPUT"].shape == (2, 1)
    assert (end_to_end.main(argv) == 0)


@pytest.mark.triton
def test_identity_client_saves_outputs_equal_to_hf(served, hf_model, tmp_path):
    path = tmp_path / "out" / "identity.npz"
    argv = ["-u", served.http_url, "-m", MODEL, "-b", "3", "-s", "5", "-o", "7", "--id-seed", "4", "--save", str(path)]
    assert identity.main(argv) == 0
    saved = np.load(path)
    ids = saved["input.input_ids"]
    assert ids.shape == (3, 5) and saved["output_ids"].shape == (3, 1, 12)
    assert saved["output_log_probs"].shape == (3, 1, 7)
    for row in range(3):
        length = int(saved["sequence_length"][row, 0])
        assert saved["output_ids"][row, 0, 5:length].tolist() == hf_greedy_ids(hf_model, ids[row].tolist(), 7)
    streamed = identity.run(identity.parser().parse_args(
        ["-u", served.grpc_url, "-i", "grpc", "-m", STREAM_MODEL, "--stream", "-b", "3", "-s", "5", "-o", "7",
         "--id-seed", "4"]), out=io.StringIO())
    np.testing.assert_array_equal(streamed["output_ids"], saved["output_ids"])


@pytest.mark.triton
def test_issue_request_tool_sends_json_requests(served, hf_model, tmp_path):
    ids = [464, 2068, 7586, 21831]
    request = {"config": {"model_name": MODEL, "protocol": "http", "url": served.http_url},
               "request": [{"name": "input_ids", "data": [ids], "dtype": "uint32"},
                           {"name": "input_lengths", "data": [[4]], "dtype": "uint32"},
                           {"name": "request_output_len", "data": [[6]], "dtype": "uint32"},
                           {"name": "runtime_top_k", "data": [[1]], "dtype": "uint32"}]}
    path = tmp_path / "request.json"
    path.write_text(json.dumps(request))
    out = io.StringIO()
    assert issue_request.main([str(path)], out=out) == 0
    answer = json.loads(out.getvalue())
    length = answer["sequence_length"][0][0]
    assert answer["output_ids"][0][0][4:length] == hf_greedy_ids(hf_model, ids, 6)

    text_request = {"config": {"model_name": ENSEMBLE},
                    "request": [{"name": "INPUT_0", "data": [[PROMPTS[0]]], "dtype": "bytes"},
                                {"name": "INPUT_1", "data": [[6]], "dtype": "uint32"}]}
    path.write_text(json.dumps(text_request))
    out = io.StringIO()
    assert issue_request.main([str(path), "-u", served.http_url], out=out) == 0
    plain_text = json.loads(out.getvalue())["OUTPUT_0"][0][0]
    out = io.StringIO()  # the same file streamed over gRPC: one JSON line per response, the last = plain
    assert issue_request.main([str(path), "-u", served.grpc_url, "-i", "grpc", "-m", STREAM_ENSEMBLE, "--stream"],
                              out=out) == 0
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == 6 + 1 and lines[-1]["OUTPUT_0"][0][0] == plain_text

    path.write_text(json.dumps({"request": [{"name": "INPUT_0"}]}))
    assert issue_request.main([str(path)]) == 2  # malformed file: clear error, no request sent
