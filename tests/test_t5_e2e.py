"""Encoder-decoder (T5) end to end: HF T5 checkpoint -> FT T5 shards -> model repository (preprocessing, the python
runtime's T5 model, postprocessing, ensemble) -> a real tritonserver; text in, text out equals HF transformers'
`tok.decode(model.generate(**tok(prompt))[0], skip_special_tokens=True)` with the same spiece.model read by
transformers' T5Tokenizer (the independent reference), and the LAMBADA seq2seq scoring served vs HF in process.

One tritonserver for the module: original T5 (relu, tied) at TP 1 behind `ensemble`, T5 v1.1-like (gated-gelu,
untied lm_head) at TP 2 behind `ensemble_gated`; both share the tokenizer, so pre/postprocessing are shared.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from family_fixtures import T5_VOCAB, build_t5

transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

LAMBADA = Path(__file__).resolve().parents[1] / "exporter" / "data" / "lambada_test.jsonl"
EXTRA_IDS = 4  # sentinels <extra_id_3> .. <extra_id_0> after the pieces, as T5's tokenizer adds them
PIECES = T5_VOCAB - EXTRA_IDS  # the tokenizer's ids fill the model's vocabulary exactly
PROMPTS = ("The capital of France is", "she said, looking at the door", "He smiled")
NEW_TOKENS = 6
VARIANTS = {"t5_relu": (False, 1, "ensemble"), "t5_gated": (True, 2, "ensemble_gated")}  # gated, TP, ensemble


def train_spiece(directory: Path) -> Path:
    """A tiny T5-style SentencePiece Unigram model (pad 0, eos 1, unk 2, no bos) trained on LAMBADA lines, with the
    tokenizer_config.json transformers reads (T5Tokenizer, extra_ids)."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = [json.loads(line)["text"] for line in LAMBADA.read_text(encoding="utf-8").splitlines()[:400]]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(directory / "spiece"),
                                   vocab_size=PIECES, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, minloglevel=2)
    (directory / "spiece.vocab").unlink()
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer",
                                                                 "extra_ids": EXTRA_IDS}))
    return directory


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return train_spiece(tmp_path_factory.mktemp("t5-tokenizer"))


@pytest.fixture(scope="module")
def checkpoints(tokenizer_dir, tmp_path_factory) -> dict[str, Path]:
    found = {}
    for name, (gated, _, _) in VARIANTS.items():
        directory = build_t5(tmp_path_factory.mktemp(name), gated=gated)
        for file in tokenizer_dir.iterdir():
            shutil.copy2(file, directory / file.name)
        found[name] = directory
    return found


def reference_tokenizer(checkpoint: Path):
    return transformers.AutoTokenizer.from_pretrained(str(checkpoint))


def test_served_tokenizer_encodes_and_decodes_as_t5_tokenizer(checkpoints, tmp_path):
    """The served tokenizer.json rebuilt from spiece.model gives transformers' T5Tokenizer ids (</s> appended, no
    bos, sentinels last) and its decode(skip_special_tokens=True), on LAMBADA lines and odd text."""
    from exporter.tokenizer import load_tokenizer

    checkpoint = checkpoints["t5_relu"]
    ours, reference = load_tokenizer(checkpoint), reference_tokenizer(checkpoint)
    assert type(reference).__name__ == "T5Tokenizer" and len(reference) == T5_VOCAB
    texts = [json.loads(line)["text"] for line in LAMBADA.read_text(encoding="utf-8").splitlines()[2000:2200]]
    texts += ["  two  spaces <extra_id_0> and é ü 日本 </s> end", "", "<pad>x"]
    for text in texts:
        ids = reference(text).input_ids
        assert ours.encode(text).ids == ids, text
        assert ours.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True), text


@pytest.fixture(scope="module")
def served(checkpoints, tmp_path_factory):
    """(repository, TritonServer): both variants exported by the pipeline into one repository and served."""
    pytest.importorskip("tritonclient.http")
    from exporter.parallel import ParallelLayout
    from exporter.runtimes import ModelSettings
    from exporter.serve.tritonserver import TritonServer
    from exporter.stages.export import build_repository
    from exporter.triton import render
    from serving_fixtures import tritonserver_or_skip

    install = tritonserver_or_skip()
    root = tmp_path_factory.mktemp("t5-served")
    repositories = {}
    for name, (_, tp, _) in VARIANTS.items():
        settings = ModelSettings(name=name, runtime="python", max_batch_size=4, layout=ParallelLayout(tp, 1),
                                 data_type="fp32", device="cpu", max_beam_width=4)
        repositories[name] = build_repository(root / f"repo_{name}", checkpoints[name], settings, "fp32")
    repo = repositories["t5_relu"]
    shutil.copytree(repositories["t5_gated"] / "t5_gated", repo / "t5_gated")
    ensemble = render.encoder_decoder_ensemble_config("t5_gated", 4)
    ensemble.name = "ensemble_gated"
    (repo / "ensemble_gated" / "1").mkdir(parents=True)
    render.write_config(ensemble, repo / "ensemble_gated")
    with TritonServer(repo, root / "tritonserver.log", install=install, startup_timeout_s=240) as server:
        yield repo, server


def infer_text(url: str, ensemble: str, prompts, new_tokens: int, beam_width: int = 1):
    from exporter.clients import common

    arrays = {"INPUT_0": np.array([[p.encode()] for p in prompts], dtype=object),
              "INPUT_1": np.full((len(prompts), 1), new_tokens, dtype=np.uint32),
              "beam_width": np.full((len(prompts), 1), beam_width, dtype=np.uint32)}
    return common.infer(url, "http", ensemble, arrays)


def hf_texts(checkpoint: Path, prompts, new_tokens: int, beams: int = 1) -> list[str]:
    import torch

    tokenizer = reference_tokenizer(checkpoint)
    model = transformers.T5ForConditionalGeneration.from_pretrained(str(checkpoint)).eval()
    texts = []
    with torch.inference_mode():
        for prompt in prompts:  # one prompt at a time, unpadded, as people run it
            out = model.generate(**tokenizer(prompt, return_tensors="pt"), max_new_tokens=new_tokens,
                                 do_sample=False, num_beams=beams, length_penalty=1.0)
            texts.append(tokenizer.decode(out[0], skip_special_tokens=True))
    return texts


@pytest.mark.triton
@pytest.mark.parametrize("beams", [1, 3], ids=["greedy", "beam3"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ensemble_text_equals_hf_generate(served, checkpoints, variant, beams):
    """Text in -> text out through preprocessing (T5Tokenizer's ids, </s> appended), the T5 model (TP 1 relu, TP 2
    gated) and postprocessing (generated tokens only, special tokens skipped) equals HF generate's decoded text."""
    _, server = served
    result = infer_text(server.http_url, VARIANTS[variant][2], PROMPTS, NEW_TOKENS, beams)
    expected = hf_texts(checkpoints[variant], PROMPTS, NEW_TOKENS, beams)
    assert [result["OUTPUT_0"][row, 0].decode() for row in range(len(PROMPTS))] == expected
    assert any(expected), "every reference text is empty: the comparison would prove nothing"
