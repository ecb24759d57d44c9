"""The checkpoint's generation_config.json, served as HF's `generate` applies it (HF transformers the reference).

A tiny seeded Llama gets a generation_config.json with three eos ids, chosen from HF's own greedy continuations so
that each prompt's continuation ends at a different one (and config.json names only the first, as Llama-3's does).
HF's `generate`, which reads that file itself, is the reference: the python runtime must stop each row exactly where
HF stops, with HF's repetition penalty from the file, in process and through a real tritonserver. A copy with
sampling defaults (do_sample, top_k, temperature) checks that the defaults apply to the options a request leaves
unset, and not to those it sets.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import generate, right_padded  # noqa: E402
from exporter.ft.convert import convert_checkpoint  # noqa: E402
from exporter.generation import generation_settings  # noqa: E402
from exporter.parallel import ParallelLayout  # noqa: E402
from family_fixtures import build_llama  # noqa: E402
from templates.ft_python import ft_checkpoint  # noqa: E402
from templates.ft_python.ft_checkpoint import CheckpointError  # noqa: E402
from templates.ft_python.ft_generate import GenerationDefaults  # noqa: E402
from templates.ft_python.ft_gpt import FTGPT  # noqa: E402

PROMPTS = ["The quick brown fox", "Thank you for", "Q: Are you going for lunch?"]
NEW_TOKENS = 12
STOP_AT = (3, 6, 1)  # the greedy step at which prompt i's continuation emits eos id i
# Below 1 (favours tokens already seen): the random tiny model rarely repeats a token, so a penalty above 1 never
# changes its greedy choice; this one does (the test checks that it does).
REPETITION_PENALTY = 0.5
SAMPLING = {"do_sample": True, "top_k": 2, "temperature": 0.5}  # the sampling copy's defaults


def _tokenizer(directory):
    return transformers.GPT2TokenizerFast.from_pretrained(str(directory))


def _hf(directory):
    return transformers.AutoModelForCausalLM.from_pretrained(str(directory)).float().eval()


def _hf_generate(model, ids, **kwargs):
    """HF's generate on one prompt with the model's generation_config.json (kwargs override it) -> new ids,
    cut after the first eos of the set generate used (it pads finished rows)."""
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=NEW_TOKENS, **kwargs)
    new = out[0, len(ids):].tolist()
    eos = kwargs.get("eos_token_id", model.generation_config.eos_token_id)
    eos = set(eos if isinstance(eos, list) else [eos])
    ends = [step for step, token in enumerate(new) if token in eos]
    return new[: ends[0] + 1] if ends else new


def _write_json(path: Path, values: dict) -> None:
    path.write_text(json.dumps(values, indent=2))


@pytest.fixture(scope="module")
def multi_eos(tmp_path_factory):
    """(checkpoint, eos ids, prompt ids): a tiny Llama whose generation_config.json has 3 eos ids and a repetition
    penalty, the eos ids chosen so that HF's greedy continuation of prompt i ends at eos i, at step STOP_AT[i]."""
    directory = build_llama(tmp_path_factory.mktemp("multi-eos") / "llama")
    prompts = [_tokenizer(directory)(text).input_ids for text in PROMPTS]
    generation = {"do_sample": False, "temperature": 0.5, "repetition_penalty": REPETITION_PENALTY}
    _write_json(directory / "generation_config.json", generation)
    model = _hf(directory)
    continuations = [_hf_generate(model, ids, eos_token_id=None) for ids in prompts]
    eos = [continuation[step] for continuation, step in zip(continuations, STOP_AT)]
    for continuation, step, token in zip(continuations, STOP_AT, eos):
        earlier = set(continuation[:step]) & set(eos)
        assert len(continuation) == NEW_TOKENS and not earlier, "pick other STOP_AT steps for this seed"
    _write_json(directory / "generation_config.json", {**generation, "eos_token_id": eos})
    config = json.loads((directory / "config.json").read_text())
    _write_json(directory / "config.json", {**config, "eos_token_id": eos[0]})  # as Llama-3: the first only
    return directory, eos, prompts


