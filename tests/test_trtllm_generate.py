"""The TensorRT-LLM-compatible model (`trtllm`, `trtllm_stream` in tests/serving_fixtures.py) through Triton's
generate extension: `POST /v2/models/<name>/generate` and `generate_stream` (SSE), with plain HTTP requests.

Expected text and token counts come from HF's tokenizer and HF `generate` (greedy) on the tiny seeded GPT-2.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
import torch

from serving_fixtures import TRTLLM, TRTLLM_STREAM

pytestmark = pytest.mark.triton
transformers = pytest.importorskip("transformers")

END_ID = 50256
PROMPT = "Thank you for"


@pytest.fixture(scope="module")
def tokenizer(tiny_gpt2):
    return transformers.GPT2TokenizerFast.from_pretrained(tiny_gpt2)


def hf_generate(hf_model, tokenizer, prompt, max_new_tokens, **options):
    """HF greedy generation -> (prompt ids, generated ids, an end token included as HF returns it)."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = hf_model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=END_ID,
                                **options)[0]
    return ids[0].tolist(), out[ids.shape[1]:].tolist()


def post(url, body):
    """POST JSON -> (status, the body's bytes)."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def generate(served, model, body):
    status, raw = post(f"http://{served.http_url}/v2/models/{model}/generate", body)
    assert status == 200, raw
    return json.loads(raw)


def generate_stream(served, model, body):
    """The SSE events of generate_stream, parsed (each `data: {...}` line)."""
    status, raw = post(f"http://{served.http_url}/v2/models/{model}/generate_stream", body)
    assert status == 200, raw
    events = [json.loads(line[len("data:"):]) for line in raw.decode("utf-8").splitlines()
              if line.startswith("data:")]
    assert events, raw
    return events


@pytest.mark.parametrize("model", [TRTLLM, TRTLLM_STREAM])
def test_generate_is_hf_greedy_with_hf_token_counts(served, hf_model, tokenizer, model):
    prompt_ids, generated = hf_generate(hf_model, tokenizer, PROMPT, 12)
    result = generate(served, model, {"text_input": PROMPT, "max_tokens": 12})
    text = tokenizer.decode([t for t in generated if t != END_ID])
    assert result["text_output"] == text  # exclude_input_in_output defaults to true
    assert result["num_input_tokens"] == len(prompt_ids)
    assert result["num_output_tokens"] == len(generated)
    assert len(result["output_log_probs"]) == 12


def test_exclude_input_in_output_false_returns_prompt_and_text(served, hf_model, tokenizer):
    _, generated = hf_generate(hf_model, tokenizer, PROMPT, 6)
    result = generate(served, TRTLLM, {"text_input": PROMPT, "max_tokens": 6, "exclude_input_in_output": False})
    assert result["text_output"] == PROMPT + tokenizer.decode([t for t in generated if t != END_ID])


def test_stop_words_end_generation_after_the_word(served, hf_model, tokenizer):
    _, generated = hf_generate(hf_model, tokenizer, PROMPT, 16)
    full = tokenizer.decode(generated)
    # A word the greedy text produces as one token, a few tokens in: generation must stop right after it.
    stop_token = generated[3]
    stop_word = tokenizer.decode([stop_token])
    result = generate(served, TRTLLM, {"text_input": PROMPT, "max_tokens": 16, "stop_words": stop_word})
    expected = tokenizer.decode(generated[: generated.index(stop_token) + 1])
    assert result["text_output"] == expected and len(expected) < len(full)
    assert result["num_output_tokens"] == generated.index(stop_token) + 1


def test_bad_words_are_never_generated(served, hf_model, tokenizer):
    _, generated = hf_generate(hf_model, tokenizer, PROMPT, 10)
    banned = tokenizer.decode([generated[0]])
    # HF's bad_words_ids is the independent reference for the same ban.
    _, expected = hf_generate(hf_model, tokenizer, PROMPT, 10, bad_words_ids=[[generated[0]]])
    result = generate(served, TRTLLM, {"text_input": PROMPT, "max_tokens": 10, "bad_words": banned})
    assert result["text_output"] == tokenizer.decode([t for t in expected if t != END_ID])
    assert generated[0] not in expected


def test_generate_stream_chunks_concatenate_to_the_full_text(served, hf_model, tokenizer):
    prompt_ids, generated = hf_generate(hf_model, tokenizer, PROMPT, 10)
    events = generate_stream(served, TRTLLM_STREAM, {"text_input": PROMPT, "max_tokens": 10, "stream": True})
    assert len(events) > 2  # streamed token by token, not one block
    assert "".join(event["text_output"] for event in events) == tokenizer.decode(
        [t for t in generated if t != END_ID])
    assert events[-1]["num_output_tokens"] == len(generated)
    assert all(event["num_input_tokens"] == len(prompt_ids) for event in events)


def test_generate_stream_without_stream_sends_one_event(served, hf_model, tokenizer):
    _, generated = hf_generate(hf_model, tokenizer, PROMPT, 5)
    events = generate_stream(served, TRTLLM_STREAM, {"text_input": PROMPT, "max_tokens": 5})
    assert [event["text_output"] for event in events] == [tokenizer.decode([t for t in generated if t != END_ID])]


@pytest.mark.parametrize("model, body, named", [
    (TRTLLM, {"presence_penalty": 0.5}, "presence_penalty"),
    (TRTLLM, {"frequency_penalty": 1.0}, "frequency_penalty"),
    (TRTLLM, {"stream": True}, "decoupled"),  # the plain model cannot stream
])
def test_refused_parameter_gets_a_clear_error_and_the_server_stays_up(served, hf_model, tokenizer, model, body,
                                                                      named):
    status, raw = post(f"http://{served.http_url}/v2/models/{model}/generate",
                       {"text_input": PROMPT, "max_tokens": 4, **body})
    assert status == 400, raw
    assert named in json.loads(raw)["error"]
    assert generate(served, model, {"text_input": PROMPT, "max_tokens": 2})["num_output_tokens"] == 2


def test_grpc_streams_of_genai_perf_payload_run_concurrently(served, hf_model, tokenizer):
    """GenAI-Perf's `--backend tensorrtllm --streaming` requests (its inputs.json: text_input BYTES, max_tokens INT32,
    exclude_input_in_output and stream BOOL, each [1, 1]) over gRPC streams, two at once."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from exporter.clients import common

    prompts = [PROMPT, "Q: Are you going for lunch?"]

    def one(prompt):
        arrays = {"text_input": np.array([[prompt.encode()]], dtype=object),
                  "max_tokens": np.array([[8]], dtype=np.int32),
                  "exclude_input_in_output": np.array([[True]]), "stream": np.array([[True]])}
        responses = common.stream(served.grpc_url, TRTLLM_STREAM, arrays,
                                  output_names=["text_output", "num_output_tokens"])
        text = "".join(response["text_output"][0, 0].decode() for response in responses)
        return text, int(responses[-1]["num_output_tokens"][0, 0])

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(one, prompts))
    for prompt, (text, count) in zip(prompts, results):
        _, generated = hf_generate(hf_model, tokenizer, prompt, 8)
        assert text == tokenizer.decode([t for t in generated if t != END_ID])
        assert count == len(generated)
