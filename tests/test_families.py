"""Every family in-process: convert at TP 1 and 2, run the python runtime, compare with HF transformers.

Reference: HF transformers' own forward pass and greedy `generate` on the same tiny seeded checkpoints.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from exporter.ft.convert import convert_checkpoint
from conftest import generate
from exporter.parallel import ParallelLayout
from family_fixtures import END_ID, FIXTURES
from templates.ft_python import ft_checkpoint, ft_gpt

# HF families (NeMo, whose reference is NeMo's own outputs, is tested in test_nemo.py).
VARIANTS = [(arch, name) for arch, fixture in FIXTURES.items() for name in fixture.variants
            if arch != "GPT2LMHeadModel" and fixture.reference is None]
PROMPTS = [[464, 2068, 7586, 21831, 18045, 625, 262], [40, 1101, 257], [15496, 11, 616, 1438, 318, 3271]]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    built = {}

    def get(arch, name):
        if (arch, name) not in built:
            built[arch, name] = FIXTURES[arch].variants[name](tmp_path_factory.mktemp(name))
        return built[arch, name]

    return get


@pytest.fixture(scope="module")
def exported(checkpoints, tmp_path_factory):
    done = {}

    def get(arch, name, tp, pp=1, dtype="fp32"):
        key = (arch, name, tp, pp, dtype)
        if key not in done:
            out = tmp_path_factory.mktemp(f"{name}-tp{tp}-pp{pp}-{dtype}")
            done[key] = convert_checkpoint(checkpoints(arch, name), out, ParallelLayout(tp, pp), weight_data_type=dtype)
        return done[key]

    return get


def _hf(checkpoint):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


def _hf_greedy(model, prompt, new_tokens):
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=new_tokens, do_sample=False, num_beams=1, pad_token_id=END_ID,
                             eos_token_id=END_ID)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch,name", VARIANTS)
def test_logits_and_greedy_match_hf(checkpoints, exported, arch, name):
    hf = _hf(checkpoints(arch, name))
    ids = torch.tensor([PROMPTS[0]])
    with torch.inference_mode():
        reference = hf(ids).logits.float()
    expected = [_hf_greedy(hf, prompt, NEW_TOKENS) for prompt in PROMPTS]
    for tp in (1, 2):
        model = ft_gpt.FTGPT.from_shards(exported(arch, name, tp), device="cpu")
        logits = model.forward_logits(ids.numpy())
        assert (logits - reference).abs().max().item() < 1e-4, (name, tp)
        # A ragged batch, right-padded as Triton delivers it, against each prompt generated alone by HF.
        lengths = np.array([len(p) for p in PROMPTS])
        padded = np.full((len(PROMPTS), lengths.max()), END_ID)
        for row, prompt in enumerate(PROMPTS):
            padded[row, : len(prompt)] = prompt
        out = generate(model, padded, lengths, NEW_TOKENS)
        for row, prompt in enumerate(PROMPTS):
            got = out.output_ids[row, 0, len(prompt): len(prompt) + NEW_TOKENS].tolist()
            got = got[: out.sequence_length[row, 0].item() - len(prompt)]
            assert got == expected[row][: len(got)] and len(got) == len(expected[row]), (name, tp, row)


@pytest.mark.parametrize("arch,name", [("OPTForCausalLM", "opt-350m-like"), ("LlamaForCausalLM", "llama-gqa"),
                                       ("GPTNeoXForCausalLM", "neox-parallel")])
def test_tp_shards_merge_to_the_same_weights(exported, arch, name):
    one = ft_checkpoint.load_weights(exported(arch, name, 1))
    two = ft_checkpoint.load_weights(exported(arch, name, 2))
    assert one.keys() == two.keys()
    for key in one:
        # NeoX biases are stored divided by TP and multiplied back: equal up to fp32 rounding.
        torch.testing.assert_close(one[key], two[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("arch,name", VARIANTS)
def test_config_ini_reads_back_to_the_same_text(exported, arch, name):
    """One schema: the runtime's FTConfig reads every key the exporter wrote, and writes the same bytes back."""
    shard = exported(arch, name, 2)
    text = (shard / "config.ini").read_text()
    assert ft_checkpoint.read_config(shard).to_ini() == text
    assert ft_checkpoint.FTConfig.from_text(text) == ft_checkpoint.read_config(shard)


