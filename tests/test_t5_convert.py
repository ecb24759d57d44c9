"""HF T5 -> FT's T5 layout: every written file's bytes equal the HF tensor transformed by FT's own converter's rules,
at TP 1 and 2, fp32 and fp16; bad sources are refused before anything is written, naming the key.

The expected files are computed here with numpy from the safetensors file (safetensors' numpy loader, not this
project's reader), following FasterTransformer's examples/pytorch/t5/utils/huggingface_t5_ckpt_convert.py
(NVIDIA/FasterTransformer df4a7534): `split_and_convert_process` for every state_dict tensor, `fuse_decoder_qkv`
for the decoder's self-attention. The state_dict of a tied T5 also holds `lm_head.weight` (= shared.weight), which
FT's converter writes.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from family_fixtures import build_t5

from exporter.arch import describe_source
from exporter.ft.convert import convert_checkpoint
from exporter.parallel import ParallelLayout, ShardingError
from templates.ft_python.ft_checkpoint import CheckpointError
from templates.ft_python.ft_t5_checkpoint import T5Config, load_weights, verify

NUMPY_TYPES = {"fp32": np.float32, "fp16": np.float16}
VARIANTS = {"relu-tied": {}, "gated-untied": {"gated": True}}


def ft_converter_files(checkpoint: Path, tp: int) -> dict[str, np.ndarray]:
    """{file name: array} as FT's huggingface_t5_ckpt_convert.py writes them (float32; cast by the caller)."""
    state = load_file(checkpoint / "model.safetensors")
    if "lm_head.weight" not in state:  # tied: the model's state_dict holds the embedding under this name too
        state["lm_head.weight"] = state["shared.weight"]
    files: dict[str, np.ndarray] = {}

    def split(key: str, value: np.ndarray, axis: int) -> None:
        for rank, piece in enumerate(np.split(value, tp, axis=axis)):
            files[f"{key}.{rank}.bin"] = piece

    for key, value in state.items():
        value = value.T if value.ndim == 2 else value  # every 2-D tensor transposed first
        if "shared.weight" in key:
            files[f"{key}.bin"], files[f"{key}_T.bin"] = value, value.T
        elif "lm_head.weight" in key:
            files[f"{key}.bin"] = value.T  # transposed back ("TN gemm")
        elif "layer_norm.weight" in key:
            files[f"{key}.bin"] = value
        elif any(name in key for name in ("SelfAttention.o.weight", "EncDecAttention.o.weight",
                                           "DenseReluDense.wo.weight")):
            split(key, value, 0)
        elif "DenseReluDense.wi.weight" in key or ("encoder" in key and any(
                f"SelfAttention.{n}.weight" in key for n in "qkv")) or any(
                f"EncDecAttention.{n}.weight" in key for n in "qkv"):
            split(key, value, -1)
        elif "DenseReluDense.wi_0.weight" in key or "DenseReluDense.wi_1.weight" in key:
            split(key.replace("wi_0", "wi").replace("wi_1", "wi2"), value, -1)
        elif "relative_attention_bias" in key:
            split(key, value, 0)
        elif "decoder" in key and any(f"SelfAttention.{n}.weight" in key for n in "qkv"):
            pass  # fused below
        elif "embed_tokens" in key:
            pass  # "using shared.weight directly"
        else:
            raise AssertionError(f"FT's converter would not know {key}")
    layers = json.loads((checkpoint / "config.json").read_text())["num_decoder_layers"]
    for i in range(layers):
        prefix = f"decoder.block.{i}.layer.0.SelfAttention."
        q, k, v = (state[f"{prefix}{n}.weight"].T for n in "qkv")
        qkv = np.concatenate([q, k, v], axis=-1).reshape(q.shape[0], 3, q.shape[1])
        split(f"decoder.block.{i}.layer.0.SelfAttention.qkv.weight", qkv, -1)
    return files


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("t5")
    return {name: build_t5(root / name, **options) for name, options in VARIANTS.items()}


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_files_equal_ft_converter_output(checkpoints, tmp_path, variant, tp, dtype):
    checkpoint = checkpoints[variant]
    shard_dir = convert_checkpoint(checkpoint, tmp_path, ParallelLayout(tp), dtype)
    assert shard_dir == tmp_path / f"{tp}-gpu"
    expected = ft_converter_files(checkpoint, tp)
    written = {path.name for path in shard_dir.glob("*.bin")}
    assert written == set(expected), (sorted(written ^ set(expected)))
    for name, array in expected.items():
        assert (shard_dir / name).read_bytes() == np.ascontiguousarray(array.astype(NUMPY_TYPES[dtype])).tobytes(), \
            name
    assert (shard_dir / "config.ini").is_file() and (shard_dir / "generation_config.json").is_file()


