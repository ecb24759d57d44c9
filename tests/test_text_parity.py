"""Text in -> text out as people run the checkpoint with HF transformers (the independent reference):
`tok.decode(model.generate(**tok(prompt), do_sample=False)[new], skip_special_tokens=True)`.

`tok(prompt)` adds the tokenizer's default special tokens: `<s>` for a Llama tokenizer, `</s>` for OPT's. Main
served every prompt without them (preprocessing, LAMBADA and the HF reference all encoded with
add_special_tokens=False), so parity "passed" on ids no user ever sends.

To cover another tokenizer or family, add a `TextCase` to CASES: its builder gets the pytest request (for session
fixtures) and an empty directory and returns an HF checkpoint directory. Each case starts one tritonserver.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

import tokenizer_fixtures as fixtures
# tests/test_sentencepiece.py's session fixtures (sentencepiece is a test dependency), for the SentencePiece cases.
from test_sentencepiece import lambada_texts, sentencepiece_models  # noqa: F401

transformers = pytest.importorskip("transformers")

PROMPTS = ("The capital of France is", "Once upon a time, there was a little", "she said")
NEW_TOKENS = 8
TEMPLATES = Path(__file__).resolve().parents[1] / "templates"


@pytest.fixture(scope="session")
def llama_tokenizer_dir(tmp_path_factory) -> Path:
    """Byte-level BPE trained on LAMBADA whose tokenizer.json template puts `<s>` first (no tokenizer_config)."""
    return fixtures.train_llama_tokenizer(tmp_path_factory.mktemp("llama-tokenizer"))


@dataclass(frozen=True)
class TextCase:
    name: str
    build: Callable[[pytest.FixtureRequest, Path], Path]  # (request, empty directory) -> HF checkpoint directory
    prompts: tuple[str, ...] = PROMPTS


def _sentencepiece_model(request) -> Path:
    """tests/test_sentencepiece.py's Llama-like BPE tokenizer.model (1000 pieces, trained on LAMBADA)."""
    return request.getfixturevalue("sentencepiece_models")["bpe"]


def _build_sentencepiece_llama(request, directory: Path) -> Path:
    """A tiny Llama with only tokenizer.model and Llama-2's tokenizer_config.json (add_bos_token: true)."""
    import torch
    from test_sentencepiece import hf_directory

    hf_directory(directory, _sentencepiece_model(request))
    torch.manual_seed(13)
    config = transformers.LlamaConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=96, max_position_embeddings=128,
                                      initializer_range=0.2, bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(directory)
    return directory


def _build_mistral(request, directory: Path) -> Path:
    """A tiny Mistral as Mistral ships its tokenizer (tokenizer.model + Llama's tokenizer_config.json: `<s>` first),
    sliding window 4: every prompt (4 to 10 ids with `<s>`) plus 8 new tokens runs past it."""
    import torch
    from test_sentencepiece import hf_directory

    hf_directory(directory, _sentencepiece_model(request))
    torch.manual_seed(14)
    config = transformers.MistralConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=96, max_position_embeddings=128,
                                        sliding_window=4, initializer_range=0.2, bos_token_id=1, eos_token_id=2)
    transformers.MistralForCausalLM(config).eval().save_pretrained(directory)
    return directory


def _build_qwen2(request, directory: Path) -> Path:
    """A tiny Qwen2 (q/k/v biases, tied output) with a Qwen-style tokenizer.json: byte-level BPE, no BOS added."""
    import torch
    from tokenizers import Tokenizer, processors

    fixtures.copy_tokenizer(request.getfixturevalue("llama_tokenizer_dir"), directory)
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)  # Qwen2's: nothing added around the text
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "</s>", "pad_token": "<unk>", "model_max_length": 128,
        "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}))
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    eos = tokenizer.token_to_id("</s>")
    torch.manual_seed(15)
    config = transformers.Qwen2Config(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=96, max_position_embeddings=128,
                                      initializer_range=0.2, tie_word_embeddings=True, eos_token_id=eos)
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # HF initialises biases to zero: make the q/k/v biases count
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0.0, 0.5)
    model.save_pretrained(directory)
    return directory