@pytest.mark.parametrize("arch,name", VARIANTS)
def test_describe_source_matches_the_export(checkpoints, exported, arch, name):
    """describe_source, from config.json alone, names the architecture and the section its export gets."""
    from exporter.arch import describe_source
    from exporter.readers.source import SourceKind

    source = describe_source(checkpoints(arch, name))
    assert (source.kind, source.name) == (SourceKind.HF, arch)
    assert source.section == ft_checkpoint.read_config(exported(arch, name, 2)).section


def test_opt_layout_is_fts(checkpoints, exported):
    """FT's OPT: position rows 2.., lm_head always written, post-layernorm keys, no final layernorm for 350m."""
    from safetensors.torch import load_file

    shard = exported("OPTForCausalLM", "opt-350m-like", 1)
    config = ft_checkpoint.read_config(shard)
    assert config["section"] == "gpt" and config["layernorm_type"] == "post_layernorm"
    assert config["activation_type"] == "Relu" and config["has_post_decoder_layernorm"] is False
    assert config["tensor_para_size"] == 1 and "layernorm_eps" in config
    state = load_file(checkpoints("OPTForCausalLM", "opt-350m-like") / "model.safetensors")
    wpe = np.fromfile(shard / "model.wpe.bin", dtype=np.float32).reshape(128, 64)
    np.testing.assert_array_equal(wpe, state["model.decoder.embed_positions.weight"][2:].numpy())
    embed = state["model.decoder.embed_tokens.weight"]
    wte = np.fromfile(shard / "model.wte.bin", dtype=np.float32).reshape(-1, 64)
    np.testing.assert_allclose(wte, (embed @ state["model.decoder.project_in.weight"].t()).numpy(), atol=1e-6)
    assert (shard / "model.lm_head.weight.bin").is_file()
    pre = exported("OPTForCausalLM", "opt-pre-ln", 1)
    assert ft_checkpoint.read_config(pre)["layernorm_type"] == "pre_layernorm"
    assert (pre / "model.lm_head.weight.bin").is_file() and (pre / "model.final_layernorm.bias.bin").is_file()


def test_gptj_layout_is_fts(exported):
    shard = exported("GPTJForCausalLM", "gptj", 2, dtype="fp16")
    config = ft_checkpoint.read_config(shard)
    assert config["section"] == "gptj" and config["rotary_embedding"] == 8 and config["weight_data_type"] == "fp16"
    names = {p.name for p in shard.glob("*.bin")}
    assert {"model.lm_head.weight.bin", "model.lm_head.bias.bin"} <= names
    assert "model.layers.0.attention.query_key_value.weight.1.bin" in names
    assert not any("query_key_value.bias" in n or "attention.dense.bias" in n or "post_attention" in n for n in names)


def test_neox_parallel_residual_bias_sum(checkpoints, exported):
    """FT NeoX with use_gptj_residual reads one summed output bias, stored divided by TP (FT's converter)."""
    from safetensors.torch import load_file

    shard = exported("GPTNeoXForCausalLM", "neox-parallel", 2)
    config = ft_checkpoint.read_config(shard)
    assert config["section"] == "gptneox" and config["use_gptj_residual"] is True and config["rotary_embedding"] == 8
    state = load_file(checkpoints("GPTNeoXForCausalLM", "neox-parallel") / "model.safetensors")
    stored = np.fromfile(shard / "model.layers.0.mlp.attention.bias.sum.bin", dtype=np.float32)
    expected = (state["gpt_neox.layers.0.attention.dense.bias"] + state["gpt_neox.layers.0.mlp.dense_4h_to_h.bias"]) / 2
    np.testing.assert_allclose(stored, expected.numpy(), atol=1e-6)
    assert not (shard / "model.layers.0.attention.dense.bias.bin").exists()


