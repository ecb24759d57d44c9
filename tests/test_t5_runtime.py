"""The python runtime for FT T5 shards (templates/ft_python/ft_t5.py) against HF transformers' T5.

Two tiny seeded T5ForConditionalGeneration models: original T5 (ReLU MLP, tied embeddings, decoder output scaled by
d_model**-0.5) and T5 v1.1 style (gated GELU, untied lm_head, no scaling). Each is converted to FT's T5 shard layout
at TP 1 and 2 by the project's converter (exporter.ft.convert) and run by ft_t5.FTT5 on the CPU. References come from HF: encoder outputs and teacher-forced logits
(within 1e-4), generate() for greedy and beam search (num_beams, length_penalty, early_stopping=True, as
ft_generate documents) on a batch of prompts of different lengths.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import threading
import types

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from exporter.ft.convert import convert_checkpoint  # noqa: E402
from exporter.parallel import ParallelLayout  # noqa: E402
from exporter.runtimes import python as python_runtime  # noqa: E402
from exporter.triton.repo import copy_templates  # noqa: E402
from templates.ft_python import ft_generate, ft_t5  # noqa: E402

VOCAB, EOS, PAD, START = 96, 1, 0, 0
# Encoder prompts of different lengths (right-padded in a batch).
PROMPTS = [[5, 17, 42, 8, 63, 21, 1], [33, 9, 1], [70, 12, 55, 4, 90, 1], [2, 1]]
# The seeds and scales make each model's outputs depend on its prompt, and some rows end with eos (a
# random tied T5 otherwise repeats one token: its embedding dominates the decoder output).
VARIANTS = {"relu": {"feed_forward_proj": "relu", "tie_word_embeddings": True, "seed": 1, "embedding_scale": 0.2},
            "gated-gelu": {"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False, "seed": 0}}


def build_hf_t5(directory, feed_forward_proj, tie_word_embeddings, seed, embedding_scale=1.0, eos_boost=2.0):
    """A tiny seeded T5ForConditionalGeneration saved in `directory`; untied: its own random lm_head.weight and
    config.json tie_word_embeddings false, as T5 v1.1 / Flan-T5 checkpoints (transformers 5 ties lm_head when it
    builds a T5, and keeps a saved lm_head that differs from shared). embedding_scale scales the shared
    embedding, eos_boost the output row of eos. Returns the model as HF loads it back (the reference)."""
    from safetensors.torch import load_file, save_file
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2, num_decoder_layers=2,
                      relative_attention_num_buckets=8, relative_attention_max_distance=16,
                      feed_forward_proj=feed_forward_proj, decoder_start_token_id=START, eos_token_id=EOS,
                      pad_token_id=PAD, dropout_rate=0.0)
    model = T5ForConditionalGeneration(config).eval()
    lm_head = torch.randn(VOCAB, 32)
    with torch.no_grad():
        model.shared.weight.mul_(embedding_scale)
        (model.shared.weight if tie_word_embeddings else lm_head)[EOS] *= eos_boost
    model.save_pretrained(directory)
    if not tie_word_embeddings:
        weights = load_file(directory / "model.safetensors")
        weights["lm_head.weight"] = lm_head
        save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
        saved = json.loads((directory / "config.json").read_text())
        saved.pop("scale_decoder_outputs", None)
        saved["tie_word_embeddings"] = False
        (directory / "config.json").write_text(json.dumps(saved, indent=2))
    reference = T5ForConditionalGeneration.from_pretrained(directory).eval()
    assert reference.config.scale_decoder_outputs == tie_word_embeddings
    assert torch.equal(reference.lm_head.weight, model.shared.weight if tie_word_embeddings else lm_head)
    return reference


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5_hf")
    return {name: root / name for name in VARIANTS}


@pytest.fixture(scope="module")
def hf_models(checkpoints):
    return {name: build_hf_t5(checkpoints[name], **kwargs) for name, kwargs in VARIANTS.items()}


@pytest.fixture(scope="module")
def shard_dirs(hf_models, checkpoints, tmp_path_factory):
    """(variant, tp) -> the project converter's fp32 shards of that variant at that TP."""
    root = tmp_path_factory.mktemp("t5_shards")
    return {(name, tp): convert_checkpoint(checkpoints[name], root / f"{name}-{tp}", ParallelLayout(tp), "fp32")
            for name in hf_models for tp in (1, 2)}


