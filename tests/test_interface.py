"""Every FT backend input through the served model and the ensemble, checked against HF transformers.

The shared server (tests/serving_fixtures.py) serves the tiny HF GPT-2 of conftest.py; HF `generate` on the same
checkpoint is the independent reference. Rendering facts (names, dtypes, dims as FT's GPT config.pbtxt) are
checked without a server.
"""

from __future__ import annotations

import concurrent.futures
import csv
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from exporter.clients import common
from exporter.parallel import ParallelLayout
from exporter.runtimes import ModelSettings, runtime_for
from exporter.triton import render
from serving_fixtures import ENSEMBLE, MAX_BEAM_WIDTH, MODEL, QUEUE_DELAY_US

transformers = pytest.importorskip("transformers")

END_ID = 50256
PROMPTS = ["Thank you for", "Q: Are you going for lunch?", "The quick brown fox jumps over the lazy dog because it"]
OUTPUT_LEN = 8


# -- rendering (no server) ----------------------------------------------------------------------------------------
def _settings(runtime: str, decoupled: bool = False) -> ModelSettings:
    return ModelSettings(
        name="gpt", runtime=runtime, max_batch_size=8, layout=ParallelLayout(1, 1), data_type="fp32",
        max_queue_delay_microseconds=1234, decoupled=decoupled, max_beam_width=3, admission_window_microseconds=2500,
    )


def _model_config(settings: ModelSettings) -> pb.ModelConfig:
    """The model's config.pbtxt as the settings' runtime renders it, for a repository at /repo."""
    return runtime_for(settings.runtime).model_config(settings, Path("/repo"))


def _parsed(config: pb.ModelConfig) -> pb.ModelConfig:
    """Rendered to text and parsed back, as tritonserver reads it."""
    return text_format.Parse(text_format.MessageToString(config), pb.ModelConfig())


def test_python_runtime_batches_ragged_requests_with_queue_delay():
    config = _parsed(_model_config(_settings("python")))
    ragged = {i.name for i in config.input if i.allow_ragged_batch}
    assert ragged == {"input_ids", "request_output_len", "bad_words_list", "stop_words_list"}
    assert config.dynamic_batching.max_queue_delay_microseconds == 1234
    assert not config.model_transaction_policy.decoupled
    assert config.parameters["max_beam_width"].string_value == "3"
    assert config.parameters["admission_window_microseconds"].string_value == "2500"
    assert {o.name for o in config.output} == {"output_ids", "sequence_length", "cum_log_probs", "output_log_probs"}
    for make in (render.preprocessing_config, render.postprocessing_config):
        helper = _parsed(make(8, END_ID, 1234))
        assert helper.dynamic_batching.max_queue_delay_microseconds == 1234
        assert {i.name for i in helper.input if i.allow_ragged_batch} == {
            i.name for i in helper.input if -1 in i.dims}


def test_decoupled_model_and_streaming_ensemble():
    config = _parsed(_model_config(_settings("python", decoupled=True)))
    assert config.model_transaction_policy.decoupled
    assert {"prompt_lengths", "is_final"} <= {o.name for o in config.output}
    ensemble = _parsed(render.ensemble_config("gpt", 8, decoupled=True))
    assert [o.name for o in ensemble.output] == ["OUTPUT_0"]
    post = ensemble.ensemble_scheduling.step[2]
    model_step = ensemble.ensemble_scheduling.step[1]
    # Triton: a step after a decoupled model may read that model's tensors only.
    assert set(post.input_map.values()) <= set(model_step.output_map.values())
    with pytest.raises(ValueError, match="python runtime"):
        _model_config(_settings("fastertransformer", decoupled=True))


