"""Source checkpoints as people have them: bf16 / fp16 files, tied embeddings under either name, damaged or hostile
files and unknown architectures.

References: torch's own cast of each tensor as safetensors / torch.load read it (not this project's reader or
writer), HF transformers' logits, and what `python main.py` prints.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from exporter.ft.convert import convert_checkpoint
from exporter.parallel import ParallelLayout
from exporter.readers.hf import HFCheckpoint
from family_fixtures import END_ID, build_gpt2, build_llama, build_opt
from templates.ft_python import ft_gpt
from templates.ft_python.ft_checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
PROMPT = [464, 2068, 7586, 21831, 18045, 625, 262]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PICKLE_FORMATS = ("pytorch_model.bin", "legacy pytorch_model.bin")


# -- bf16 / fp16 sources -------------------------------------------------------------------------------------------
def _save_in(source: Path, directory: Path, dtype: torch.dtype, file_format: str) -> Path:
    """`source` (a float32 fixture) saved by transformers in `dtype` (config.json `dtype` says so), with a few
    values only one of fp16 / bf16 can hold, so a cast through the other type would change them; then stored as
    `file_format` (safetensors, or a pickled state dict in torch's zip or legacy format)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).eval()
    with torch.no_grad():
        row = model.get_input_embeddings().weight[7]
        # bf16 holds 3e5 and 1e-30 (fp16 overflows / flushes them); fp16 holds 1 + 2^-10 (bf16 rounds it to 1).
        row[:4] = torch.tensor([3e5, -1e-30, 1 + 2**-10, 5.96e-8], dtype=torch.float32).to(dtype)
    model.save_pretrained(directory)
    if file_format != "safetensors":
        state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        for stale in directory.glob("model*.safetensors*"):
            stale.unlink()
        torch.save(state, directory / "pytorch_model.bin",
                   _use_new_zipfile_serialization=file_format == "pytorch_model.bin")
    for name in ("vocab.json", "merges.txt"):
        shutil.copy2(source / name, directory / name)
    return directory


def _source_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint as the safetensors library / torch.load read it."""
    if (directory / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(directory / "model.safetensors")
    return torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)


def _expected_llama(tensors: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """FT file -> its full tensor at TP 1 (exporter/arch/layout.md): nn.Linear weights transposed to [in, out],
    q | k | v concatenated."""
    files = {"model.wte.bin": tensors["model.embed_tokens.weight"],
             "model.final_layernorm.weight.bin": tensors["model.norm.weight"],
             "model.lm_head.weight.bin": tensors["lm_head.weight"]}
    for i in range(layers):
        hf, ft = f"model.layers.{i}.", f"model.layers.{i}."
        attention = hf + "self_attn."
        files.update({
            ft + "input_layernorm.weight.bin": tensors[hf + "input_layernorm.weight"],
            ft + "post_attention_layernorm.weight.bin": tensors[hf + "post_attention_layernorm.weight"],
            ft + "attention.query_key_value.weight.0.bin":
                torch.cat([tensors[attention + f"{p}_proj.weight"] for p in "qkv"]).t(),
            ft + "attention.dense.weight.0.bin": tensors[attention + "o_proj.weight"].t(),
            ft + "mlp.dense_h_to_4h.weight.0.bin": tensors[hf + "mlp.gate_proj.weight"].t(),
            ft + "mlp.dense_h_to_4h_2.weight.0.bin": tensors[hf + "mlp.up_proj.weight"].t(),
            ft + "mlp.dense_4h_to_h.weight.0.bin": tensors[hf + "mlp.down_proj.weight"].t(),
        })
    return files


def _expected_gpt2(tensors: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """FT file -> its full tensor at TP 1: GPT-2's Conv1D weights are FT's layout already, byte for byte."""
    files = {"model.wte.bin": tensors["transformer.wte.weight"], "model.wpe.bin": tensors["transformer.wpe.weight"],
             "model.final_layernorm.weight.bin": tensors["transformer.ln_f.weight"],
             "model.final_layernorm.bias.bin": tensors["transformer.ln_f.bias"]}
    for i in range(layers):
        hf, ft = f"transformer.h.{i}.", f"model.layers.{i}."
        for source, target in (("ln_1", "input_layernorm"), ("ln_2", "post_attention_layernorm")):
            for kind in ("weight", "bias"):
                files[f"{ft}{target}.{kind}.bin"] = tensors[f"{hf}{source}.{kind}"]
        files.update({
            ft + "attention.query_key_value.weight.0.bin": tensors[hf + "attn.c_attn.weight"],
            ft + "attention.query_key_value.bias.0.bin": tensors[hf + "attn.c_attn.bias"],
            ft + "attention.dense.weight.0.bin": tensors[hf + "attn.c_proj.weight"],
            ft + "attention.dense.bias.bin": tensors[hf + "attn.c_proj.bias"],
            ft + "mlp.dense_h_to_4h.weight.0.bin": tensors[hf + "mlp.c_fc.weight"],
            ft + "mlp.dense_h_to_4h.bias.0.bin": tensors[hf + "mlp.c_fc.bias"],
            ft + "mlp.dense_4h_to_h.weight.0.bin": tensors[hf + "mlp.c_proj.weight"],
            ft + "mlp.dense_4h_to_h.bias.bin": tensors[hf + "mlp.c_proj.bias"],
        })
    return files


FAMILIES = {"llama": (build_llama, _expected_llama), "gpt2": (build_gpt2, _expected_gpt2)}


@pytest.fixture(scope="module")
def float32_sources(tmp_path_factory):
    return {name: build(tmp_path_factory.mktemp(f"{name}-fp32")) for name, (build, _) in FAMILIES.items()}


@pytest.mark.parametrize("file_format", ("safetensors", *PICKLE_FORMATS))
@pytest.mark.parametrize("source_dtype", ("bf16", "fp16"))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_half_precision_sources_convert_as_torch_casts(float32_sources, tmp_path, family, source_dtype,
                                                       file_format):
    """bf16 and fp16 checkpoints convert to every weight_data_type exactly as torch casts each source tensor
    (`tensor.to(dtype)`): no detour through a narrower type (bf16 through fp16 would overflow 3e5, say)."""
    source = _save_in(float32_sources[family], tmp_path / "source", DTYPES[source_dtype], file_format)
    tensors = _source_tensors(source)
    assert {tensor.dtype for tensor in tensors.values()} == {DTYPES[source_dtype]}
    config = json.loads((source / "config.json").read_text())
    layers = config.get("num_hidden_layers") or config["n_layer"]
    expected = FAMILIES[family][1](tensors, layers)
    for weight_data_type, dtype in DTYPES.items():
        shards = convert_checkpoint(source, tmp_path / f"out-{weight_data_type}", weight_data_type=weight_data_type)
        written = {path.name for path in shards.glob("*.bin")}
        assert written == set(expected), sorted(written ^ set(expected))
        for name, tensor in expected.items():
            cast = tensor.to(dtype).contiguous().view(torch.uint8).numpy().tobytes()
            assert (shards / name).read_bytes() == cast, (name, weight_data_type)


# -- tied embeddings under either name ---------------------------------------------------------------------------
def _store_embedding_as_output(directory: Path, embedding: str) -> Path:
    """Rewrite model.safetensors with the tied embedding table under `lm_head.weight` only, as some tied
    checkpoints are stored (the input embedding's own name absent)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(directory / "model.safetensors")
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = tensors.pop(embedding)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def _build_neox_tied(directory: Path) -> Path:
    """GPT-NeoX with tie_word_embeddings=true: transformers stores only gpt_neox.embed_in.weight, while the family
    reads an output layer of its own (GPT-NeoX is usually untied)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from family_fixtures import VOCAB, _finish

    torch.manual_seed(5)
    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, rotary_pct=0.5, hidden_act="gelu_new", max_position_embeddings=128,
                           initializer_range=0.2, bos_token_id=END_ID, eos_token_id=END_ID, tie_word_embeddings=True)
    return _finish(GPTNeoXForCausalLM(config).eval(), directory)


def _build_gptj_tied(directory: Path) -> Path:
    """GPT-J with tie_word_embeddings=true: transformers stores transformer.wte.weight and lm_head.bias only."""
    from transformers import GPTJConfig, GPTJForCausalLM

    from family_fixtures import VOCAB, _finish

    torch.manual_seed(6)
    config = GPTJConfig(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=128,
                        initializer_range=0.2, bos_token_id=END_ID, eos_token_id=END_ID, tie_word_embeddings=True)
    return _finish(GPTJForCausalLM(config).eval(), directory)


TIED = {
    # Stored as lm_head.weight alone (input embedding's name absent).
    "llama": lambda d: _store_embedding_as_output(build_llama(d, kv_heads=4, tied=True), "model.embed_tokens.weight"),
    "gpt2": lambda d: _store_embedding_as_output(build_gpt2(d), "transformer.wte.weight"),
    "opt": lambda d: _store_embedding_as_output(build_opt(d), "model.decoder.embed_tokens.weight"),
    # Stored as the input embedding alone, for a family whose tables read an output layer.
    "gpt-neox": _build_neox_tied,
    "gptj": _build_gptj_tied,
}


@pytest.mark.parametrize("family", sorted(TIED))
def test_tied_embedding_stored_under_either_name(tmp_path, family):
    """Regression: a tied checkpoint stored with only `lm_head.weight` failed with "missing tensor
    'embed_tokens.weight'" ('wte.weight' for GPT-2); a tied GPT-NeoX or GPT-J, stored by transformers with only its
    input embedding, failed with "lacks tensors: ['lm_head.weight']". Logits equal transformers' on the same files."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    source = TIED[family](tmp_path / "source")
    with safe_open(source / "model.safetensors", "pt") as handle:
        stored = set(handle.keys())
    assert json.loads((source / "config.json").read_text())["tie_word_embeddings"] is True
    assert len(stored & {"lm_head.weight", "model.embed_tokens.weight", "transformer.wte.weight",
                         "model.decoder.embed_tokens.weight", "gpt_neox.embed_in.weight"}) == 1, stored
    hf = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    ids = torch.tensor([PROMPT])
    with torch.inference_mode():
        reference = hf(ids).logits.float()
    for tp in (1, 2):
        shards = convert_checkpoint(source, tmp_path / f"tp{tp}", ParallelLayout(tp))
        logits = ft_gpt.FTGPT.from_shards(shards, device="cpu").forward_logits(ids.numpy())
        assert (logits - reference).abs().max().item() < 1e-4, tp


def test_untied_checkpoint_without_input_embedding_is_still_refused(tmp_path):
    """The alias is for tied models only: an untied Llama (its own lm_head.weight) lacking embed_tokens is refused,
    naming the missing tensor, and nothing is written."""
    from safetensors.torch import load_file, save_file

    source = build_llama(tmp_path / "source")
    tensors = load_file(source / "model.safetensors")
    assert "lm_head.weight" in tensors
    del tensors["model.embed_tokens.weight"]
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"lacks tensors: \['model\.embed_tokens\.weight'\]"):
        convert_checkpoint(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- damaged or hostile files ------------------------------------------------------------------------------------
def _hostile_pickle(path: Path, marker: Path) -> Path:
    """A pytorch_model.bin whose unpickling calls os.system to create `marker`."""

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"model.embed_tokens.weight": Payload()}, path)
    return path