@pytest.fixture(scope="module")
def runtimes(shard_dirs):
    """(variant, tp) -> FTT5 loaded from those shards."""
    return {key: ft_t5.FTT5.from_shards(directory) for key, directory in shard_dirs.items()}


CASES = [(name, tp) for name in VARIANTS for tp in (1, 2)]


def _batch(prompts=PROMPTS):
    lengths = torch.tensor([len(p) for p in prompts])
    ids = torch.full((len(prompts), int(lengths.max())), PAD, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, :len(prompt)] = torch.tensor(prompt)
    mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
    return ids, lengths, mask


@pytest.mark.parametrize("variant,tp", CASES)
def test_encoder_outputs_and_logits_match_hf(hf_models, runtimes, variant, tp):
    hf, model = hf_models[variant], runtimes[(variant, tp)]
    ids, lengths, mask = _batch()
    decoder_ids = torch.tensor([[START, 7, 30, 2, 64, 11]] * len(PROMPTS))
    with torch.no_grad():
        reference = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids)
    encoded = model.encode(ids, lengths)
    valid = mask.bool()
    assert torch.allclose(encoded[valid], reference.encoder_last_hidden_state[valid], atol=1e-4, rtol=0)
    logits = model.bind(ids, lengths).forward_logits(decoder_ids)
    assert logits.shape == reference.logits.shape
    assert torch.allclose(logits, reference.logits, atol=1e-4, rtol=0), (logits - reference.logits).abs().max()


def _hf_generate(hf, new, **kwargs):
    ids, _, mask = _batch()
    with torch.no_grad():
        return hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, **kwargs)


def _hf_rows(sequences):
    """HF's sequences [B, 1 + T] (start token first, pad after eos) -> generated tokens per row, eos included."""
    rows = []
    for row in sequences[:, 1:].tolist():
        rows.append(row[:row.index(EOS) + 1] if EOS in row else row)
    return rows


def _ours(output, beam=0):
    ids, lengths = output.output_ids[:, beam], output.sequence_length[:, beam]
    return [ids[row, :int(lengths[row])].tolist() for row in range(ids.shape[0])]


@pytest.mark.parametrize("variant,tp", CASES)
def test_greedy_matches_hf_generate(hf_models, runtimes, variant, tp):
    new = 12
    expected = _hf_rows(_hf_generate(hf_models[variant], new))
    ids, lengths, _ = _batch()
    output = ft_t5.generate_t5(runtimes[(variant, tp)], ids, lengths, new)
    assert output.output_ids.shape == (len(PROMPTS), 1, new)
    assert _ours(output) == expected
    # FT's T5 layout: generated tokens only, end_id after a row's sequence_length
    for row, tokens in enumerate(expected):
        assert output.output_ids[row, 0, len(tokens):].eq(EOS).all()


@pytest.mark.parametrize("variant,tp", CASES)
@pytest.mark.parametrize("beams,length_penalty", [(2, 1.0), (3, 0.6)])
def test_beam_search_matches_hf_generate(hf_models, runtimes, variant, tp, beams, length_penalty):
    new = 10
    expected = _hf_rows(_hf_generate(hf_models[variant], new, num_beams=beams, length_penalty=length_penalty,
                                     early_stopping=True))
    ids, lengths, _ = _batch()
    params = ft_generate.SamplingParams(beam_width=beams, len_penalty=length_penalty)
    output = ft_t5.generate_t5(runtimes[(variant, tp)], ids, lengths, new, params)
    assert output.output_ids.shape == (len(PROMPTS), beams, new)
    assert _ours(output) == expected


def test_seeded_sampling_is_reproducible(runtimes):
    model = runtimes[("gated-gelu", 2)]
    ids, lengths, _ = _batch()

    def sample(seeds):
        params = ft_generate.SamplingParams(top_k=20, top_p=0.9, temperature=1.5, random_seed=seeds)
        return ft_t5.generate_t5(model, ids, lengths, 8, params)

    first, again = sample([1, 2, 3, 4]), sample([1, 2, 3, 4])
    assert torch.equal(first.output_ids, again.output_ids)
    assert torch.equal(first.sequence_length, again.sequence_length)
    other = sample([11, 12, 13, 14])
    assert not torch.equal(first.output_ids, other.output_ids)
    # a row's sample depends on its own seed only: row 0 alone gives the same tokens
    params = ft_generate.SamplingParams(top_k=20, top_p=0.9, temperature=1.5, random_seed=[1])
    alone = ft_t5.generate_t5(model, ids[:1, :int(lengths[0])], lengths[:1], 8, params)
    assert torch.equal(alone.output_ids[0], first.output_ids[0])