@pytest.fixture(scope="module")
def multi_eos_shards(multi_eos, tmp_path_factory):
    return convert_checkpoint(multi_eos[0], tmp_path_factory.mktemp("multi-eos-shards"), ParallelLayout(1, 1))


@pytest.fixture(scope="module")
def sampling(multi_eos, tmp_path_factory):
    """(checkpoint, shards): the multi-eos checkpoint with sampling defaults instead of the repetition penalty."""
    directory = tmp_path_factory.mktemp("sampling") / "llama"
    shutil.copytree(multi_eos[0], directory)
    _write_json(directory / "generation_config.json", {**SAMPLING, "eos_token_id": multi_eos[1]})
    return directory, convert_checkpoint(directory, tmp_path_factory.mktemp("sampling-shards"), ParallelLayout(1, 1))


def _served(shard_dir, prompts, **options):
    """The python runtime's generation (its model and its generation_config.json, as model.py loads them)."""
    model = FTGPT.from_shards(shard_dir)
    ids, lengths = right_padded(prompts, ft_checkpoint.FTConfig.from_ini(shard_dir / "config.ini").end_id)
    out = generate(model, ids, lengths, [NEW_TOKENS] * len(prompts), defaults=GenerationDefaults.read(shard_dir),
                   **options)
    return [out.output_ids[row, 0, len(prompt): int(out.sequence_length[row, 0])].tolist()
            for row, prompt in enumerate(prompts)], out


# -- the export --------------------------------------------------------------------------------------------------
def test_export_keeps_every_eos_id_and_fts_end_id_is_the_first(multi_eos, multi_eos_shards):
    _, eos, _ = multi_eos
    assert ft_checkpoint.FTConfig.from_ini(multi_eos_shards / "config.ini").end_id == eos[0]
    written = json.loads((multi_eos_shards / "generation_config.json").read_text())
    assert written == {"eos_token_id": eos, "do_sample": False, "temperature": 0.5,
                       "repetition_penalty": REPETITION_PENALTY}


def test_eos_list_of_config_json_is_the_set_without_generation_config(tmp_path):
    """config.json's eos_token_id may be a list (Llama-3.1): the whole list ends generation, as transformers reads
    it; an architecture that took only the first id used to lose the rest."""
    _write_json(tmp_path / "config.json", {"eos_token_id": [7, 3, 7, 9]})
    assert generation_settings(tmp_path, end_id=0, vocab_size=10) == {"eos_token_id": [7, 3, 9]}
    _write_json(tmp_path / "config.json", {})
    assert generation_settings(tmp_path, end_id=4, vocab_size=10) == {"eos_token_id": [4]}


@pytest.mark.parametrize("values, named", [
    ({"eos_token_id": [1, 50257]}, "eos_token_id"),
    ({"eos_token_id": []}, "eos_token_id"),
    ({"top_p": 1.5}, "top_p"),
    ({"temperature": 0}, "temperature"),
    ({"top_k": -1}, "top_k"),
    ({"do_sample": "yes"}, "do_sample"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_length": 2.5}, "max_length"),
])
def test_bad_generation_config_is_refused_before_anything_is_written(multi_eos, tmp_path, values, named):
    directory = tmp_path / "llama"
    shutil.copytree(multi_eos[0], directory)
    _write_json(directory / "generation_config.json", values)
    with pytest.raises(CheckpointError, match=f"generation_config.json.*{named}"):
        convert_checkpoint(directory, tmp_path / "out", ParallelLayout(1, 1))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# -- the eos set, in process -------------------------------------------------------------------------------------
def test_generation_stops_at_each_eos_id_where_hf_stops(multi_eos, multi_eos_shards):
    """Regression: generation_config.json was never read, so generation ran on past every eos id but config.json's
    first (and ignored the file's repetition penalty). Each row now stops at its own eos id, where HF stops."""
    checkpoint, eos, prompts = multi_eos
    hf = _hf(checkpoint)
    expected = [_hf_generate(hf, ids) for ids in prompts]
    assert [row[-1] for row in expected] == eos and [len(row) for row in expected] == [s + 1 for s in STOP_AT]
    # The file's repetition penalty changes HF's greedy tokens for these prompts: the served ones must follow it.
    assert expected != [_hf_generate(hf, ids, repetition_penalty=1.0)[: len(row)]
                        for ids, row in zip(prompts, expected)]
    served, out = _served(multi_eos_shards, prompts)
    assert served == expected
    # Greedy log-probs are HF's processed scores (repetition penalty, no temperature: do_sample is false).
    for row, ids in enumerate(prompts):
        with torch.inference_mode():
            scores = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=NEW_TOKENS, output_scores=True, return_dict_in_generate=True).scores
        want = [torch.log_softmax(score[0].float(), -1)[token].item() for score, token in zip(scores, served[row])]
        np.testing.assert_allclose(out.output_log_probs[row, 0, : len(want)].numpy(), want, atol=1e-4)