CASES = [
    TextCase("llama_bos", lambda request, directory: fixtures.build_llama_bos(
        directory, request.getfixturevalue("llama_tokenizer_dir"))),
    TextCase("opt", lambda request, directory: fixtures.build_opt_bos(directory)),
    TextCase("sentencepiece_llama_bos", _build_sentencepiece_llama),
    TextCase("mistral_sliding_window", _build_mistral),
    TextCase("qwen2", _build_qwen2),
]


def hf_text(checkpoint: Path, prompt: str, new_tokens: int) -> tuple[list[int], list[int], str]:
    """HF transformers the ordinary way: (tok(prompt) ids, greedy new ids, their text without special tokens)."""
    import torch

    tok = transformers.AutoTokenizer.from_pretrained(checkpoint)
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    inputs = tok(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    prompt_ids = inputs.input_ids[0].tolist()
    new = out[0, len(prompt_ids):].tolist()
    return prompt_ids, new, tok.decode(new, skip_special_tokens=True)


@pytest.fixture(scope="module", params=CASES, ids=lambda case: case.name)
def served_case(request, tmp_path_factory):
    """(case, checkpoint, model directory, TritonServer): the case's checkpoint exported by the pipeline and served by
    tritonserver."""
    pytest.importorskip("tritonclient.http")
    from exporter.parallel import ParallelLayout
    from exporter.runtimes import ModelSettings
    from exporter.serve.tritonserver import TritonServer
    from exporter.stages.export import build_repository
    from serving_fixtures import tritonserver_or_skip

    install = tritonserver_or_skip()
    case = request.param
    root = tmp_path_factory.mktemp(case.name)
    checkpoint = case.build(request, root / "checkpoint")
    settings = ModelSettings(name=case.name, runtime="python", max_batch_size=4, layout=ParallelLayout(1, 1),
                             data_type="fp32", device="cpu")
    repo = build_repository(root / "model_repo", checkpoint, settings, "fp32")
    with TritonServer(repo, root / "tritonserver.log", install=install, startup_timeout_s=240) as server:
        yield case, checkpoint, repo / case.name, server


@pytest.mark.triton
def test_ensemble_text_equals_hf_generate(served_case):
    """Bug pinned: the ensemble encoded prompts without the tokenizer's default special tokens (Llama's <s>, OPT's
    </s> first), so served text differed from HF's `generate(**tok(prompt))`."""
    from test_e2e import infer_ensemble

    case, checkpoint, _, server = served_case
    served = infer_ensemble(server.http_url, list(case.prompts), NEW_TOKENS)
    for row, prompt in enumerate(case.prompts):
        prompt_ids, new, text = hf_text(checkpoint, prompt, NEW_TOKENS)
        seq_len = int(served["sequence_length"][row, 0])
        assert served["output_ids"][row, 0, : len(prompt_ids)].tolist() == prompt_ids, prompt
        assert served["output_ids"][row, 0, len(prompt_ids) : seq_len].tolist() == new, prompt
        assert served["OUTPUT_0"][row, 0].decode() == text, prompt


@pytest.mark.triton
def test_lambada_ids_and_predictions_equal_hf(served_case, tmp_path):
    """The accuracy stage on the case's server: the served tokenizer's ids equal HF's own tokenizer's on every
    example (contexts start with <s> / </s> as `tok(context)` does) and served predictions equal HF's."""
    from test_config import composed

    from exporter.config import validate
    from exporter.stages.export import accuracy

    case, checkpoint, model_dir, server = served_case
    cfg = validate(composed(
        f"base_results_dir={tmp_path}", f"export.model.checkpoint_path={checkpoint}",
        f"export.triton_deployment.triton_model_dir={model_dir}", "export.triton_deployment.max_batch_size=4",
        "export.accuracy.limit=12", "export.accuracy.batch_size=4", f"export.accuracy.output_path={tmp_path}/eval.json",
    ))
    results = accuracy(cfg, server_url=f"http://{server.http_url}", server_grpc_url=server.grpc_url)
    assert (results["parity"], results["passed"], results["reference_ids"]) == ("passed", True, "its own tokenizer's")
    for metric, entry in results["metrics"].items():
        assert entry["same_ids_as_reference"] == 1.0, metric
        assert entry["prediction_agreement"] == 1.0, metric


# ------------------------------------------------------------------------- no server: the text models in process


def _load_text_model(kind: str, tokenizer_json: Path, tmp_path: Path, monkeypatch, **parameters):
    """templates/<kind>/model.py laid out as the exporter lays it out, imported and initialised as Triton would."""
    import shutil

    from test_runtime_inprocess import _fake_pb_utils

    version_dir = tmp_path / kind / "1"
    (version_dir / "tokenizer").mkdir(parents=True)
    shutil.copy2(TEMPLATES / kind / "model.py", version_dir / "model.py")
    shutil.copy2(TEMPLATES / "tokenizer_model.py", version_dir / "tokenizer_model.py")
    shutil.copy2(tokenizer_json, version_dir / "tokenizer" / "tokenizer.json")
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _fake_pb_utils())
    monkeypatch.delitem(sys.modules, "tokenizer_model", raising=False)  # its TOKENIZER_PATH is per directory
    monkeypatch.setattr(sys, "path", list(sys.path))
    spec = importlib.util.spec_from_file_location(f"{kind}_model_{id(version_dir)}", version_dir / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    instance = module.TritonPythonModel()
    config = {"name": kind, "parameters": {k: {"string_value": str(v)} for k, v in {"end_id": 0, **parameters}.items()}}
    instance.initialize({"model_config": json.dumps(config)})
    return instance


def _preprocess(model, prompts: list[str]) -> list[list[int]]:
    from test_runtime_inprocess import _FakeTensor

    request = {
        "QUERY": _FakeTensor("QUERY", np.array([[p.encode()] for p in prompts], dtype=object)),
        "REQUEST_OUTPUT_LEN": _FakeTensor("REQUEST_OUTPUT_LEN", np.full((len(prompts), 1), 4, np.uint32)),
    }
    (response,) = model.execute([request])
    assert response.error is None, response.error
    ids, lengths = response.output("INPUT_ID"), response.output("REQUEST_INPUT_LEN")
    return [ids[row, : int(lengths[row, 0])].tolist() for row in range(len(prompts))]


def _llama_variant(source: Path, directory: Path, **flags) -> Path:
    return fixtures.write_llama_tokenizer_config(fixtures.copy_tokenizer(source, directory), **flags)


def _llama(**flags):
    """A builder: the trained Llama tokenizer.json with a tokenizer_config.json setting `flags`."""
    return lambda request, directory: _llama_variant(request.getfixturevalue("llama_tokenizer_dir"), directory,
                                                     **flags)


def _sentencepiece(**flags):
    """A builder: tokenizer.model + Llama-2's tokenizer_config.json (add_bos_token: true), `flags` changed."""
    from test_sentencepiece import hf_directory

    return lambda request, directory: hf_directory(directory, _sentencepiece_model(request), **flags)


def _gpt2(request, directory: Path) -> Path:
    directory = fixtures.copy_tokenizer(fixtures.GPT2_TOKENIZER, directory)
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))
    return directory