def test_t5_output_drops_the_start_token():
    """FT's T5Decoding returns the generated tokens without the decoder start token, and a sequence_length that
    does not count it; ft_generate's output (prompt = [start]) is converted to that."""
    gpt_layout = ft_generate.GenerationOutput(
        output_ids=torch.tensor([[[0, 5, 6, 1, 1]], [[0, 7, 8, 9, 4]]]),
        sequence_length=torch.tensor([[4], [5]]),
        cum_log_probs=torch.tensor([[-1.0], [-2.0]]),
        output_log_probs=torch.zeros(2, 1, 4))
    t5 = ft_t5.t5_output(gpt_layout)
    assert t5.output_ids.tolist() == [[[5, 6, 1, 1]], [[7, 8, 9, 4]]]
    assert t5.sequence_length.tolist() == [[3], [4]]
    assert t5.output_log_probs.shape == (2, 1, 4)


def test_start_id_per_row_is_the_decoder_prompt(hf_models, runtimes):
    """start_id replaces config.ini's decoder_start_token_id as a row's first decoder token, as HF's
    decoder_start_token_id."""
    hf, model = hf_models["relu"], runtimes[("relu", 1)]
    ids, lengths, mask = _batch()
    with torch.no_grad():
        reference = _hf_rows(hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                         decoder_start_token_id=9))
    output = ft_t5.generate_t5(model, ids, lengths, 6, ft_generate.SamplingParams(start_id=9))
    assert _ours(output) == reference


def test_a_cache_for_other_rows_is_refused(runtimes):
    ids, lengths, _ = _batch()
    decoder = runtimes[("relu", 1)].bind(ids, lengths)
    with pytest.raises(ValueError, match="bound to 4 encoder rows"):
        decoder.new_cache(3, 5)


def test_bad_words_match_hf_generate(hf_models, runtimes):
    """ft_generate's word lists work unchanged on the T5 decoder: greedy with a banned token equals HF's
    bad_words_ids."""
    hf, model = hf_models["gated-gelu"], runtimes[("gated-gelu", 1)]
    banned = [[61], [5, 32]]
    expected = _hf_rows(_hf_generate(hf, 8, bad_words_ids=banned))
    ids, lengths, _ = _batch()
    output = ft_t5.generate_t5(model, ids, lengths, 8, ft_generate.SamplingParams(bad_words_list=[tuple(
        tuple(word) for word in banned)] * len(PROMPTS)))
    assert _ours(output) == expected
    assert expected != _hf_rows(_hf_generate(hf, 8))  # the ban changed something


def test_streaming_and_batched_requests(runtimes):
    """The stream sees FT's T5 layout growing one step at a time and ends with the final result; two requests
    batched together (T5Batch.concatenate) give each its result alone."""
    model = runtimes[("relu", 2)]
    ids, lengths, _ = _batch()
    seen = []
    final = ft_t5.generate_t5(model, ids, lengths, 6, stream=lambda out: seen.append(out))
    assert [out.output_ids.shape[-1] for out in seen] == list(range(1, len(seen) + 1))
    assert torch.equal(seen[-1].sequence_length, final.sequence_length)
    first = ft_t5.check_t5_inputs(model, ids[:2, :int(lengths[:2].max())], lengths[:2], 6)
    second = ft_t5.check_t5_inputs(model, ids[2:], lengths[2:], 6, ft_generate.SamplingParams(beam_width=2))
    merged = ft_t5.generate_batch(model, ft_t5.T5Batch.concatenate([first, second]))
    alone = ft_t5.generate_t5(model, ids[2:], lengths[2:], 6, ft_generate.SamplingParams(beam_width=2))
    assert torch.equal(merged.output_ids[:2, 0], final.output_ids[:2, 0])
    assert torch.equal(merged.output_ids[2:], alone.output_ids)
    assert torch.equal(merged.sequence_length[2:], alone.sequence_length)