def test_ft_backend_config_renders_word_lists_and_no_python_extras():
    config = _parsed(_model_config(_settings("fastertransformer")))
    inputs = {i.name: (i.data_type, list(i.dims), i.optional) for i in config.input}
    assert inputs["bad_words_list"] == (pb.TYPE_INT32, [2, -1], True)
    assert inputs["stop_words_list"] == (pb.TYPE_INT32, [2, -1], True)
    assert inputs["top_p_reset_ids"] == (pb.TYPE_UINT32, [1], True)
    assert not any(i.allow_ragged_batch for i in config.input)
    assert "max_beam_width" not in config.parameters and "device" not in config.parameters
    ensemble = _parsed(render.ensemble_config("gpt", 8))
    assert {"INPUT_2", "INPUT_3"} <= {i.name for i in ensemble.input if i.optional}
    model_step = ensemble.ensemble_scheduling.step[1]
    assert model_step.input_map["bad_words_list"] == "_BAD_WORDS_IDS"
    assert model_step.input_map["stop_words_list"] == "_STOP_WORDS_IDS"


@pytest.mark.parametrize("overrides, key", [
    (["export.triton_deployment.decoupled=True"], "export.triton_deployment.decoupled"),  # LAMBADA still on
    (["export.triton_deployment.decoupled=True", "export.accuracy.enabled=False",
      "export.triton_deployment.runtime=fastertransformer"], "export.triton_deployment.decoupled"),
    (["export.triton_deployment.max_queue_delay_microseconds=-1"], "max_queue_delay_microseconds"),
    (["export.triton_deployment.max_beam_width=0"], "max_beam_width"),
    (["export.triton_deployment.admission_window_microseconds=-1"], "admission_window_microseconds"),
])
def test_serving_keys_are_validated(overrides, key):
    from hydra import compose, initialize_config_dir

    from exporter.config import ConfigError, validate

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        ok = validate(compose("config", overrides=["export.triton_deployment.decoupled=True",
                                                   "export.accuracy.enabled=False"]))
        bad = compose("config", overrides=overrides)
    assert ok.export.triton_deployment.decoupled and ok.export.triton_deployment.max_beam_width == 4
    with pytest.raises(ConfigError, match=key):
        validate(bad)


# -- helpers ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(tiny_gpt2):
    return transformers.GPT2TokenizerFast.from_pretrained(tiny_gpt2)


def hf_generate(model, tokenizer, prompt: str, output_len: int, **kwargs) -> list[list[int]]:
    """HF transformers' generated tokens (one list per returned sequence, cut after the first end id)."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=output_len, pad_token_id=END_ID, **kwargs)
    sequences = []
    for row in out[:, ids.shape[1]:].tolist():
        if END_ID in row:
            row = row[: row.index(END_ID) + 1]
        sequences.append(row)
    return sequences


def served_tokens(result, row: int, prompt_len: int) -> list[list[int]]:
    """Generated ids per beam of one row of a model/ensemble result."""
    ids, lengths = result["output_ids"][row], result["sequence_length"][row]
    return [ids[beam, prompt_len: int(lengths[beam])].tolist() for beam in range(ids.shape[0])
            if int(lengths[beam]) > 0]


def ensemble(served, prompts, output_len=OUTPUT_LEN, **options):
    names = ["OUTPUT_0", "output_ids", "sequence_length", "cum_log_probs", "output_log_probs"]
    return common.infer(served.http_url, "http", ENSEMBLE, common.ensemble_arrays(prompts, output_len, **options),
                        output_names=names)


def model_request(tokenizer, prompts, output_len=OUTPUT_LEN, **options):
    """The model's inputs for `prompts`, right-padded with end_id as preprocessing does."""
    ids = [tokenizer(p).input_ids for p in prompts]
    width = max(map(len, ids))
    padded = np.full((len(ids), width), END_ID, dtype=np.uint32)
    for row, row_ids in enumerate(ids):
        padded[row, : len(row_ids)] = row_ids
    arrays = {"input_ids": padded, "input_lengths": np.array([[len(i)] for i in ids], dtype=np.uint32),
              "request_output_len": common.per_row(output_len, len(ids), np.uint32)}
    words = {key: options.pop(key) for key in ("bad_words_list", "stop_words_list") if key in options}
    arrays.update(common.sampling_arrays(options, len(ids)))
    arrays.update(words)
    return arrays