# (name, builder (request, directory) -> tokenizer directory, overrides = HF's from_pretrained kwargs).
# transformers 5.24 ignores tokenizer_config.json's add_bos_token / add_eos_token when tokenizer.json exists (the
# template rules) and honours them when it builds from vocab.json + merges.txt or tokenizer.model; kwargs win.
TOKENIZERS = [
    ("llama_template", _llama(), {}),
    ("llama_config_add_bos", _llama(add_bos_token=True), {}),
    ("llama_config_no_bos_is_ignored", _llama(add_bos_token=False), {}),
    ("llama_override_no_bos", _llama(add_bos_token=True), {"add_bos_token": False}),
    ("llama_override_eos", _llama(), {"add_bos_token": True, "add_eos_token": True}),
    ("opt", lambda request, directory: fixtures.write_opt_tokenizer(directory), {}),
    ("opt_override_no_bos", lambda request, directory: fixtures.write_opt_tokenizer(directory),
     {"add_bos_token": False}),
    ("gpt2", _gpt2, {}),
    ("gpt2_override_bos", _gpt2, {"add_bos_token": True}),
    ("sentencepiece_config_add_bos", _sentencepiece(), {}),
    ("sentencepiece_config_eos", _sentencepiece(add_bos_token=False, add_eos_token=True), {}),
    ("sentencepiece_override_no_bos", _sentencepiece(), {"add_bos_token": False}),
]