def test_gqa_rank_files_hold_whole_kv_groups(checkpoints, exported):
    """Rank r's qkv file is [h, q_r | k_r | v_r] with q heads r*2..r*2+1 and kv head r (4 q heads, 2 kv heads)."""
    from safetensors.torch import load_file

    shard = exported("LlamaForCausalLM", "llama-gqa", 2)
    assert ft_checkpoint.read_config(shard)["kv_head_num"] == 2
    state = load_file(checkpoints("LlamaForCausalLM", "llama-gqa") / "model.safetensors")
    prefix = "model.layers.1.self_attn."
    q, k, v = (state[prefix + f"{p}_proj.weight"] for p in "qkv")  # [4*16, 64], [2*16, 64], [2*16, 64]
    for rank in range(2):
        piece = np.fromfile(shard / f"model.layers.1.attention.query_key_value.weight.{rank}.bin", dtype=np.float32)
        piece = torch.from_numpy(piece).view(64, 64)  # [h, (2 + 1 + 1) * 16]
        expected = torch.cat([q[rank * 32:(rank + 1) * 32], k[rank * 16:(rank + 1) * 16],
                              v[rank * 16:(rank + 1) * 16]]).t()
        assert torch.equal(piece, expected), rank
    gate = np.fromfile(shard / "model.layers.0.mlp.dense_h_to_4h.weight.1.bin", dtype=np.float32).reshape(64, 48)
    np.testing.assert_array_equal(gate, state["model.layers.0.mlp.gate_proj.weight"][48:].t().numpy())
    assert not list(shard.glob("*layernorm.bias*"))