def infer_model(served, arrays, model=MODEL):
    names = ["output_ids", "sequence_length", "cum_log_probs", "output_log_probs"]
    return common.infer(served.http_url, "http", model, arrays, output_names=names)


def word_list_reference(tokenizer, csv_words: str) -> np.ndarray:
    """FT's [1, 2, W] word list built here from HF's tokenizer (ids padded 0, offsets padded -1)."""
    words = next(csv.reader(io.StringIO(csv_words))) if csv_words else []
    ids, offsets = [], []
    for word in words:
        ids += tokenizer(word).input_ids
        offsets.append(len(ids))
    width = max(1, len(ids))
    out = np.zeros((1, 2, width), dtype=np.int32)
    out[0, 1, :] = -1
    out[0, 0, : len(ids)] = ids
    out[0, 1, : len(offsets)] = offsets
    return out


# -- preprocessing word lists -------------------------------------------------------------------------------------
@pytest.mark.triton
@pytest.mark.parametrize("words", ["Hello, world", ' naïve," quoted, comma",🤗', ""])
def test_preprocessing_builds_ft_word_lists(served, tokenizer, words):
    arrays = {"QUERY": common.text_array(["Hi", "Hey there"]), "REQUEST_OUTPUT_LEN": common.per_row(4, 2, np.uint32),
              "BAD_WORDS_DICT": common.text_array([words, ""]), "STOP_WORDS_DICT": common.text_array(["", words])}
    result = common.infer(served.http_url, "http", "preprocessing", arrays)
    bad, stop = result["BAD_WORDS_IDS"], result["STOP_WORDS_IDS"]
    assert bad.dtype == np.int32 and bad.shape[:2] == (2, 2)
    expected, empty = word_list_reference(tokenizer, words)[0], word_list_reference(tokenizer, "")[0]
    width = expected.shape[1]
    np.testing.assert_array_equal(bad[0, :, :width], expected)
    np.testing.assert_array_equal(stop[1, :, :width], expected)
    for row in (bad[1], stop[0]):  # the row without words: no offsets at all
        assert (row[1] == -1).all() and (row[0, : empty.shape[1]] == empty[0]).all()


# -- decoding through the served model and ensemble vs HF -----------------------------------------------------------
@pytest.mark.triton
def test_beam_search_through_ensemble_equals_hf(served, hf_model, tokenizer):
    width, penalty = 3, 0.7
    result = ensemble(served, PROMPTS[:2], beam_width=width, len_penalty=penalty)
    assert result["output_ids"].shape[:2] == (2, width)
    assert result["OUTPUT_0"].shape == (2, width)
    for row, prompt in enumerate(PROMPTS[:2]):
        expected = hf_generate(hf_model, tokenizer, prompt, OUTPUT_LEN, num_beams=width, length_penalty=penalty,
                               early_stopping=True, do_sample=False, num_return_sequences=width)
        got = served_tokens(result, row, len(tokenizer(prompt).input_ids))
        assert got == expected, prompt
        texts = [t.decode() for t in result["OUTPUT_0"][row]]
        assert texts == [tokenizer.decode([t for t in seq if t != END_ID]) for seq in expected]
        # Beam scores: HF's sequences_scores = sum of log-probs / generated length ** length_penalty.
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            hf = hf_model.generate(ids, max_new_tokens=OUTPUT_LEN, pad_token_id=END_ID, num_beams=width,
                                   length_penalty=penalty, early_stopping=True, do_sample=False,
                                   num_return_sequences=width, output_scores=True, return_dict_in_generate=True)
        lengths = np.array([len(seq) for seq in got], dtype=np.float64)
        np.testing.assert_allclose(result["cum_log_probs"][row] / lengths ** penalty,
                                   hf.sequences_scores.numpy(), atol=1e-4)
        np.testing.assert_allclose(result["output_log_probs"][row].sum(-1), result["cum_log_probs"][row], atol=1e-4)