def test_a_requests_end_id_replaces_the_eos_set(multi_eos, multi_eos_shards):
    """end_id sent with a request ends its rows alone, as HF's generate(eos_token_id=...) overrides the file."""
    checkpoint, eos, prompts = multi_eos
    hf = _hf(checkpoint)
    served, _ = _served(multi_eos_shards, prompts, end_id=eos[2])
    assert served == [_hf_generate(hf, ids, eos_token_id=eos[2]) for ids in prompts]
    assert len(served[0]) > STOP_AT[0] + 1  # ran past its own eos id


def _hf_beams(hf, ids, width, **kwargs):
    with torch.inference_mode():
        return hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=width, num_return_sequences=width,
                           length_penalty=1.0, early_stopping=True, **kwargs)[:, len(ids):].tolist()


def test_beams_end_at_any_eos_id_as_hfs_beam_search(multi_eos, tmp_path):
    """Beam search finishes a hypothesis at any eos id of the file, as HF's does. The eos ids (besides the first)
    are tokens of HF's own beams for two prompts, so hypotheses end at an eos id config.ini does not name."""
    checkpoint, eos, prompts = multi_eos
    directory, width = tmp_path / "llama", 2
    shutil.copytree(checkpoint, directory)
    _write_json(directory / "generation_config.json", {"eos_token_id": [eos[0]]})
    hf = _hf(directory)
    free = [_hf_beams(hf, ids, width, eos_token_id=None) for ids in prompts[1:]]
    beam_eos = [eos[0], free[0][0][2], free[1][1][4]]
    _write_json(directory / "generation_config.json", {"eos_token_id": beam_eos})
    hf = _hf(directory)
    shards = convert_checkpoint(directory, tmp_path / "out", ParallelLayout(1, 1))
    _, out = _served(shards, prompts, beam_width=width, len_penalty=1.0)
    endings = set()
    for row, ids in enumerate(prompts):
        for beam, tokens in enumerate(_hf_beams(hf, ids, width)):
            ends = [step for step, token in enumerate(tokens) if token in beam_eos]
            tokens = tokens[: ends[0] + 1] if ends else tokens
            endings |= {tokens[-1]} & set(beam_eos)
            length = int(out.sequence_length[row, beam])
            assert out.output_ids[row, beam, len(ids): length].tolist() == tokens, (row, beam)
    assert endings - {beam_eos[0]}  # some hypotheses ended at an eos id config.ini's end_id is not


# -- sampling defaults, in process -------------------------------------------------------------------------------
def _teacher_forced_logits(hf, prompt, generated):
    """HF's next-token logits [len(generated), V] for each generated position of prompt + generated."""
    with torch.inference_mode():
        logits = hf(torch.tensor([prompt + generated])).logits[0].float()
    return logits[len(prompt) - 1: len(prompt) - 1 + len(generated)]


