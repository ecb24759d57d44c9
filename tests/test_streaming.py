"""Decoupled (streaming) serving over gRPC: one response per generated token, then the final one.

The decoupled export (`gpt2_stream`, `ensemble_stream` in tests/serving_fixtures.py) must stream partial results
that grow token by token and end with exactly what the plain export returns for the same request; the text never
ends in a split multi-byte character. Expected text comes from HF's tokenizer and HF `generate`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from exporter.clients import common
from serving_fixtures import ENSEMBLE, MODEL, STREAM_ENSEMBLE, STREAM_MODEL

pytestmark = pytest.mark.triton
transformers = pytest.importorskip("transformers")

END_ID = 50256
PROMPTS = ["Thank you for", "Q: Are you going for lunch?"]
MODEL_OUTPUTS = ["output_ids", "sequence_length", "cum_log_probs", "output_log_probs"]


@pytest.fixture(scope="module")
def tokenizer(tiny_gpt2):
    return transformers.GPT2TokenizerFast.from_pretrained(tiny_gpt2)


def model_arrays(tokenizer, prompts, output_len, **options):
    ids = [tokenizer(p).input_ids for p in prompts]
    padded = np.full((len(ids), max(map(len, ids))), END_ID, dtype=np.uint32)
    for row, row_ids in enumerate(ids):
        padded[row, : len(row_ids)] = row_ids
    return {"input_ids": padded, "input_lengths": np.array([[len(i)] for i in ids], dtype=np.uint32),
            "request_output_len": common.per_row(output_len, len(ids), np.uint32),
            **common.sampling_arrays(options, len(ids))}


def test_model_streams_one_response_per_token_then_the_plain_result(served, tokenizer):
    arrays = model_arrays(tokenizer, PROMPTS, 6)
    prompt_width = arrays["input_ids"].shape[1]
    responses = common.stream(served.grpc_url, STREAM_MODEL, arrays, output_names=MODEL_OUTPUTS + ["is_final"])
    plain = common.infer(served.http_url, "http", MODEL, arrays, output_names=MODEL_OUTPUTS)
    *partial, final = responses
    for name in MODEL_OUTPUTS:  # the final response is the complete, non-streamed result
        np.testing.assert_array_equal(final[name], plain[name], err_msg=name)
    assert final.final and final["is_final"].all()
    generated = int((plain["sequence_length"][:, 0] - arrays["input_lengths"][:, 0]).max())
    assert len(partial) == generated  # one response per decoding step
    for step, response in enumerate(partial, start=1):
        assert not response.final and not response["is_final"].any()
        assert response["output_ids"].shape == (2, 1, prompt_width + step)
        assert response["output_log_probs"].shape == (2, 1, step)
        expected_length = np.minimum(arrays["input_lengths"][:, 0] + step, plain["sequence_length"][:, 0])
        np.testing.assert_array_equal(response["sequence_length"][:, 0], expected_length)
        for row in range(2):  # greedy tokens never change once generated
            length = int(response["sequence_length"][row, 0])
            np.testing.assert_array_equal(response["output_ids"][row, 0, :length], plain["output_ids"][row, 0, :length])


def test_ensemble_text_grows_token_by_token_to_the_plain_text(served, hf_model, tokenizer):
    prompt, output_len = PROMPTS[0], 10
    arrays = common.ensemble_arrays([prompt], output_len)
    seen = []
    responses = common.stream(served.grpc_url, STREAM_ENSEMBLE, arrays, output_names=["OUTPUT_0"],
                              on_response=lambda r: seen.append(r["OUTPUT_0"][0, 0].decode("utf-8")))
    texts = [r["OUTPUT_0"][0, 0].decode("utf-8") for r in responses]
    assert texts == seen  # delivered one by one, as they came
    plain = common.infer(served.http_url, "http", ENSEMBLE, arrays)  # all outputs: see common.infer
    assert texts[-1] == plain["OUTPUT_0"][0, 0].decode("utf-8")
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        hf_tokens = hf_model.generate(ids, max_new_tokens=output_len, do_sample=False,
                                      pad_token_id=END_ID)[0, ids.shape[1]:].tolist()
    assert texts[-1] == tokenizer.decode([t for t in hf_tokens if t != END_ID])
    assert len(texts) == output_len + 1  # a response per generated token, then the final one
    for before, after in zip(texts, texts[1:]):
        assert after.startswith(before)
    for count, text in enumerate(texts[:-1], start=1):  # each partial text is the decode of the tokens so far
        assert text == tokenizer.decode(hf_tokens[:count]).rstrip("\ufffd")
    assert len(set(texts)) > output_len // 2  # it really grows along the way


def test_stream_of_beam_search_ends_with_the_plain_beams(served):
    arrays = common.ensemble_arrays(PROMPTS, 6, beam_width=2, len_penalty=1.0)
    responses = common.stream(served.grpc_url, STREAM_ENSEMBLE, arrays, output_names=["OUTPUT_0"])
    plain = common.infer(served.http_url, "http", ENSEMBLE, arrays)  # all outputs: see common.infer
    assert responses[-1]["OUTPUT_0"].shape == (2, 2)
    assert responses[-1]["OUTPUT_0"].tolist() == plain["OUTPUT_0"].tolist()
    assert len(responses) >= 3


def test_postprocessing_never_splits_a_multibyte_character(served, tokenizer):
    """Partial responses of a row still generating hold back an incomplete utf-8 character."""
    prompt = tokenizer("Hello").input_ids
    word = tokenizer(" 日本語").input_ids  # 7 byte-level tokens for 3 three-byte characters
    assert len(word) == 7
    texts = []
    for count in range(1, len(word) + 1):
        tokens = np.array([[prompt + word[:count]]], dtype=np.uint32)
        arrays = {"TOKENS_BATCH": tokens, "SEQUENCE_LENGTH": np.array([[tokens.shape[-1]]], dtype=np.uint32),
                  "INPUT_LENGTHS": np.array([[len(prompt)]], dtype=np.uint32),
                  "IS_FINAL": np.array([[False]])}
        out = common.infer(served.http_url, "http", "postprocessing", arrays, output_names=["OUTPUT"])
        texts.append(out["OUTPUT"][0, 0].decode("utf-8"))
        assert "\ufffd" not in texts[-1]
        assert texts[-1] == tokenizer.decode(word[:count]).rstrip("\ufffd")
    assert texts[-1] == " 日本語" and texts[1] == " " and texts[2] == " 日"
    # A final response flushes everything, as the plain path decodes it (U+FFFD for the cut character).
    arrays["TOKENS_BATCH"] = np.array([[prompt + word[:2]]], dtype=np.uint32)
    arrays["SEQUENCE_LENGTH"] = np.array([[len(prompt) + 2]], dtype=np.uint32)
    arrays["IS_FINAL"] = np.array([[True]])
    out = common.infer(served.http_url, "http", "postprocessing", arrays, output_names=["OUTPUT"])
    assert out["OUTPUT"][0, 0].decode("utf-8") == tokenizer.decode(word[:2]) == " \ufffd"


def test_concurrent_streams_with_different_parameters_do_not_leak(served):
    """Streams batched together (one execute() of the decoupled model) each end as the request alone does."""
    import concurrent.futures

    import tritonclient.http as http

    specs = [dict(top_k=1, seed=0, beam_width=1), dict(top_k=8, seed=3, beam_width=1),
             dict(top_k=1, seed=0, beam_width=3), dict(top_k=40, seed=17, beam_width=1)]
    requests = [common.ensemble_arrays([PROMPTS[i % 2]], 5 + i, **spec) for i, spec in enumerate(specs)]
    alone = [common.infer(served.http_url, "http", ENSEMBLE, arrays)["OUTPUT_0"].tolist() for arrays in requests]

    def statistics():
        with http.InferenceServerClient(served.http_url) as client:
            stats = client.get_inference_statistics(STREAM_MODEL)["model_stats"][0]
        return int(stats["inference_count"]), int(stats["execution_count"])

    before = statistics()
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        streams = list(pool.map(lambda arrays: common.stream(served.grpc_url, STREAM_ENSEMBLE, arrays,
                                                             output_names=["OUTPUT_0"]), requests))
    inferences, executions = (after - start for after, start in zip(statistics(), before))
    assert inferences == len(requests) and executions < len(requests), (inferences, executions)
    for spec, expected, responses in zip(specs, alone, streams):
        assert responses[-1]["OUTPUT_0"].tolist() == expected, spec