@pytest.mark.triton
def test_repetition_penalty_and_temperature_with_top_k_1_equal_hf(served, hf_model, tokenizer):
    result = ensemble(served, PROMPTS, output_len=12, repetition_penalty=1.8, temperature=0.6, top_k=1)
    for row, prompt in enumerate(PROMPTS):
        expected = hf_generate(hf_model, tokenizer, prompt, 12, do_sample=False, repetition_penalty=1.8)
        assert served_tokens(result, row, len(tokenizer(prompt).input_ids)) == expected, prompt


@pytest.mark.triton
def test_bad_words_never_appear_and_match_hf(served, hf_model, tokenizer):
    prompt = PROMPTS[0]
    greedy = hf_generate(hf_model, tokenizer, prompt, OUTPUT_LEN, do_sample=False)[0]
    banned = [tokenizer.decode([greedy[0]]), tokenizer.decode(greedy[2:4])]  # a one- and a two-token word
    bad_ids = [tokenizer(w).input_ids for w in banned]
    assert bad_ids[0] == [greedy[0]] and bad_ids[1] == greedy[2:4]
    result = ensemble(served, [prompt], bad_words=",".join(banned))
    got = served_tokens(result, 0, len(tokenizer(prompt).input_ids))[0]
    expected = hf_generate(hf_model, tokenizer, prompt, OUTPUT_LEN, do_sample=False, bad_words_ids=bad_ids)[0]
    assert got == expected and got != greedy
    assert greedy[0] not in got
    assert not any(got[i: i + 2] == bad_ids[1] for i in range(len(got) - 1))


@pytest.mark.triton
def test_generation_ends_at_stop_word_and_end_id(served, hf_model, tokenizer):
    prompt = PROMPTS[1]
    prompt_len = len(tokenizer(prompt).input_ids)
    greedy = hf_generate(hf_model, tokenizer, prompt, OUTPUT_LEN, do_sample=False)[0]
    stop = tokenizer.decode(greedy[2:4])
    assert tokenizer(stop).input_ids == greedy[2:4]
    result = ensemble(served, [prompt], stop_words=stop)
    assert served_tokens(result, 0, prompt_len)[0] == greedy[:4]  # the stop word stays, as in FT
    assert int(result["sequence_length"][0, 0]) == prompt_len + 4
    assert result["OUTPUT_0"][0, 0].decode() == tokenizer.decode(greedy[:4])
    ended = ensemble(served, [prompt], end_id=greedy[1])
    assert served_tokens(ended, 0, prompt_len)[0] == greedy[:2]
    assert ended["OUTPUT_0"][0, 0].decode() == tokenizer.decode(greedy[:1])  # the request's end token is no text


@pytest.mark.triton
def test_seed_repeats_sample_and_log_probs_can_be_omitted(served, tokenizer):
    arrays = model_request(tokenizer, PROMPTS[:2], top_k=0, top_p=0.9, seed=1234)
    first, second = infer_model(served, arrays), infer_model(served, arrays)
    np.testing.assert_array_equal(first["output_ids"], second["output_ids"])
    other = infer_model(served, model_request(tokenizer, PROMPTS[:2], top_k=0, top_p=0.9, seed=99))
    assert not np.array_equal(first["output_ids"], other["output_ids"])
    quiet = infer_model(served, model_request(tokenizer, PROMPTS[:2], top_k=0, top_p=0.9, seed=1234,
                                              return_log_probs=False))
    np.testing.assert_array_equal(quiet["output_ids"], first["output_ids"])
    assert not quiet["output_log_probs"].any() and not quiet["cum_log_probs"].any()
    assert first["output_log_probs"].any()