@pytest.fixture(scope="module")
def healthy_llama(tmp_path_factory):
    return build_llama(tmp_path_factory.mktemp("llama"), n_layer=1)


def _damage(healthy: Path, directory: Path, case: str, marker: Path) -> tuple[Path, list[str]]:
    """A copy of `healthy` damaged as `case`; returns it and the facts the one-line error must name."""
    shutil.copytree(healthy, directory)
    weights = directory / "model.safetensors"
    if case == "truncated safetensors":  # cut inside the data: safetensors' "incomplete metadata"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        return directory, [str(weights), "truncated", "copy or download it again"]
    if case == "truncated safetensors header":
        weights.write_bytes(weights.read_bytes()[:100])
        return directory, [str(weights), "truncated"]
    if case == "malformed config.json":
        (directory / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "hidden_size": 64,\n')
        return directory, [str(directory / "config.json"), "not valid JSON", "line 2 column 1"]
    if case == "hostile pickle":
        weights.unlink()
        _hostile_pickle(directory / "pytorch_model.bin", marker)
        return directory, [str(directory / "pytorch_model.bin"), "system", "safetensors", "nothing from it was run"]
    if case == "missing shard":
        from safetensors import safe_open

        with safe_open(weights, "pt") as handle:
            names = list(handle.keys())
        weight_map = {name: "model-00002-of-00002.safetensors" if i % 2 else "model.safetensors"
                      for i, name in enumerate(names)}
        (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        return directory, [str(directory / "model.safetensors.index.json"), "model-00002-of-00002.safetensors"]
    if case == "unknown architecture":
        config = json.loads((directory / "config.json").read_text())
        config["architectures"] = ["FalconForCausalLM"]
        (directory / "config.json").write_text(json.dumps(config))
        return directory, [str(directory / "config.json"), "'FalconForCausalLM'", "LlamaForCausalLM", "GPT2LMHeadModel"]
    raise AssertionError(case)


DAMAGE = ("truncated safetensors", "truncated safetensors header", "malformed config.json", "hostile pickle",
          "missing shard", "unknown architecture")


@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_or_hostile_source_gets_one_line_through_main(healthy_llama, tmp_path, case):
    """Regression: each of these ended in a traceback from the convert job (SafetensorError "incomplete metadata",
    JSONDecodeError, torch's UnpicklingError advising `weights_only=False` -- i.e. to run the payload --, a
    ValueError for an unknown architecture), after the results directory was made. Now: one CheckpointError line
    naming the file, exit code 1, nothing written, and the pickle's payload never runs."""
    marker = tmp_path / "payload-ran"
    source, facts = _damage(healthy_llama, tmp_path / "source", case, marker)
    results = tmp_path / "results"
    done = subprocess.run([sys.executable, str(ROOT / "main.py"), f"export.model.checkpoint_path={source}",
                           f"base_results_dir={results}"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    lines = [line for line in output.splitlines() if line.strip()]
    assert done.returncode == 1, output
    assert len(lines) == 1 and "CheckpointError: " in lines[0], output
    for fact in facts:
        assert fact in lines[0], (fact, lines[0])
    assert "weights_only" not in lines[0]  # never the advice to load it unsafely
    assert not results.exists()
    assert not marker.exists()


def test_hostile_pickle_payload_is_live(tmp_path):
    """The control for the test above: the same payload, loaded as pickle loads it, does create its marker (so
    the marker's absence there means nothing ran)."""
    marker = tmp_path / "payload-ran"
    path = _hostile_pickle(tmp_path / "pytorch_model.bin", marker)
    torch.load(path, weights_only=False)  # noqa: S614  deliberately unsafe: proves the payload would run
    assert marker.exists()


def _checkpoint_with_pickle(healthy: Path, directory: Path, state: object, **save) -> Path:
    shutil.copytree(healthy, directory)
    (directory / "model.safetensors").unlink()
    torch.save(state, directory / "pytorch_model.bin", **save)
    return directory


def test_pickle_with_a_harmless_non_tensor_global_is_refused_naming_it(healthy_llama, tmp_path):
    """Old training checkpoints pickle their argparse.Namespace beside the weights: refused, naming the global."""
    import argparse

    directory = _checkpoint_with_pickle(healthy_llama, tmp_path / "source",
                                        {"args": argparse.Namespace(lr=1.0), "w": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"'argparse\.Namespace'.*safetensors"):
        HFCheckpoint(directory)


def test_truncated_pickle_is_refused_as_damaged(healthy_llama, tmp_path):
    directory = tmp_path / "source"
    _checkpoint_with_pickle(healthy_llama, directory, {"w": torch.zeros(1000)})
    path = directory / "pytorch_model.bin"
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint.*truncated or damaged"):
        HFCheckpoint(directory)


def test_index_naming_tensors_its_shards_lack_is_refused(healthy_llama, tmp_path):
    """An index from one copy beside shards from another: refused when opened, naming a tensor and its file."""
    directory = tmp_path / "source"
    shutil.copytree(healthy_llama, directory)
    weight_map = {"model.norm.weight": "model.safetensors", "model.not_there.weight": "model.safetensors"}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=r"model\.not_there\.weight \(model\.safetensors\)"):
        HFCheckpoint(directory)


def test_config_without_architectures_is_refused_naming_what_is_supported(healthy_llama, tmp_path):
    from exporter.arch import describe_source

    directory = tmp_path / "source"
    shutil.copytree(healthy_llama, directory)
    config = json.loads((directory / "config.json").read_text())
    del config["architectures"]
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"no 'architectures' entry.*LlamaForCausalLM"):
        describe_source(directory)
