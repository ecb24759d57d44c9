"""HF GPT-2 -> FT shards: the exact file set, sizes and byte layout FT's loader reads, and clear errors on bad input."""

from __future__ import annotations

import configparser
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import build_hf_gpt2
from exporter.arch.gpt2 import GPT2
from exporter.ft.convert import convert_checkpoint
from exporter.parallel import ParallelLayout, ShardingError
from templates.ft_python.ft_checkpoint import CheckpointError

BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
TORCH = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def ft_loader_files(layers: int, hidden: int, inter: int, vocab: int, positions: int, tp: int) -> dict[str, int]:
    """Element counts of every file FT's GPT loader opens, written from its rules (ParallelGptWeight and
    ParallelGptDecoderLayerWeight::loadModel): replicated tensors are `<name>.bin`, split ones `<name>.<rank>.bin`."""
    files = {
        "model.wte.bin": vocab * hidden,
        "model.wpe.bin": positions * hidden,
        "model.final_layernorm.weight.bin": hidden,
        "model.final_layernorm.bias.bin": hidden,
    }
    for layer in range(layers):
        prefix = f"model.layers.{layer}."
        for name in ("input_layernorm.weight", "input_layernorm.bias", "attention.dense.bias",
                     "post_attention_layernorm.weight", "post_attention_layernorm.bias", "mlp.dense_4h_to_h.bias"):
            files[f"{prefix}{name}.bin"] = hidden
        for rank in range(tp):
            files[f"{prefix}attention.query_key_value.weight.{rank}.bin"] = hidden * 3 * hidden // tp
            files[f"{prefix}attention.query_key_value.bias.{rank}.bin"] = 3 * hidden // tp
            files[f"{prefix}attention.dense.weight.{rank}.bin"] = hidden // tp * hidden
            files[f"{prefix}mlp.dense_h_to_4h.weight.{rank}.bin"] = hidden * inter // tp
            files[f"{prefix}mlp.dense_h_to_4h.bias.{rank}.bin"] = inter // tp
            files[f"{prefix}mlp.dense_4h_to_h.weight.{rank}.bin"] = inter // tp * hidden
    return files


def read_raw(path: Path, dtype: str, shape) -> torch.Tensor:
    raw = np.fromfile(path, dtype=np.uint8)
    return torch.from_numpy(raw).view(TORCH[dtype]).reshape(shape)


