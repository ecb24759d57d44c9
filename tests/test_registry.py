"""Registry coverage: every registered architecture has a tiny seeded fixture, converts at TP=1 and TP=2, and its
greedy output through a real tritonserver equals the independent reference token for token (HF transformers
`generate`; a fixture with its own `reference` callable, e.g. NeMo's saved outputs, uses that instead).

One repository and one server for all architectures (one model per architecture and layout, queried directly with
token ids); each architecture's result is its own test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from exporter.arch import registered
from exporter.ft.convert import convert_checkpoint
from exporter.parallel import ParallelLayout
from exporter.runtimes import ModelKind, ModelSettings, runtime_for
from exporter.triton import render
from family_fixtures import ALIASES, END_ID, ENCODER_DECODER_FIXTURES, FIXTURES, NEMO_AVAILABLE, NEMO_MISSING

PROMPTS = [[464, 2068, 7586, 21831, 18045, 625, 262], [40, 1101, 257], [15496, 11, 616, 1438, 318, 3271, 13, 314]]
NEW_TOKENS = 8


def test_every_registered_architecture_has_a_fixture():
    """Decoder architectures in FIXTURES, encoder-decoder ones in ENCODER_DECODER_FIXTURES: each under its kind."""
    by_kind = {ModelKind.DECODER: FIXTURES, ModelKind.ENCODER_DECODER: ENCODER_DECODER_FIXTURES}
    missing = sorted(name for name, cls in registered().items()
                     if ALIASES.get(name, name) not in by_kind[ModelKind(cls.model_kind)])
    assert not missing, f"registered architectures without a tiny fixture in tests/family_fixtures.py: {missing}"
    stale = sorted(name for name in {**FIXTURES, **ENCODER_DECODER_FIXTURES} if name not in registered())
    assert not stale, f"fixtures for architectures that are not registered: {stale}"
    for name, fixture in {**FIXTURES, **ENCODER_DECODER_FIXTURES}.items():
        assert fixture.variants, name
    assert all(by_kind[kind] for kind in ModelKind), "every model kind has at least one registered architecture"


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("architecture, variant", [(architecture, variant)
                                                   for architecture, fixture in ENCODER_DECODER_FIXTURES.items()
                                                   for variant in fixture.variants])
def test_encoder_decoder_architecture_converts(tmp_path, architecture, variant, tp):
    """Every registered encoder-decoder architecture converts at TP 1 and 2 into shards its runtime table verifies
    (byte-level equality with FT's converter and the FT loader contract: test_t5_convert.py, test_ft_t5_contract.py;
    served parity comes with the encoder-decoder serving path)."""
    from templates.ft_python.ft_t5_checkpoint import verify

    checkpoint = ENCODER_DECODER_FIXTURES[architecture].variants[variant](tmp_path / variant)
    config = verify(convert_checkpoint(checkpoint, tmp_path / "out", ParallelLayout(tp)))
    assert config.tensor_para_size == tp


def add_model(repo: Path, name: str, checkpoint: Path, tp: int, pp: int = 1) -> None:
    """`<repo>/<name>/{config.pbtxt, 1/<tp>-gpu, 1/*.py}`: the exporter's conversion + python runtime model."""
    version_dir = repo / name / "1"
    convert_checkpoint(checkpoint, version_dir, ParallelLayout(tp, pp))
    settings = ModelSettings(name=name, runtime="python", max_batch_size=8, layout=ParallelLayout(tp, pp),
                             data_type="fp32", device="cpu")
    runtime = runtime_for(settings.runtime)
    runtime.install(version_dir, settings)
    render.write_config(runtime.model_config(settings, repo), repo / name)


def served_greedy(client, model: str, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    import tritonclient.http as http

    lengths = np.array([[len(p)] for p in prompts], dtype=np.uint32)
    ids = np.full((len(prompts), int(lengths.max())), END_ID, dtype=np.uint32)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = prompt
    arrays = {"input_ids": ids, "input_lengths": lengths,
              "request_output_len": np.full((len(prompts), 1), new_tokens, dtype=np.uint32)}
    inputs = []
    for key, array in arrays.items():
        tensor = http.InferInput(key, list(array.shape), "UINT32")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    response = client.infer(model, inputs)
    output_ids, sequence_length = response.as_numpy("output_ids"), response.as_numpy("sequence_length")
    return [output_ids[row, 0, len(p): int(sequence_length[row, 0])].tolist() for row, p in enumerate(prompts)]


def hf_greedy(checkpoint: Path, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """HF transformers' own greedy generation, each prompt alone (the independent reference)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        for prompt in prompts:
            generated = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                       max_new_tokens=new_tokens, do_sample=False, num_beams=1, pad_token_id=END_ID,
                                       eos_token_id=END_ID)
            out.append(generated[0, len(prompt):].tolist())
    return out


def layouts(architecture: str, fixture, variant: str) -> list[tuple[int, int]]:
    """(tp, pp) served per variant: the family's first variant at TP 1 and TP 2 (plus PP=2 for Llama: stages in
    sequence). Further variants are checked in-process against HF at TP 1 and 2 (test_families.py); serving them too
    would add a python-backend process each (~8 s of loading on 2 cores) for little more coverage."""
    if variant != next(iter(fixture.variants)):
        return []
    extra = [(1, 2)] if architecture == "LlamaForCausalLM" else []
    return [(1, 1), (fixture.max_tp, 1)] + extra


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One repository with every architecture's models, one tritonserver; {model: (architecture, served, expected)}."""
    pytest.importorskip("tritonclient.http")
    import tritonclient.http as http

    from exporter.serve.tritonserver import TritonServer

    root = tmp_path_factory.mktemp("registry")
    repo = root / "model_repo"
    models = {}
    for architecture, fixture in FIXTURES.items():
        if architecture == "MegatronGPTModel" and not NEMO_AVAILABLE:
            continue  # its test skips, saying why
        for variant, build in fixture.variants.items():
            if not layouts(architecture, fixture, variant):
                continue
            checkpoint = build(root / "checkpoints" / variant)
            reference = fixture.reference or hf_greedy
            prompts, new_tokens = fixture.prompts or PROMPTS, fixture.new_tokens or NEW_TOKENS
            expected = reference(checkpoint, prompts, new_tokens)
            for tp, pp in layouts(architecture, fixture, variant):
                name = f"{variant}-tp{tp}-pp{pp}"
                add_model(repo, name, checkpoint, tp, pp)
                models[name] = (architecture, prompts, new_tokens, expected)
    # Every model loads in its own python-backend process (~8 s each on an idle 2-core machine, several times that
    # on a busy one): the startup deadline grows with the number of models.
    with TritonServer(repo, root / "server.log", startup_timeout_s=max(300.0, 40.0 * len(models))) as server:
        client = http.InferenceServerClient(server.http_url)
        return {name: (architecture, served_greedy(client, name, prompts, new_tokens), expected)
                for name, (architecture, prompts, new_tokens, expected) in models.items()}


@pytest.mark.triton
@pytest.mark.parametrize("architecture", sorted(FIXTURES))
def test_served_greedy_equals_reference(served, architecture):
    if architecture == "MegatronGPTModel" and not NEMO_AVAILABLE:
        pytest.skip(NEMO_MISSING)
    mine = {name: entry for name, entry in served.items() if entry[0] == architecture}
    tps = {int(name.split("-tp")[1].split("-")[0]) for name in mine}
    assert tps == {1, FIXTURES[architecture].max_tp}, tps
    for name, (_, tokens, expected) in mine.items():
        assert tokens == expected, name