def test_sampling_defaults_apply_to_options_a_request_leaves_unset(multi_eos, sampling):
    """Regression: do_sample/top_k/temperature of generation_config.json were ignored (greedy, temperature 1).
    Unset, every token is one of HF's 2 best (top_k 2), its log-prob is HF's at temperature 0.5, and some rows
    sample below the best."""
    checkpoint, shards = sampling
    prompt = multi_eos[2][0]
    hf = _hf(checkpoint)
    seeds = list(range(8))
    served, out = _served(shards, [prompt] * len(seeds), random_seed=seeds)
    below_best = 0
    for row, tokens in enumerate(served):
        logits = _teacher_forced_logits(hf, prompt, tokens)
        top2 = logits.topk(2, dim=-1).indices
        assert all(token in top2[step].tolist() for step, token in enumerate(tokens))
        below_best += sum(token != top2[step, 0].item() for step, token in enumerate(tokens))
        want = torch.log_softmax(logits / SAMPLING["temperature"], -1)[torch.arange(len(tokens)), tokens]
        np.testing.assert_allclose(out.output_log_probs[row, 0, : len(tokens)].numpy(), want.numpy(), atol=1e-4)
    assert below_best > 0


def test_options_a_request_sets_override_the_sampling_defaults(multi_eos, sampling):
    """top_k 1 and temperature 1 sent: greedy, as HF's generate(do_sample=False), log-probs at temperature 1."""
    checkpoint, shards = sampling
    prompts = multi_eos[2]
    hf = _hf(checkpoint)
    served, out = _served(shards, prompts, top_k=1, temperature=1.0)
    assert served == [_hf_generate(hf, ids, do_sample=False) for ids in prompts]
    for row, (prompt, tokens) in enumerate(zip(prompts, served)):
        want = torch.log_softmax(_teacher_forced_logits(hf, prompt, tokens), -1)[torch.arange(len(tokens)), tokens]
        np.testing.assert_allclose(out.output_log_probs[row, 0, : len(tokens)].numpy(), want.numpy(), atol=1e-4)


# -- the output length of a request that sends none, in process ------------------------------------------------
# generation_config.json (and config.json's max_position_embeddings) -> what HF's generate(**tok(prompt)) allows.
OUTPUT_LENGTH_CASES = {  # name -> (generation_config.json, config.json changes, whether the prompt's length counts)
    "max_new_tokens": ({"max_new_tokens": 5}, {}, False),
    "max_new_tokens wins over max_length": ({"max_new_tokens": 5, "max_length": 9}, {}, False),
    "max_length counts the prompt": ({"max_length": 9}, {}, True),
    "neither: HF's 20 new tokens": ({}, {}, False),
    "neither: 20 new tokens within the context": ({}, {"max_position_embeddings": 24}, True),
}


def _length_checkpoint(multi_eos, directory: Path, generation: dict, config_change: dict) -> Path:
    """A copy of the multi-eos checkpoint with `generation` as its generation_config.json (no eos id, so HF's
    generate runs to its length limit) and `config_change` in config.json."""
    shutil.copytree(multi_eos[0], directory)
    _write_json(directory / "generation_config.json", generation)
    config = json.loads((directory / "config.json").read_text())
    _write_json(directory / "config.json", {**config, **config_change})
    return directory