def nothing_written(out_dir: Path) -> bool:
    return not out_dir.exists() or not any(out_dir.iterdir())


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_file_set_and_sizes_match_ft_loader(tiny_gpt2, tmp_path, tp, dtype):
    shard_dir = convert_checkpoint(tiny_gpt2, tmp_path, ParallelLayout(tp), weight_data_type=dtype)
    assert shard_dir == tmp_path / f"{tp}-gpu"
    expected = {name: count * BYTES[dtype] for name, count in ft_loader_files(2, 64, 256, 50257, 128, tp).items()}
    written = {path.name: path.stat().st_size for path in shard_dir.glob("*.bin")}
    assert written == expected
    assert {"config.ini", "tokenizer.json", "vocab.json", "merges.txt"} <= {p.name for p in shard_dir.iterdir()}

    ini = configparser.ConfigParser()
    ini.read(shard_dir / "config.ini")
    gpt = ini["gpt"]
    assert (gpt["head_num"], gpt["size_per_head"], gpt["inter_size"], gpt["num_layer"]) == ("4", "16", "256", "2")
    assert (gpt["max_pos_seq_len"], gpt["vocab_size"], gpt["start_id"], gpt["end_id"]) == ("128", "50257", "50256", "50256")
    assert gpt["weight_data_type"] == dtype and gpt["tensor_para_size"] == str(tp)
    assert float(gpt["layernorm_eps"]) == pytest.approx(1e-5)
    for key in ("model_name", "layernorm_type", "activation_type", "has_post_decoder_layernorm"):
        assert key in gpt


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_byte_layout_is_ft_layout(tiny_gpt2, tmp_path, dtype):
    """Matrices [in, out] row-major; q/k/v as [h, 3, h/tp] holding whole heads; row splits on the input dim."""
    tp, h, inter = 2, 64, 256
    shard_dir = convert_checkpoint(tiny_gpt2, tmp_path, ParallelLayout(tp), weight_data_type=dtype)
    source = load_file(tiny_gpt2 / "model.safetensors")
    cast = TORCH[dtype]
    qkv = source["transformer.h.1.attn.c_attn.weight"].to(cast).reshape(h, 3, h)  # Conv1D [in, out=q|k|v]
    qkv_bias = source["transformer.h.1.attn.c_attn.bias"].to(cast).reshape(3, h)
    for rank in range(tp):
        cols = slice(rank * h // tp, (rank + 1) * h // tp)
        got = read_raw(shard_dir / f"model.layers.1.attention.query_key_value.weight.{rank}.bin", dtype, (h, 3, h // tp))
        assert torch.equal(got, qkv[:, :, cols])
        got = read_raw(shard_dir / f"model.layers.1.attention.query_key_value.bias.{rank}.bin", dtype, (3, h // tp))
        assert torch.equal(got, qkv_bias[:, cols])
        rows = slice(rank * h // tp, (rank + 1) * h // tp)
        got = read_raw(shard_dir / f"model.layers.1.attention.dense.weight.{rank}.bin", dtype, (h // tp, h))
        assert torch.equal(got, source["transformer.h.1.attn.c_proj.weight"].to(cast)[rows])
        got = read_raw(shard_dir / f"model.layers.1.mlp.dense_h_to_4h.weight.{rank}.bin", dtype, (h, inter // tp))
        assert torch.equal(got, source["transformer.h.1.mlp.c_fc.weight"].to(cast)[:, rank * inter // tp:(rank + 1) * inter // tp])
        got = read_raw(shard_dir / f"model.layers.1.mlp.dense_4h_to_h.weight.{rank}.bin", dtype, (inter // tp, h))
        assert torch.equal(got, source["transformer.h.1.mlp.c_proj.weight"].to(cast)[rank * inter // tp:(rank + 1) * inter // tp])
    assert torch.equal(read_raw(shard_dir / "model.wte.bin", dtype, (50257, h)), source["transformer.wte.weight"].to(cast))
    assert torch.equal(read_raw(shard_dir / "model.final_layernorm.bias.bin", dtype, (h,)), source["transformer.ln_f.bias"].to(cast))


def _all_bytes(shard_dir: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(shard_dir.glob("*.bin"))}


def test_sharded_safetensors_and_pickle_give_identical_shards(tmp_path):
    single = build_hf_gpt2(tmp_path / "single", seed=3)
    sharded = build_hf_gpt2(tmp_path / "sharded", seed=3, max_shard_size="2MB")
    pickle = build_hf_gpt2(tmp_path / "pickle", seed=3, safe_serialization=False)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert (pickle / "pytorch_model.bin").is_file()
    reference = _all_bytes(convert_checkpoint(single, tmp_path / "out-single", ParallelLayout(2), "fp16"))
    assert _all_bytes(convert_checkpoint(sharded, tmp_path / "out-sharded", ParallelLayout(2), "fp16")) == reference
    assert _all_bytes(convert_checkpoint(pickle, tmp_path / "out-pickle", ParallelLayout(2), "fp16")) == reference


def test_parallel_workers_write_the_same_shards(tiny_gpt2, tmp_path):
    serial = _all_bytes(convert_checkpoint(tiny_gpt2, tmp_path / "serial", ParallelLayout(2), "fp32", processes=1))
    parallel = _all_bytes(convert_checkpoint(tiny_gpt2, tmp_path / "parallel", ParallelLayout(2), "fp32", processes=2))
    assert parallel == serial


def test_missing_path_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="does-not-exist"):
        convert_checkpoint(tmp_path / "does-not-exist", tmp_path / "out")
    assert nothing_written(tmp_path / "out")


def test_heads_not_divisible_by_tp_fails_before_writing(tiny_gpt2, tmp_path):
    with pytest.raises(ShardingError, match="head_num 4 is not divisible by tensor_para_size 3"):
        convert_checkpoint(tiny_gpt2, tmp_path / "out", ParallelLayout(3))
    assert nothing_written(tmp_path / "out")


def test_unsupported_dtype_fails_before_writing(tiny_gpt2, tmp_path):
    with pytest.raises(ValueError, match="fp8"):
        convert_checkpoint(tiny_gpt2, tmp_path / "out", weight_data_type="fp8")
    assert nothing_written(tmp_path / "out")


def _edit_checkpoint(source: Path, destination: Path, edit) -> Path:
    import shutil

    shutil.copytree(source, destination)
    tensors = load_file(destination / "model.safetensors")
    edit(tensors)
    save_file(tensors, destination / "model.safetensors", metadata={"format": "pt"})
    return destination


def test_missing_tensor_is_named(tiny_gpt2, tmp_path):
    broken = _edit_checkpoint(tiny_gpt2, tmp_path / "broken", lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"))
    with pytest.raises(CheckpointError, match=r"transformer\.h\.1\.mlp\.c_fc\.bias"):
        convert_checkpoint(broken, tmp_path / "out")
    assert nothing_written(tmp_path / "out")


def test_unknown_tensor_is_named(tiny_gpt2, tmp_path):
    def add(tensors):
        tensors["transformer.h.0.attn.rotary_inv_freq"] = torch.zeros(8)

    broken = _edit_checkpoint(tiny_gpt2, tmp_path / "broken", add)
    with pytest.raises(CheckpointError, match=r"transformer\.h\.0\.attn\.rotary_inv_freq"):
        convert_checkpoint(broken, tmp_path / "out")
    assert nothing_written(tmp_path / "out")


def test_checkpoint_without_tokenizer_fails_before_writing(tiny_gpt2, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(tiny_gpt2, bare)
    (bare / "vocab.json").unlink()
    with pytest.raises(ValueError, match="no tokenizer"):
        convert_checkpoint(bare, tmp_path / "out")
    assert nothing_written(tmp_path / "out")


@pytest.mark.parametrize("processes", [1, 2])
def test_failure_mid_write_leaves_no_finished_export(tiny_gpt2, tmp_path, monkeypatch, processes):
    """A worker's exception reaches the caller, and no `<tp>-gpu` (nor a partial directory) is left behind."""
    original = GPT2.to_ft

    def failing(self, ft_name, tensor):
        if ft_name.startswith("model.layers.1."):
            raise RuntimeError("disk on fire while writing layer 1")
        return original(self, ft_name, tensor)

    monkeypatch.setattr(GPT2, "to_ft", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        convert_checkpoint(tiny_gpt2, tmp_path / "out", ParallelLayout(2), processes=processes)
    assert nothing_written(tmp_path / "out")


def test_interrupt_keeps_the_previous_export(tiny_gpt2, tmp_path, monkeypatch):
    shard_dir = convert_checkpoint(tiny_gpt2, tmp_path, ParallelLayout(1))
    before = _all_bytes(shard_dir)

    def interrupted(self, ft_name, tensor):
        raise KeyboardInterrupt

    monkeypatch.setattr(GPT2, "to_ft", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(tiny_gpt2, tmp_path, ParallelLayout(1), weight_data_type="fp16")
    assert _all_bytes(shard_dir) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1-gpu"]