def test_config_ini_round_trip_and_merge(checkpoints, tmp_path):
    """The runtime's reader (ft_t5_checkpoint) parses what the exporter wrote into the HF config's values, and its
    TP merge gives back HF's tensors."""
    checkpoint = checkpoints["gated-untied"]
    shard_dir = convert_checkpoint(checkpoint, tmp_path, ParallelLayout(2), "fp32")
    config = verify(shard_dir)
    hf = json.loads((checkpoint / "config.json").read_text())
    assert (config.num_heads, config.d_kv, config.d_model, config.d_ff, config.vocab_size) == \
        (hf["num_heads"], hf["d_kv"], hf["d_model"], hf["d_ff"], hf["vocab_size"])
    assert (config.encoder_num_layers, config.decoder_num_layers) == (hf["num_layers"], hf["num_decoder_layers"])
    assert config.relative_attention_num_buckets == hf["relative_attention_num_buckets"]
    assert config.relative_attention_max_distance == hf["relative_attention_max_distance"]
    assert (config.feed_forward_proj, config.gated, config.scale_decoder_output) == ("gated-gelu", True, False)
    assert config.tensor_para_size == 2
    weights = load_weights(shard_dir)
    state = load_file(checkpoint / "model.safetensors")
    np.testing.assert_array_equal(weights["lm_head.weight"].numpy(), state["lm_head.weight"])
    qkv = weights["decoder.block.1.layer.0.SelfAttention.qkv.weight"].numpy()
    for index, name in enumerate("qkv"):
        np.testing.assert_array_equal(qkv[:, index], state[f"decoder.block.1.layer.0.SelfAttention.{name}.weight"].T)
    np.testing.assert_array_equal(
        weights["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].numpy(),
        state["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].T)
    assert T5Config.from_text((shard_dir / "config.ini").read_text()) == config


def test_relu_t5_scales_decoder_output(checkpoints, tmp_path):
    config = verify(convert_checkpoint(checkpoints["relu-tied"], tmp_path, ParallelLayout(1), "fp32"))
    assert (config.feed_forward_proj, config.gated, config.scale_decoder_output) == ("relu", False, True)


def test_describe_source_and_ft_model_type(checkpoints):
    model = describe_source(checkpoints["relu-tied"])
    assert (model.name, model.section, model.ft_model_type, model.model_kind) == \
        ("T5ForConditionalGeneration", "t5", "T5", "encoder-decoder")
    # FT's T5TritonModel fixes max_distance at 128; the fixture uses 16
    assert "relative_attention_max_distance" in model.ft_unsupported


# -- refusals: one error naming the key, nothing written ----------------------------------------------------------

def _copy(checkpoint: Path, directory: Path, config_changes: dict | None = None, drop: str | None = None,
          add: str | None = None) -> Path:
    directory.mkdir()
    config = json.loads((checkpoint / "config.json").read_text())
    config.update(config_changes or {})
    (directory / "config.json").write_text(json.dumps(config))
    state = load_file(checkpoint / "model.safetensors")
    if drop:
        del state[drop]
    if add:
        state[add] = np.zeros(4, dtype=np.float32)
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def _assert_refused(source: Path, out: Path, error: type, words: tuple[str, ...], tp: int = 1) -> None:
    with pytest.raises(error) as raised:
        convert_checkpoint(source, out, ParallelLayout(tp))
    for word in words:
        assert word in str(raised.value)
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


@pytest.mark.parametrize("value", ["gated-silu", "gelu", "gated-relu"])
def test_unsupported_feed_forward_proj_refused(checkpoints, tmp_path, value):
    source = _copy(checkpoints["relu-tied"], tmp_path / "src", {"feed_forward_proj": value})
    _assert_refused(source, tmp_path / "out", CheckpointError, ("feed_forward_proj", value))


def test_not_encoder_decoder_refused(checkpoints, tmp_path):
    source = _copy(checkpoints["relu-tied"], tmp_path / "src", {"is_encoder_decoder": False})
    _assert_refused(source, tmp_path / "out", CheckpointError, ("is_encoder_decoder",))


def test_heads_not_divisible_by_tp_refused(checkpoints, tmp_path):
    _assert_refused(checkpoints["relu-tied"], tmp_path / "out", ShardingError, ("num_heads", "3"), tp=3)


def test_missing_tensor_refused(checkpoints, tmp_path):
    name = "decoder.block.1.layer.1.EncDecAttention.k.weight"
    source = _copy(checkpoints["gated-untied"], tmp_path / "src", drop=name)
    _assert_refused(source, tmp_path / "out", CheckpointError, (name,))


def test_untied_config_without_lm_head_refused(checkpoints, tmp_path):
    source = _copy(checkpoints["gated-untied"], tmp_path / "src", drop="lm_head.weight")
    _assert_refused(source, tmp_path / "out", CheckpointError, ("lm_head.weight",))


def test_unknown_tensor_refused(checkpoints, tmp_path):
    source = _copy(checkpoints["relu-tied"], tmp_path / "src", add="encoder.block.0.layer.0.SelfAttention.q.bias")
    _assert_refused(source, tmp_path / "out", CheckpointError, ("encoder.block.0.layer.0.SelfAttention.q.bias",))


# -- the export stage: as far as the pipeline goes for encoder-decoder models -----------------------------------

def test_export_without_tokenizer_is_refused_before_writing(checkpoints, tmp_path):
    """An encoder-decoder repository needs the checkpoint's tokenizer for pre/postprocessing: a checkpoint without
    one is refused before anything is written (before, the shards were written and the export stopped after)."""
    from exporter.runtimes import ModelSettings
    from exporter.stages.export import build_repository
    from exporter.tokenizer import TokenizerError

    settings = ModelSettings(name="t5", runtime="python", max_batch_size=4, layout=ParallelLayout(2),
                             data_type="fp32")
    with pytest.raises(TokenizerError, match="spiece.model"):
        build_repository(tmp_path / "repo", checkpoints["gated-untied"], settings, "fp32")
    assert not (tmp_path / "repo").exists()


def test_export_with_ft_runtime_builds_the_t5_repository(checkpoints, tmp_path):
    """FT's backend serves the shards (model_type "T5") behind the same text ensemble as the python runtime (FT's
    T5 tensors): shards, its config.pbtxt, preprocessing, postprocessing and the ensemble."""
    from test_t5_e2e import train_spiece

    from exporter.runtimes import ModelSettings
    from exporter.stages.export import build_repository

    source = _copy(checkpoints["relu-tied"], tmp_path / "src", {"relative_attention_max_distance": 128})
    for file in train_spiece(tmp_path / "tokenizer").iterdir():
        (source / file.name).write_bytes(file.read_bytes())
    settings = ModelSettings(name="t5", runtime="fastertransformer", max_batch_size=4, layout=ParallelLayout(1),
                             data_type="fp16")
    repo = build_repository(tmp_path / "repo", source, settings, "fp16")
    assert 'string_value: "T5"' in (repo / "t5" / "config.pbtxt").read_text()
    assert verify(repo / "t5" / "1" / "1-gpu").weight_data_type == "fp16"
    assert sorted(path.name for path in repo.iterdir()) == ["ensemble", "postprocessing", "preprocessing", "t5"]
    assert 'model_name: "t5"' in (repo / "ensemble" / "config.pbtxt").read_text()


def test_ft_runtime_refuses_t5_it_would_compute_differently(checkpoints):
    """FT's T5 backend fixes relative_attention_max_distance at 128: a source with 16 is refused up front."""
    from exporter.runtimes import runtime_for

    with pytest.raises(CheckpointError, match="relative_attention_max_distance 16"):
        runtime_for("fastertransformer").check_source(checkpoints["relu-tied"])


def test_reads_config_ini_as_ft_converter_writes_it(checkpoints, tmp_path):
    """A shard directory made by FT's own converter (seed 003's route) has its config.ini: HF's encoder and decoder
    sub-configs' to_dict() as text, relative_attention_num_buckets renamed, [structure], no tensor_para_size. The
    runtime's reader takes the split from the `<tp>-gpu` name and reads the same model."""
    import configparser

    from transformers import T5ForConditionalGeneration

    checkpoint = checkpoints["relu-tied"]
    shard_dir = convert_checkpoint(checkpoint, tmp_path, ParallelLayout(2), "fp32")
    ours = verify(shard_dir)
    model = T5ForConditionalGeneration.from_pretrained(checkpoint)
    parser = configparser.ConfigParser()
    for section, sub_config in (("encoder", model.encoder.config), ("decoder", model.decoder.config)):
        parser[section] = {key: f"{value}" for key, value in sub_config.to_dict().items()}
        parser[section]["weight_data_type"] = "fp32"
        parser[section]["relative_attention_num_buckets_or_max_pos_seq_len"] = \
            parser[section].pop("relative_attention_num_buckets")
    parser["structure"] = {"t5_with_bias": "false", "use_gated_activation": "false",
                           "position_embedding_type": "relative"}
    with open(shard_dir / "config.ini", "w") as handle:
        parser.write(handle)
    theirs = verify(shard_dir)
    assert theirs.tensor_para_size == 2
    assert replace(theirs, name_or_path="", pipeline_para_size=1) == replace(ours, name_or_path="")


def test_pipeline_split_of_encoder_refused(checkpoints, tmp_path):
    """FT's T5 encoder requires its layers to divide evenly over pipeline stages (FT_CHECK in T5EncoderWeight)."""
    with pytest.raises(ShardingError, match="num_layers 2 .encoder. is not divisible by pipeline_para_size 3"):
        convert_checkpoint(checkpoints["relu-tied"], tmp_path / "out", ParallelLayout(1, 3))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_bf16_and_parallel_writer(checkpoints, tmp_path):
    """weight_data_type bf16 (FT's getModelFileType reads it; FT's own converter writes fp32/fp16 only): each file
    is the HF tensor in bfloat16 (torch's cast of the numpy reference), written by two worker processes."""
    import torch

    checkpoint = checkpoints["gated-untied"]
    shard_dir = convert_checkpoint(checkpoint, tmp_path, ParallelLayout(2), "bf16", processes=2)
    expected = ft_converter_files(checkpoint, 2)
    assert {path.name for path in shard_dir.glob("*.bin")} == set(expected)
    for name, array in expected.items():
        as_bf16 = torch.from_numpy(np.ascontiguousarray(array)).to(torch.bfloat16)
        assert (shard_dir / name).read_bytes() == as_bf16.view(torch.int16).numpy().tobytes(), name
    assert verify(shard_dir).weight_data_type == "bf16"