def _exported_preprocessing(checkpoint: Path, tmp_path: Path, monkeypatch):
    """The exported repository's preprocessing model, in process, with the parameters its config.pbtxt got."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from exporter.runtimes import ModelSettings
    from exporter.stages.export import build_repository
    from test_text_parity import _load_text_model

    settings = ModelSettings(name="llama", runtime="python", max_batch_size=4, layout=ParallelLayout(1, 1),
                             data_type="fp32", device="cpu")
    repository = build_repository(tmp_path / "repo", checkpoint, settings, "fp32")
    config = text_format.Parse((repository / "preprocessing" / "config.pbtxt").read_text(),
                               model_config_pb2.ModelConfig())
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    tokenizer_json = repository / "preprocessing" / "1" / "tokenizer" / "tokenizer.json"
    return _load_text_model("preprocessing", tokenizer_json, tmp_path / "loaded", monkeypatch, **parameters)


def _preprocess_without_length(model, prompts):
    """preprocessing's (REQUEST_OUTPUT_LEN [B] filled in, error or None) for a request that sends QUERY alone."""
    from test_runtime_inprocess import _FakeTensor

    query = _FakeTensor("QUERY", np.array([[prompt.encode()] for prompt in prompts], dtype=object))
    (response,) = model.execute([{"QUERY": query}])
    if response.error is not None:
        return None, str(response.error.message())
    return response.output("REQUEST_OUTPUT_LEN")[:, 0].tolist(), None


@pytest.mark.parametrize("case", list(OUTPUT_LENGTH_CASES))
def test_a_request_without_output_length_gets_hfs_length(multi_eos, tmp_path, monkeypatch, case):
    """Regression: generation_config.json's max_new_tokens was recorded but never applied, since every request had
    to send REQUEST_OUTPUT_LEN. Preprocessing now fills in, per prompt, the new tokens HF's generate(**tok(prompt))
    makes with the file: max_new_tokens, else max_length - prompt, else 20 new tokens within the context."""
    generation, config_change, prompt_counts = OUTPUT_LENGTH_CASES[case]
    checkpoint = _length_checkpoint(multi_eos, tmp_path / "llama", generation, config_change)
    hf, tokenizer = _hf(checkpoint), _tokenizer(checkpoint)
    assert hf.generation_config.eos_token_id is None  # HF runs to its length limit
    expected = []
    for prompt in PROMPTS:
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            expected.append(hf.generate(**inputs).shape[1] - inputs.input_ids.shape[1])
    model = _exported_preprocessing(checkpoint, tmp_path, monkeypatch)
    assert _preprocess_without_length(model, PROMPTS) == (expected, None)
    assert (len(set(expected)) > 1) == prompt_counts  # the prompts' lengths show where they count


def test_a_prompt_that_leaves_no_room_under_max_length_is_refused_as_hf_refuses_it(multi_eos, tmp_path,
                                                                                   monkeypatch):
    """A prompt as long as generation_config's max_length: HF's generate raises; preprocessing answers that request
    with an error naming the prompt and the limit (a request that sends its own length is served)."""
    checkpoint = _length_checkpoint(multi_eos, tmp_path / "llama", {"max_length": 4}, {})
    prompt = PROMPTS[0]
    inputs = _tokenizer(checkpoint)(prompt, return_tensors="pt")
    assert inputs.input_ids.shape[1] == 4
    with pytest.raises(ValueError, match="max_length"):
        _hf(checkpoint).generate(**inputs)
    lengths, error = _preprocess_without_length(_exported_preprocessing(checkpoint, tmp_path, monkeypatch), [prompt])
    assert lengths is None and "QUERY[0] has 4 tokens" in error and "max_length=4" in error


# -- through a real tritonserver ---------------------------------------------------------------------------------
MAX_NEW_TOKENS = 5  # the served copy's generation_config.json: cuts prompt 1 (eos at step 6), not prompts 0 and 2


@pytest.fixture(scope="module")
def served_multi_eos(multi_eos, tmp_path_factory):
    """(checkpoint, http url): the multi-eos checkpoint, its generation_config.json also setting max_new_tokens,
    exported for the python runtime and served by a real tritonserver."""
    pytest.importorskip("tritonclient.http")
    from exporter.runtimes import ModelSettings
    from exporter.serve.tritonserver import TritonServer
    from exporter.stages.export import build_repository
    from serving_fixtures import tritonserver_or_skip

    install = tritonserver_or_skip()
    root = tmp_path_factory.mktemp("served-multi-eos")
    checkpoint = root / "llama"
    shutil.copytree(multi_eos[0], checkpoint)
    generation = json.loads((checkpoint / "generation_config.json").read_text())
    _write_json(checkpoint / "generation_config.json", {**generation, "max_new_tokens": MAX_NEW_TOKENS})
    settings = ModelSettings(name="llama", runtime="python", max_batch_size=4, layout=ParallelLayout(1, 1),
                             data_type="fp32", device="cpu")
    repository = build_repository(root / "repo", checkpoint, settings, "fp32")
    with TritonServer(repository, root / "tritonserver.log", install=install, startup_timeout_s=240) as server:
        yield checkpoint, server.http_url


