"""Padded vocabularies: a `vocab_size` above the tokenizer's (GPT-J 50400 vs 50257, Pythia 50304, OPT 50272 vs 50265,
Megatron's make_vocab_size_divisible_by) must never yield an id the tokenizer cannot decode.

The bug these tests pin (main before this change): the runtime generated padded ids, since config.ini only knew
the padded `vocab_size`, and postprocessing then failed the whole request with "outside the vocabulary".

Fixture: a tiny GPT-J with GPT-J's 50400 rows and the GPT-2 tokenizer (50257 ids), whose output bias on the padded
rows is so large that they win greedy decoding and dominate sampling unless masked. Reference: HF transformers'
own `generate`, with the padded ids suppressed (`suppress_tokens`) where the mask applies.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import generate, right_padded
from exporter.ft.convert import convert_checkpoint
from exporter.parallel import ParallelLayout
from family_fixtures import SHARED_TOKENIZER
from templates.ft_python import ft_checkpoint, ft_gpt

ROOT = Path(__file__).resolve().parents[1]
PADDED_VOCAB = 50400  # GPT-J's embedding rows
REAL_VOCAB = 50257  # the GPT-2 tokenizer's ids
END_ID = 50256
PADDING = list(range(REAL_VOCAB, PADDED_VOCAB))
PROMPTS = [[464, 2068, 7586, 21831, 18045, 625, 262], [40, 1101, 257], [15496, 11, 616, 1438, 318, 3271]]
NEW_TOKENS = 8


def build_padded_gptj(directory: Path) -> Path:
    """Tiny GPT-J, 50400 rows, GPT-2 tokenizer files; the padded rows' output bias (+30, against real logits of a
    few units) makes them the argmax at every step."""
    from transformers import GPTJConfig, GPTJForCausalLM

    torch.manual_seed(11)
    config = GPTJConfig(vocab_size=PADDED_VOCAB, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=256,
                        initializer_range=0.2, bos_token_id=END_ID, eos_token_id=END_ID)
    model = GPTJForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.bias.normal_(0.0, 0.2)
        model.lm_head.bias[REAL_VOCAB:] += 30.0
    model.save_pretrained(directory)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy2(SHARED_TOKENIZER / name, directory / name)
    return directory


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return build_padded_gptj(tmp_path_factory.mktemp("padded-gptj"))


@pytest.fixture(scope="module")
def hf(checkpoint):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def shards(checkpoint, tmp_path_factory):
    done = {}

    def get(tp: int) -> Path:
        if tp not in done:
            done[tp] = convert_checkpoint(checkpoint, tmp_path_factory.mktemp(f"padded-tp{tp}"), ParallelLayout(tp))
        return done[tp]

    return get


def hf_greedy(model, prompt: list[int], suppress: list[int] | None) -> list[int]:
    """HF transformers' greedy new tokens; `suppress`: ids HF's SuppressTokensLogitsProcessor sets to -inf."""
    extra = {"suppress_tokens": suppress} if suppress else {}
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1, pad_token_id=END_ID,
                             eos_token_id=END_ID, **extra)
    return out[0, len(prompt):].tolist()


def served_new_tokens(out, row: int, prompt_len: int) -> list[int]:
    return out.output_ids[row, 0, prompt_len: int(out.sequence_length[row, 0])].tolist()


def unmasked(shard_dir: Path) -> ft_gpt.FTGPT:
    """The runtime as main ran it: config.ini without tokenizer_vocab_size (= every row decodable)."""
    config = dataclasses.replace(ft_checkpoint.read_config(shard_dir), tokenizer_vocab_size=0)
    return ft_gpt.FTGPT(ft_checkpoint.load_weights(shard_dir), config)


def test_export_records_the_tokenizer_vocabulary(shards):
    """config.ini keeps FT's vocab_size (the rows in the files) and records where the tokenizer's ids end."""
    shard = shards(1)
    config = ft_checkpoint.read_config(shard)
    assert (config.vocab_size, config.tokenizer_vocab_size) == (PADDED_VOCAB, REAL_VOCAB)
    assert f"tokenizer_vocab_size = {REAL_VOCAB}\n" in (shard / "config.ini").read_text()
    assert (shard / "model.lm_head.bias.bin").stat().st_size == PADDED_VOCAB * 4  # the files keep every row


def test_without_the_mask_padded_ids_win(hf, shards):
    """The bug on main: with only vocab_size in config.ini the runtime greedily generated padded ids (as HF itself
    does without suppression: the fixture really has its padding win), and sampled them at temperature 2."""
    expected = [hf_greedy(hf, prompt, None) for prompt in PROMPTS]
    assert all(token >= REAL_VOCAB for row in expected for token in row)
    model = unmasked(shards(1))
    ids, lengths = right_padded(PROMPTS, END_ID)
    out = generate(model, ids, lengths, NEW_TOKENS)
    assert [served_new_tokens(out, row, len(p)) for row, p in enumerate(PROMPTS)] == expected
    sampled = generate(model, ids, lengths, NEW_TOKENS, temperature=2.0, random_seed=5)
    assert (sampled.output_ids >= REAL_VOCAB).any()


@pytest.mark.parametrize("tp", [1, 2])
def test_greedy_equals_hf_with_the_padding_suppressed(hf, shards, tp):
    """Regression (padded ids generated): greedy decoding equals HF `generate(suppress_tokens=padded ids)`, a
    ragged batch right-padded as Triton delivers it, at TP 1 and 2."""
    expected = [hf_greedy(hf, prompt, PADDING) for prompt in PROMPTS]
    assert all(token < REAL_VOCAB for row in expected for token in row)
    model = ft_gpt.FTGPT.from_shards(shards(tp), device="cpu")
    ids, lengths = right_padded(PROMPTS, END_ID)
    out = generate(model, ids, lengths, NEW_TOKENS)
    assert [served_new_tokens(out, row, len(p)) for row, p in enumerate(PROMPTS)] == expected


def test_sampling_1000_tokens_at_temperature_2_never_yields_a_padded_id(shards):
    """Regression (padded ids sampled): 8 rows x 125 tokens sampled at temperature 2 from the full distribution (no
    top-k / top-p), where without the mask the padding takes almost all the mass: every id is the tokenizer's."""
    model = ft_gpt.FTGPT.from_shards(shards(1), device="cpu")
    prompts = [PROMPTS[row % len(PROMPTS)] for row in range(8)]
    ids, lengths = right_padded(prompts, END_ID)
    out = generate(model, ids, lengths, 125, temperature=2.0, top_k=0, top_p=0.0, random_seed=list(range(8)))
    generated = [served_new_tokens(out, row, len(p)) for row, p in enumerate(prompts)]
    assert sum(map(len, generated)) == 1000  # no row stopped early: 1,000 sampled tokens
    assert max(max(row) for row in generated) < REAL_VOCAB
    assert int(out.output_ids.max()) < REAL_VOCAB
    assert torch.isfinite(out.output_log_probs).all()  # log-probs over the real ids only