@pytest.fixture(scope="module", params=TOKENIZERS, ids=lambda entry: entry[0])
def tokenizer_case(request, tmp_path_factory):
    """(checkpoint tokenizer directory, HF's tokenizer loaded with the overrides, the served tokenizer.json)."""
    from exporter.tokenizer import SpecialTokens, load_tokenizer

    name, build, overrides = request.param
    root = tmp_path_factory.mktemp(name)
    directory = build(request, root / "checkpoint")
    served = root / "served-tokenizer.json"
    load_tokenizer(directory, SpecialTokens(**overrides)).save(str(served))  # what convert writes
    return directory, transformers.AutoTokenizer.from_pretrained(directory, **overrides), served


def test_preprocessing_encodes_as_hf_tok(tokenizer_case, tmp_path, monkeypatch):
    """Bug pinned: preprocessing encoded with add_special_tokens=False, dropping Llama's <s> / OPT's </s> that
    HF's `tok(prompt)` adds (the real preprocessing model.py, in process, on the served tokenizer.json)."""
    _, tok, served = tokenizer_case
    prompts = list(PROMPTS) + fixtures.lambada_texts(40)
    model = _load_text_model("preprocessing", served, tmp_path, monkeypatch)
    assert _preprocess(model, prompts) == [tok(prompt).input_ids for prompt in prompts]


def test_lambada_encodes_as_hf_tok(tokenizer_case):
    """LAMBADA's contexts start as HF's `tok(context)` does (its leading special tokens, left-truncation keeping
    them) and never carry an appended eos into the middle; continuations have no special tokens."""
    from tokenizers import Tokenizer

    from exporter.evaluate.lambada import Encoder, build_examples

    _, tok, served = tokenizer_case
    tokenizer = Tokenizer.from_file(str(served))
    encoder = Encoder(lambda text, special: tokenizer.encode(text, add_special_tokens=special).ids)
    texts = fixtures.lambada_texts(60)
    eos = [tok.eos_token_id] if getattr(tok, "add_eos_token", False) else []

    def without_eos(ids):
        assert ids[len(ids) - len(eos):] == eos
        return ids[: len(ids) - len(eos)]

    words = build_examples(texts, encoder, "last_word", max_seq_len=10_000)
    tokens = build_examples(texts, encoder, "last_token", max_seq_len=10_000)
    for text, word, token in zip(texts, words, tokens):
        head, last = text.rstrip().rsplit(" ", 1)
        assert word.context == without_eos(tok(head).input_ids)
        assert word.label == tok(" " + last, add_special_tokens=False).input_ids
        assert token.context + token.label == without_eos(tok(text).input_ids)
    prefix = without_eos(tok("").input_ids)  # what the tokenizer puts before every text
    for example in build_examples(texts, encoder, "last_word", max_seq_len=12):
        assert example.context[: len(prefix)] == prefix and len(example.context) + len(example.label) <= 12