def test_more_ranks_than_kv_heads_replicate_each_kv_head(checkpoints, exported):
    """TP=4 with 2 kv heads: each rank holds its q head and the one kv head it reads (ranks 0,1: kv 0; 2,3: kv 1)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    checkpoint = checkpoints("LlamaForCausalLM", "llama-gqa")
    shard = exported("LlamaForCausalLM", "llama-gqa", 4)
    state = load_file(checkpoint / "model.safetensors")
    q, k, v = (state[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv")
    for rank in range(4):
        piece = np.fromfile(shard / f"model.layers.0.attention.query_key_value.weight.{rank}.bin", dtype=np.float32)
        kv = rank // 2
        expected = torch.cat([q[rank * 16:(rank + 1) * 16], k[kv * 16:(kv + 1) * 16], v[kv * 16:(kv + 1) * 16]]).t()
        assert torch.equal(torch.from_numpy(piece).view(64, 48), expected), rank
    model = ft_gpt.FTGPT.from_shards(shard)
    hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.inference_mode():
        reference = hf(torch.tensor([PROMPTS[0]])).logits
    assert (model.forward_logits([PROMPTS[0]]) - reference).abs().max().item() < 1e-4


def test_kv_heads_and_tp_that_do_not_divide_fail_before_writing(tmp_path):
    from exporter.parallel import ParallelLayout, ShardingError

    with pytest.raises(ShardingError, match="kv_head_num 3 and tensor_para_size 2: one must divide the other"):
        ParallelLayout(2, 1, 4).check(head_num=12, kv_head_num=3, inter_size=64)
    with pytest.raises(ShardingError, match="inter_size 90 is not divisible by tensor_para_size 4"):
        ParallelLayout(4, 1, 4).check(head_num=4, kv_head_num=4, inter_size=90)


def test_mistral_sliding_window_is_exceeded_and_honoured(checkpoints, exported):
    """The Mistral fixture's prompts plus output run past its window (5), so the greedy parity above checks the
    window's keys being masked during cached decoding; without the window the logits leave HF's."""
    import dataclasses

    hf = _hf(checkpoints("MistralForCausalLM", "mistral-window"))
    window = hf.config.sliding_window
    assert all(len(prompt) + NEW_TOKENS > window for prompt in PROMPTS)
    shard = exported("MistralForCausalLM", "mistral-window", 2)
    config = ft_checkpoint.read_config(shard)
    assert (config.sliding_window, config.sliding_window_layers) == (window, "0,1")
    ids = torch.tensor([PROMPTS[0] + PROMPTS[2]])  # 13 tokens
    with torch.inference_mode():
        reference = hf(ids).logits
    weights = ft_checkpoint.load_weights(shard)
    windowed = ft_gpt.FTGPT(weights, config).forward_logits(ids.numpy())
    assert (windowed - reference).abs().max().item() < 1e-4
    full = ft_gpt.FTGPT(weights, dataclasses.replace(config, sliding_window=0)).forward_logits(ids.numpy())
    assert (full - reference).abs().max().item() > 1e-2


def test_qwen2_layout_qkv_biases_and_windowed_layers(exported):
    """Qwen2: q/k/v biases but no o_proj bias file; with use_sliding_window only layers >= max_window_layers (1)
    get the window."""
    shard = exported("Qwen2ForCausalLM", "qwen2-window", 2)
    config = ft_checkpoint.read_config(shard)
    assert (config.attention_bias, config.attention_output_bias, config.mlp_bias) == (True, False, False)
    assert (config.sliding_window, config.sliding_window_layers) == (4, "1,2")
    names = {path.name for path in shard.glob("*.bin")}
    assert "model.layers.0.attention.query_key_value.bias.1.bin" in names
    assert not any("attention.dense.bias" in name for name in names)
    plain = ft_checkpoint.read_config(exported("Qwen2ForCausalLM", "qwen2", 1))
    assert (plain.sliding_window, plain.sliding_window_layers) == (0, "")


def test_qwen2_unknown_layer_type_is_refused_before_writing(checkpoints, tmp_path):
    import json
    import shutil

    from templates.ft_python.ft_checkpoint import CheckpointError

    source = tmp_path / "chunked"
    shutil.copytree(checkpoints("Qwen2ForCausalLM", "qwen2-window"), source)
    config = json.loads((source / "config.json").read_text())
    config["layer_types"] = ["full_attention", "chunked_attention", "sliding_attention"]
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"layer_types .* is not supported: 3 entries, each one of "
                                              r"\['full_attention', 'sliding_attention'\]"):
        convert_checkpoint(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_gemma_qwen3_phi3_quirks_reach_config_ini(checkpoints, exported):
    """What the parity above depends on, written where the runtime reads it: Gemma's sqrt(h) embedding multiplier,
    (1 + w) norms and 32-wide heads on a 64-wide model; Qwen3's per-head q/k norms; Phi-3's fused matrices split into
    gate and up, half-head rotary and window."""
    from safetensors.torch import load_file

    gemma = exported("GemmaForCausalLM", "gemma-mqa", 2)
    config = ft_checkpoint.read_config(gemma)
    assert (config.embedding_multiplier, config.hidden_units, config.size_per_head, config.kv_head_num) == (8.0, 64, 32, 1)
    assert (config.activation_type, config.gelu_approximation) == ("GeGLU", "tanh")
    state = load_file(checkpoints("GemmaForCausalLM", "gemma-mqa") / "model.safetensors")
    stored = np.fromfile(gemma / "model.layers.1.input_layernorm.weight.bin", dtype=np.float32)
    np.testing.assert_array_equal(stored, (state["model.layers.1.input_layernorm.weight"] + 1).numpy())
    assert not (gemma / "model.lm_head.weight.bin").exists()

    qwen3 = exported("Qwen3ForCausalLM", "qwen3-head-dim", 1)
    assert ft_checkpoint.read_config(qwen3).qk_norm
    assert (qwen3 / "model.layers.1.attention.k_layernorm.weight.bin").stat().st_size == 32 * 4

    phi3 = exported("Phi3ForCausalLM", "phi3-partial-window", 2)
    config = ft_checkpoint.read_config(phi3)
    assert (config.rotary_embedding, config.sliding_window, config.sliding_window_layers) == (8, 6, "0,1")
    assert all(len(prompt) + NEW_TOKENS > config.sliding_window for prompt in PROMPTS)
    state = load_file(checkpoints("Phi3ForCausalLM", "phi3-partial-window") / "model.safetensors")
    up = np.fromfile(phi3 / "model.layers.0.mlp.dense_h_to_4h_2.weight.0.bin", dtype=np.float32).reshape(64, 48)
    np.testing.assert_array_equal(up, state["model.layers.0.mlp.gate_up_proj.weight"][96:144].t().numpy())