@pytest.mark.triton
def test_every_ft_input_accepted_by_model_and_ensemble(served, tokenizer):
    """All FT inputs at once, with their FT dtypes and [batch, 1] shapes (word lists [batch, 2, W])."""
    options = dict(top_k=4, top_p=0.8, temperature=0.9, repetition_penalty=1.1, len_penalty=0.0, beam_width=1,
                   diversity_rate=0.0, seed=7, start_id=END_ID, end_id=END_ID, top_p_decay=0.9, top_p_min=0.1,
                   top_p_reset_ids=13, return_log_probs=True)
    arrays = model_request(tokenizer, PROMPTS, **options,
                           bad_words_list=np.repeat(word_list_reference(tokenizer, " the, a"), 3, axis=0),
                           stop_words_list=np.repeat(word_list_reference(tokenizer, "."), 3, axis=0))
    assert len(arrays) == 19
    result = infer_model(served, arrays)
    width = arrays["input_ids"].shape[1] + OUTPUT_LEN
    assert result["output_ids"].shape == (3, 1, width) and result["output_ids"].dtype == np.uint32
    assert result["sequence_length"].shape == (3, 1) and result["cum_log_probs"].shape == (3, 1)
    assert result["output_log_probs"].shape == (3, 1, OUTPUT_LEN)
    text = ensemble(served, PROMPTS, bad_words=" the, a", stop_words=".", **options)
    for row, prompt in enumerate(PROMPTS):  # the ensemble routes the same inputs: the same tokens
        prompt_len = len(tokenizer(prompt).input_ids)
        assert served_tokens(text, row, prompt_len) == served_tokens(result, row, prompt_len)


# -- dynamic batching: per-request parameters never leak ---------------------------------------------------------
# The same inputs in every request (Triton's dynamic batcher only batches requests carrying the same set of
# inputs), with different values: greedy, sampled, beam search, penalties, word lists, lengths.
MIXED = [
    dict(prompts=PROMPTS[:1], output_len=6, top_k=1, seed=0, beam_width=1, repetition_penalty=1.0,
         bad_words="", stop_words=""),
    dict(prompts=PROMPTS[1:], output_len=9, top_k=5, seed=11, beam_width=1, repetition_penalty=1.0,
         bad_words="", stop_words=""),
    dict(prompts=PROMPTS[2:], output_len=7, top_k=1, seed=0, beam_width=2, repetition_penalty=1.0,
         bad_words="", stop_words=""),
    dict(prompts=PROMPTS[:2], output_len=5, top_k=1, seed=0, beam_width=1, repetition_penalty=2.0,
         bad_words=" the", stop_words=""),
    dict(prompts=PROMPTS[1:2], output_len=8, top_k=40, seed=5, beam_width=1, repetition_penalty=1.0,
         bad_words="", stop_words="."),
    dict(prompts=["A"], output_len=4, top_k=1, seed=0, beam_width=MAX_BEAM_WIDTH, repetition_penalty=1.3,
         bad_words=" B", stop_words=""),
]


def _stats(served, model: str) -> tuple[int, int]:
    import tritonclient.http as http

    with http.InferenceServerClient(served.http_url) as client:
        stats = client.get_inference_statistics(model)["model_stats"][0]
    return int(stats["inference_count"]), int(stats["execution_count"])


def _send_ensemble(served, spec):
    spec = dict(spec)
    return ensemble(served, spec.pop("prompts"), spec.pop("output_len"), **spec)


@pytest.mark.triton
def test_concurrent_mixed_requests_equal_each_alone(served):
    alone = [_send_ensemble(served, spec) for spec in MIXED]
    before = _stats(served, MODEL)
    with concurrent.futures.ThreadPoolExecutor(len(MIXED)) as pool:
        together = list(pool.map(lambda spec: _send_ensemble(served, spec), MIXED))
    inferences, executions = (after - start for after, start in zip(_stats(served, MODEL), before))
    assert inferences == sum(len(spec["prompts"]) for spec in MIXED)
    # The requests really shared batches (QUEUE_DELAY_US lets them gather), so a leak would show.
    assert executions < len(MIXED), f"{executions} executions for {len(MIXED)} requests: no dynamic batch formed"
    for spec, one, shared in zip(MIXED, alone, together):
        for name in ("OUTPUT_0", "output_ids", "sequence_length"):
            np.testing.assert_array_equal(shared[name], one[name], err_msg=f"{name} of {spec}")
        np.testing.assert_allclose(shared["output_log_probs"], one["output_log_probs"], atol=1e-5)
    assert QUEUE_DELAY_US > 0