@pytest.mark.parametrize("skip", [True, False])
def test_postprocessing_skips_special_tokens_unless_asked(skip, llama_tokenizer_dir, tmp_path, monkeypatch):
    """OUTPUT is `tok.decode(ids, skip_special_tokens=True)`; with the skip_special_tokens parameter off, the
    special tokens stay in the text (HF's decode with skip_special_tokens=False)."""
    from test_runtime_inprocess import _FakeTensor

    tok = transformers.AutoTokenizer.from_pretrained(_llama_variant(llama_tokenizer_dir, tmp_path / "tok"))
    generated = tok("Hello there").input_ids + tok("</s> friend", add_special_tokens=False).input_ids
    model = _load_text_model("postprocessing", llama_tokenizer_dir / "tokenizer.json", tmp_path, monkeypatch,
                             end_id=tok.unk_token_id, skip_special_tokens=int(skip))
    ids = np.array([[[7, 8] + generated]], dtype=np.uint32)  # a 2-token prompt, then the generated ids
    request = {
        "TOKENS_BATCH": _FakeTensor("TOKENS_BATCH", ids),
        "SEQUENCE_LENGTH": _FakeTensor("SEQUENCE_LENGTH", np.array([[ids.shape[2]]], np.uint32)),
        "INPUT_LENGTHS": _FakeTensor("INPUT_LENGTHS", np.array([[2]], np.uint32)),
    }
    (response,) = model.execute([request])
    assert response.error is None, response.error
    text = response.output("OUTPUT")[0, 0].decode()
    assert text == tok.decode(generated, skip_special_tokens=skip)
    assert ("<s>" in text) is not skip


def test_render_passes_skip_special_tokens_to_postprocessing():
    from exporter.triton import render

    assert render.postprocessing_config(4, 2).parameters["skip_special_tokens"].string_value == "1"
    assert render.postprocessing_config(4, 2, skip_special_tokens=False).parameters[
        "skip_special_tokens"].string_value == "0"


def test_served_tokenizer_json_is_the_checkpoints_own_unless_changed(llama_tokenizer_dir, tmp_path):
    """The checkpoint's tokenizer.json is served byte for byte when its post-processor is already the served choice;
    an override rewrites it (and the rewritten file encodes as HF's tokenizer loaded with that override)."""
    from tokenizers import Tokenizer

    from exporter.tokenizer import SpecialTokens, load_tokenizer, save_served_tokenizer

    source = _llama_variant(llama_tokenizer_dir, tmp_path / "checkpoint", add_bos_token=True)
    kept, changed = tmp_path / "kept.json", tmp_path / "changed.json"
    save_served_tokenizer(load_tokenizer(source), source, kept)
    assert kept.read_bytes() == (source / "tokenizer.json").read_bytes()
    save_served_tokenizer(load_tokenizer(source, SpecialTokens(add_bos_token=False)), source, changed)
    tok = transformers.AutoTokenizer.from_pretrained(source, add_bos_token=False)
    assert Tokenizer.from_file(str(changed)).encode(PROMPTS[0]).ids == tok(PROMPTS[0]).input_ids
    assert tok(PROMPTS[0]).input_ids[0] != tok.bos_token_id


def test_served_tokenizer_json_states_the_size_it_writes(llama_tokenizer_dir, tmp_path):
    """The conversion checks free space for `nbytes` before writing anything: it is the size of the file written,
    whether the checkpoint's own file is kept or the tokenizer is serialised (as `Tokenizer.save` writes it)."""
    from exporter.tokenizer import ServedTokenizerJson, SpecialTokens, load_tokenizer

    source = _llama_variant(llama_tokenizer_dir, tmp_path / "checkpoint", add_bos_token=True)
    for name, overrides in (("kept", SpecialTokens()), ("changed", SpecialTokens(add_bos_token=False))):
        tokenizer = load_tokenizer(source, overrides)
        served = ServedTokenizerJson(tokenizer, source)
        written, saved = tmp_path / f"{name}.json", tmp_path / f"{name}.saved.json"
        served.save(written)
        assert served.nbytes == written.stat().st_size
        if name == "changed":
            tokenizer.save(str(saved))
            assert written.read_bytes() == saved.read_bytes()
        else:
            assert written.read_bytes() == (source / "tokenizer.json").read_bytes()