def test_bad_encoder_inputs_are_refused(runtimes):
    model = runtimes[("relu", 1)]
    with pytest.raises(ValueError, match=r"outside \[0, 96\)"):
        ft_t5.check_t5_inputs(model, [[5, 200]], [2], 4)
    with pytest.raises(ValueError, match="sequence_length"):
        ft_t5.check_t5_inputs(model, [[5, 6]], [3], 4)
    with pytest.raises(ValueError, match="start_id"):
        ft_t5.check_t5_inputs(model, [[5, 6]], [2], 4, ft_generate.SamplingParams(start_id=500))


# ---------------------------------------------------------------- model_t5.py, the Triton python-backend model
T5_MODEL_FILES = (python_runtime.T5_MODEL, *python_runtime.T5_FILES)  # as the python runtime installs them
FINAL = 1  # TRITONSERVER_RESPONSE_COMPLETE_FINAL


class _Tensor:
    def __init__(self, name, array):
        self._name, self._array = name, np.asarray(array)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array


class _Response:
    def __init__(self, output_tensors=None, error=None):
        self.output_tensors, self.error = output_tensors or [], error

    def output(self, name):
        return next(t.as_numpy() for t in self.output_tensors if t.name() == name)


class _Error(Exception):
    def message(self):
        return str(self)


def _stand_in_pb_utils():
    """The parts of triton_python_backend_utils that model_t5.py uses (no server: the python model in process)."""
    module = types.ModuleType("triton_python_backend_utils")
    module.Tensor, module.InferenceResponse, module.TritonError = _Tensor, _Response, _Error
    module.get_input_tensor_by_name = lambda request, name: request.get(name)
    module.TRITONSERVER_RESPONSE_COMPLETE_FINAL = FINAL
    return module


class _Sender:
    def __init__(self):
        self.sent, self.closed = [], threading.Event()

    def send(self, response=None, flags=0):
        self.sent.append((response, flags))
        if flags & FINAL:
            self.closed.set()