def test_beam_search_never_yields_a_padded_id(shards):
    model = ft_gpt.FTGPT.from_shards(shards(1), device="cpu")
    ids, lengths = right_padded(PROMPTS, END_ID)
    out = generate(model, ids, lengths, NEW_TOKENS, beam_width=3)
    assert int(out.output_ids.max()) < REAL_VOCAB


# -- the config.ini key --------------------------------------------------------------------------------------------
INI = """[gptj]
head_num = 4
size_per_head = 16
inter_size = 256
num_layer = 2
max_pos_seq_len = 256
vocab_size = 50400
end_id = 50256
weight_data_type = fp32
tensor_para_size = 1
"""


def test_config_ini_without_the_key_means_no_padding():
    """Shards written before the key existed still load, every row decodable, as they were served."""
    config = ft_checkpoint.FTConfig.from_text(INI)
    assert config.tokenizer_vocab_size == config.vocab_size == 50400
    again = ft_checkpoint.FTConfig.from_text(config.to_ini())
    assert again == config


def test_config_ini_key_above_vocab_size_is_refused():
    with pytest.raises(ft_checkpoint.CheckpointError, match="tokenizer_vocab_size 60000 must be in"):
        ft_checkpoint.FTConfig.from_text(INI + "tokenizer_vocab_size = 60000\n")


# -- postprocessing --------------------------------------------------------------------------------------------------
@pytest.fixture()
def postprocessing(monkeypatch):
    """templates/postprocessing/model.py imported as the python backend would, with a stand-in for Triton's module
    (only `generated_slices` is called, which never touches it)."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", types.ModuleType("triton_python_backend_utils"))
    monkeypatch.syspath_prepend(str(ROOT / "templates"))  # tokenizer_model.py, copied next to model.py when served
    spec = importlib.util.spec_from_file_location("postprocessing_model", ROOT / "templates/postprocessing/model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_postprocessing_drops_ids_outside_the_vocabulary(postprocessing):
    """Regression: one undecodable id (a padded row, from a runtime that does not mask them) failed the whole
    request with "outside the vocabulary"; it is left out of the text instead, and the end_id still cuts."""
    tokens = np.array([[[15496, 50300, 995, 50399, END_ID, 7], [40, 1101, 50257, 257, END_ID, END_ID]]],
                      dtype=np.uint32)
    slices, ended = postprocessing.generated_slices(tokens, [[6, 4]], [0], END_ID, REAL_VOCAB)
    assert slices == [[[15496, 995], [40, 1101, 257]]]
    assert ended == [[True, False]]


# -- through a real tritonserver --------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.triton
def test_served_padded_model_never_fails_a_request(checkpoint, hf, tmp_path):
    """The padded fixture exported and served by tritonserver: greedy text equals HF's with the padding suppressed,
    and sampled requests at temperature 2 all succeed with only the tokenizer's ids."""

    pytest.importorskip("tritonclient.http")
    from transformers import AutoTokenizer

    from exporter.clients import common
    from exporter.runtimes import ModelSettings
    from exporter.serve.tritonserver import TritonServer
    from exporter.stages.export import build_repository
    from serving_fixtures import tritonserver_or_skip

    install = tritonserver_or_skip()
    settings = ModelSettings(name="gptj", runtime="python", max_batch_size=8, layout=ParallelLayout(1, 1),
                             data_type="fp32", device="cpu")
    repo = build_repository(tmp_path / "repo", checkpoint, settings, "fp32")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    texts = ["The quick brown fox jumps over the", "I'm a", "Hello, my name is Jack"]
    expected = [tokenizer.decode(hf_greedy(hf, tokenizer(text).input_ids, PADDING), skip_special_tokens=True)
                for text in texts]
    names = ["OUTPUT_0", "output_ids", "sequence_length"]
    with TritonServer(repo, tmp_path / "tritonserver.log", install=install, startup_timeout_s=240) as server:
        greedy = common.infer(server.http_url, "http", "ensemble", common.ensemble_arrays(texts, NEW_TOKENS),
                              output_names=names)
        assert [text.decode() for text in greedy["OUTPUT_0"].reshape(-1)] == expected
        for seed in range(4):
            sampled = common.infer(server.http_url, "http", "ensemble",
                                   common.ensemble_arrays(texts, 32, temperature=2.0, seed=seed),
                                   output_names=names)
            assert int(sampled["output_ids"].max()) < REAL_VOCAB
            assert all(text for text in sampled["OUTPUT_0"].reshape(-1))