def _served_ids_and_texts(url, arrays, prompts):
    from exporter.clients import common

    result = common.infer(url, "http", "ensemble", arrays, output_names=["OUTPUT_0", "output_ids", "sequence_length"])
    ids = [result["output_ids"][row, 0, len(prompt): int(result["sequence_length"][row, 0])].tolist()
           for row, prompt in enumerate(prompts)]
    return ids, [text.decode("utf-8") for text in result["OUTPUT_0"][:, 0]]


def _texts(tokenizer, rows, eos):
    """HF's decode of each row without its final eos token (not text: HF's decode skips it as a special token)."""
    return [tokenizer.decode(row[:-1] if row[-1] in eos else row) for row in rows]


@pytest.mark.triton
def test_served_ensemble_stops_at_each_eos_id_as_hf(multi_eos, served_multi_eos):
    """Regression: the served model ran past the eos ids config.ini's end_id did not name, and postprocessing cut
    the text at end_id only. Text in -> ids and text out equal HF's generate with the file, for each eos id."""
    from exporter.clients import common

    _, eos, prompts = multi_eos
    checkpoint, url = served_multi_eos
    hf, tokenizer = _hf(checkpoint), _tokenizer(checkpoint)
    expected = [_hf_generate(hf, ids) for ids in prompts]
    explicit = [_hf_generate(hf, ids, eos_token_id=eos[2]) for ids in prompts]
    unset = _served_ids_and_texts(url, common.ensemble_arrays(PROMPTS, NEW_TOKENS), prompts)
    sent = _served_ids_and_texts(url, common.ensemble_arrays(PROMPTS, NEW_TOKENS, end_id=eos[2]), prompts)
    for (ids, texts), want in ((unset, expected), (sent, explicit)):
        assert ids == want
        assert texts == _texts(tokenizer, want, eos)


@pytest.mark.triton
def test_served_ensemble_without_output_length_generates_as_hf(multi_eos, served_multi_eos):
    """Regression: generation_config.json's max_new_tokens was never applied (the ensemble required INPUT_1). A
    request without INPUT_1 now generates exactly HF's generate(**tok(prompt)) with the file; one with it still wins."""
    from exporter.clients import common

    _, eos, prompts = multi_eos
    checkpoint, url = served_multi_eos
    hf, tokenizer = _hf(checkpoint), _tokenizer(checkpoint)
    assert hf.generation_config.max_new_tokens == MAX_NEW_TOKENS
    expected = []
    for prompt in PROMPTS:
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            expected.append(hf.generate(**inputs)[0, inputs.input_ids.shape[1]:].tolist())
    # The file's length cuts prompt 1 before its eos id; prompts 0 and 2 end at theirs.
    assert [len(row) for row in expected] == [STOP_AT[0] + 1, MAX_NEW_TOKENS, STOP_AT[2] + 1]
    assert _served_ids_and_texts(url, common.ensemble_arrays(PROMPTS, None), prompts) == (
        expected, _texts(tokenizer, expected, eos))
    longer = [_hf_generate(hf, ids) for ids in prompts]  # max_new_tokens=NEW_TOKENS: prompt 1 reaches its eos
    assert len(longer[1]) == STOP_AT[1] + 1
    assert _served_ids_and_texts(url, common.ensemble_arrays(PROMPTS, NEW_TOKENS), prompts) == (
        longer, _texts(tokenizer, longer, eos))