class _Request(dict):
    """A request: its input tensors by name, and its response sender."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sender = _Sender()

    def get_response_sender(self):
        return self.sender


def _execute(served, requests, timeout=120):
    """served.execute(requests) as Triton runs it: None returned, each request closed by its final response."""
    assert served.execute(requests) is None
    for request in requests:
        assert request.sender.closed.wait(timeout), "no final response"
    return [request.sender.sent[-1][0] for request in requests]


def _t5_request(prompts, max_output_len, **optional):
    ids, lengths, _ = _batch(prompts)
    request = {"input_ids": _Tensor("input_ids", ids.numpy().astype(np.uint32)),
               "sequence_length": _Tensor("sequence_length", lengths.numpy().astype(np.uint32)[:, None]),
               "max_output_len": _Tensor("max_output_len", np.asarray(max_output_len, np.uint32)[:, None])}
    for name, (value, dtype) in optional.items():
        request[name] = _Tensor(name, np.asarray(value, dtype).reshape(len(prompts), 1))
    return _Request(request)


def _load_model_t5(shard_dir, tmp_path, monkeypatch, decoupled=False):
    """model_t5.py imported from a model directory laid out as Triton sees it, and initialized."""
    version_dir = tmp_path / "t5" / "1"
    copy_templates(T5_MODEL_FILES, version_dir)
    shutil.copytree(shard_dir, version_dir / "2-gpu")
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _stand_in_pb_utils())
    for name in ("ft_checkpoint", "ft_generate", "ft_interface", "ft_t5", "ft_t5_checkpoint", "ft_t5_interface"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))
    spec = importlib.util.spec_from_file_location("ft_python_model_t5", version_dir / "model_t5.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    served = module.TritonPythonModel()
    parameters = {"model_checkpoint_path": "2-gpu", "tensor_para_size": "2", "data_type": "fp32", "device": "cpu"}
    config = {"name": "t5", "parameters": {key: {"string_value": value} for key, value in parameters.items()}}
    if decoupled:
        config["model_transaction_policy"] = {"decoupled": True}
    served.initialize({"model_config": json.dumps(config), "model_instance_kind": "CPU"})
    return served


def test_model_t5_serves_batched_requests_in_ft_t5_layout(shard_dirs, hf_models, tmp_path, monkeypatch):
    """model_t5.py (as Triton loads it from a model directory) batches requests, answers each in FT's T5 layout
    (INT32, [B, beam, max_output_len], generated tokens only) equal to HF generate, and fails bad requests alone."""
    served = _load_model_t5(shard_dirs[("gated-gelu", 2)], tmp_path, monkeypatch)
    requests = [_t5_request(PROMPTS[:2], [8, 5]),
                _t5_request(PROMPTS[:1], [0]),                                        # no output: refused
                _t5_request(PROMPTS[2:], [7, 7], beam_width=([2, 2], np.uint32)),
                _t5_request(PROMPTS[:1], [3], ia3_tasks=([0], np.int32))]             # not served: refused
    responses = _execute(served, requests)
    served.finalize()
    assert responses[1].error is not None and "request_output_len" in responses[1].error.message()
    assert responses[3].error is not None and "ia3_tasks" in responses[3].error.message()
    hf = hf_models["gated-gelu"]
    greedy = _hf_rows(_hf_generate(hf, 8))[:2]
    beams = _hf_rows(_hf_generate(hf, 7, num_beams=2, length_penalty=0.0, early_stopping=True))[2:]
    greedy[1] = greedy[1][:5]  # that row's max_output_len
    for response, expected, shape in ((responses[0], greedy, (2, 1, 8)), (responses[2], beams, (2, 2, 7))):
        assert response.error is None
        output_ids, lengths = response.output("output_ids"), response.output("sequence_length")
        assert output_ids.dtype == np.int32 and lengths.dtype == np.int32 and output_ids.shape == shape
        assert response.output("output_log_probs").shape == shape
        assert response.output("cum_log_probs").shape == shape[:2]
        assert [output_ids[row, 0, :lengths[row, 0]].tolist() for row in range(2)] == expected


def test_model_t5_decoupled_streams_each_step_then_the_final_result(shard_dirs, tmp_path, monkeypatch):
    served = _load_model_t5(shard_dirs[("gated-gelu", 2)], tmp_path, monkeypatch, decoupled=True)
    request = _t5_request(PROMPTS[:2], [4, 4])
    _execute(served, [request])
    served.finalize()
    sender = request.sender
    widths = [response.output("output_ids").shape[-1] for response, _ in sender.sent]
    assert widths == [1, 2, 3, 4, 4]  # one response per step, then the final one
    assert [flags for _, flags in sender.sent] == [0, 0, 0, 0, 1]
    final = sender.sent[-1][0]
    assert np.array_equal(final.output("output_ids")[:, :, :3], sender.sent[2][0].output("output_ids"))
    assert [response.output("is_final").all() for response, _ in sender.sent] == [False] * 4 + [True]
    assert not any(response.output("prompt_lengths").any() for response, _ in sender.sent)


def test_model_t5_serves_requests_in_flight(shard_dirs, hf_models, tmp_path, monkeypatch):
    """model_t5.py schedules through ft_scheduler as GPT's model.py does: a short request sent while a long one
    decodes is admitted beside it and answered as soon as it finishes, before the long one; each equals HF generate
    alone (each request's decoder is bound to its own encoder output)."""
    served = _load_model_t5(shard_dirs[("gated-gelu", 2)], tmp_path, monkeypatch)
    hf = hf_models["gated-gelu"]
    long_expected, short_expected = _hf_rows(_hf_generate(hf, 12))[0], _hf_rows(_hf_generate(hf, 3))[2]
    assert len(long_expected) > 3, "the long request must outlast the short one for the order to mean anything"
    long, short = _t5_request(PROMPTS[:1], [12]), _t5_request(PROMPTS[2:3], [3])
    closed = []
    for request in (long, short):
        send = request.sender.send
        request.sender.send = lambda response=None, flags=0, send=send, request=request: (
            closed.append(request) if flags & FINAL else None, send(response, flags))
    assert served.execute([long]) is None
    assert served.execute([short]) is None
    for request in (long, short):
        assert request.sender.closed.wait(120), "no final response"
    served.finalize()
    assert closed == [short, long]
    for request, expected in ((long, long_expected), (short, short_expected)):
        response = request.sender.sent[-1][0]
        assert response.error is None
        lengths = response.output("sequence_length")
        assert response.output("output_ids")[0, 0, :lengths[0, 0]].tolist() == expected
