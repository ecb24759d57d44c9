"""Pipeline parallelism and the FT-backend refusal.

Stage rule pinned here: FT's C++ weight loaders (`isValidLayerParallelId`: ceil(layers / pp) layers per stage, the
last stages take what is left) — the rule FT's Triton backend runs. FT's Python example loaders instead compute
`layers // pp` per stage and require `layers % pp == 0`; for uneven counts the two disagree, and we follow C++.
"""

from __future__ import annotations

import pytest
import torch

from exporter.ft.convert import convert_checkpoint
from exporter.parallel import ParallelLayout, ShardingError
from conftest import generate
from family_fixtures import build_llama
from templates.ft_python import ft_checkpoint, ft_gpt
from test_config import composed

IDS = [[464, 2068, 7586, 21831, 18045, 625, 262, 16931]]


def test_stage_layers_follow_fts_cpp_rule():
    # 5 layers on 2 stages: C++ gives 3 + 2 (Python's layers // pp would give 2 + 2 and drop layer 4).
    assert [list(ft_checkpoint.stage_layers(5, 2, s)) for s in range(2)] == [[0, 1, 2], [3, 4]]
    assert [list(ft_checkpoint.stage_layers(7, 3, s)) for s in range(3)] == [[0, 1, 2], [3, 4, 5], [6]]
    assert [list(ParallelLayout(1, 4, 8).stage_layers(s)) for s in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_layout_leaving_a_stage_empty_is_refused():
    # 6 layers on 4 stages: ceil(6/4) = 2 per stage -> 2, 2, 2, 0.
    with pytest.raises(ShardingError, match=r"stages of \[2, 2, 2, 0\] layers, leaving stage\(s\) \[3\] empty"):
        ParallelLayout(1, 4, 6).check(head_num=4)
    with pytest.raises(ShardingError, match="exceeds the model's 2 layers"):
        ParallelLayout(1, 3, 2).check(head_num=4)


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    return build_llama(tmp_path_factory.mktemp("llama3"), n_layer=3)


def test_pp_export_refuses_before_writing(tmp_path):
    six = build_llama(tmp_path / "six", n_layer=6)
    with pytest.raises(ShardingError, match="empty"):
        convert_checkpoint(six, tmp_path / "out", ParallelLayout(1, 4))
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize("tp", [1, 2])
def test_uneven_pipeline_stages_run_and_match_hf(llama3, tmp_path, tp):
    """3 layers on 2 stages (2 + 1), each stage its own device entry; logits equal HF transformers'."""
    from transformers import AutoModelForCausalLM

    shard = convert_checkpoint(llama3, tmp_path / "pp2", ParallelLayout(tp, 2))
    flat = convert_checkpoint(llama3, tmp_path / "pp1", ParallelLayout(tp, 1))
    config = ft_checkpoint.read_config(shard)
    assert config["pipeline_para_size"] == 2
    # Layers keep their global indices: the same files, byte for byte, as the PP=1 export.
    files = sorted(p.name for p in shard.glob("*.bin"))
    assert files == sorted(p.name for p in flat.glob("*.bin"))
    assert all((shard / n).read_bytes() == (flat / n).read_bytes() for n in files)

    model = ft_gpt.FTGPT.from_shards(shard, device="cpu", devices=["cpu", "cpu"])
    assert [list(r) for r in model.stages] == [[0, 1], [2]]
    hf = AutoModelForCausalLM.from_pretrained(llama3, dtype=torch.float32).eval()
    with torch.inference_mode():
        reference = hf(torch.tensor(IDS)).logits
    assert (model.forward_logits(IDS) - reference).abs().max().item() < 1e-4
    out = generate(model, IDS, [len(IDS[0])], [6])
    with torch.inference_mode():
        expected = hf.generate(torch.tensor(IDS), attention_mask=torch.ones(1, len(IDS[0]), dtype=torch.long),
                               max_new_tokens=6, do_sample=False, pad_token_id=50256, eos_token_id=50256)
    n = int(out.sequence_length[0, 0])
    assert out.output_ids[0, 0, :n].tolist() == expected[0, :n].tolist()


def test_devices_must_match_stages(llama3, tmp_path):
    shard = convert_checkpoint(llama3, tmp_path / "pp3", ParallelLayout(1, 3))
    with pytest.raises(ValueError, match="2 devices for pipeline_para_size=3"):
        ft_gpt.FTGPT.from_shards(shard, devices=["cpu", "cpu"])


@pytest.mark.parametrize("builder, message", [
    (build_llama, "FasterTransformer has no backend for this architecture"),
])
def test_fastertransformer_runtime_refused_where_ft_cannot_serve(tmp_path, builder, message):
    from templates.ft_python.ft_checkpoint import CheckpointError
    from main import run

    checkpoint = builder(tmp_path / "checkpoint")
    cfg = composed(f"base_results_dir={tmp_path / 'results'}", f"export.model.checkpoint_path={checkpoint}",
                   "export.triton_deployment.runtime=fastertransformer", "export.accuracy.enabled=false")
    with pytest.raises(CheckpointError, match=message) as info:
        run(cfg)
    assert "runtime=python" in str(info.value)
    assert not (tmp_path / "results").exists() or not list((tmp_path / "results").rglob("*.bin"))
