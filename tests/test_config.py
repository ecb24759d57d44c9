"""The Hydra config: NeMo-Launcher's export keys and interpolations, validated up front with errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from exporter.config import ConfigError, validate

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def composed(*overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=list(overrides))


NEMO_LAUNCHER_KEYS = {
    "run": ["name", "time_limit", "model_train_name", "training_dir", "config_summary", "results_dir", "model_type"],
    "model": ["checkpoint_path", "tensor_model_parallel_size", "weight_data_type", "processes",
              "load_checkpoints_to_cpu"],
    "triton_deployment": ["triton_model_dir", "max_batch_size", "pipeline_model_parallel_size", "int8_mode",
                          "enable_custom_all_reduce", "data_type"],
    "accuracy": ["enabled", "test_data", "output_path", "batch_size", "runtime"],
}


def test_default_config_has_nemo_launcher_keys_and_validates():
    cfg = composed()
    assert list(cfg.stages) == ["export"]
    assert "base_results_dir" in cfg and "cluster_type" in cfg
    for group, keys in NEMO_LAUNCHER_KEYS.items():
        for key in keys:
            assert key in cfg.export[group], f"export.{group}.{key}"
    for key in ("max_seq_len", "beam_width", "sampling_top_k", "sampling_top_p"):
        assert key in cfg.export.accuracy.runtime
    checked = validate(cfg)
    assert Path(checked.export.accuracy.test_data).is_file()


def test_interpolations_follow_nemo_launcher():
    cfg = validate(composed(
        "base_results_dir=/r", "export.run.model_train_name=m", "export.model.tensor_model_parallel_size=2",
        "export.triton_deployment.pipeline_model_parallel_size=1", "export.model.weight_data_type=fp16",
        "export.triton_deployment.data_type=bf16",
    ))
    assert cfg.export.run.config_summary == "tp2_pp1_fp16_bf16"
    assert cfg.export.run.results_dir == "/r/m/export_tp2_pp1_fp16_bf16"
    assert cfg.export.run.training_dir == "/r/m"
    assert cfg.export.triton_deployment.triton_model_dir == "/r/m/export_tp2_pp1_fp16_bf16/model_repo/m"
    assert cfg.export.accuracy.output_path == "/r/m/export_tp2_pp1_fp16_bf16/eval_output.json"


@pytest.mark.parametrize(
    "override, key",
    [
        ("export.model.weight_data_type=fp8", "export.model.weight_data_type"),
        ("export.model.tensor_model_parallel_size=two", "export.model.tensor_model_parallel_size"),
        ("export.model.tensor_model_parallel_size=0", "export.model.tensor_model_parallel_size"),
        ("export.triton_deployment.runtime=tensorrt", "export.triton_deployment.runtime"),
        ("export.triton_deployment.max_batch_size=0", "export.triton_deployment.max_batch_size"),
        ("export.accuracy.runtime.beam_width=4", "export.accuracy.runtime.beam_width"),
        ("export.accuracy.runtime.sampling_top_k=40", "export.accuracy.runtime.sampling_top_k"),
        ("export.accuracy.metrics=[perplexity]", "export.accuracy.metrics"),
        ("cluster_type=kubernetes", "cluster_type"),
        ("stages=[training]", "stages"),
        ("export.triton_deployment.int8_mode=true", "export.triton_deployment.int8_mode"),
        ("export.tokenizer.add_bos_token=maybe", "export.tokenizer.add_bos_token"),
        ("export.tokenizer.skip_special_tokens=null", "export.tokenizer.skip_special_tokens"),
        ("export.triton_deployment.trtllm_model_name=ensemble", "export.triton_deployment.trtllm_model_name"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as error:
        validate(composed(override))
    assert str(error.value).startswith(key)


def test_tokenizer_special_tokens_default_to_the_checkpoints_own():
    tokenizer = validate(composed()).export.tokenizer
    assert (tokenizer.add_bos_token, tokenizer.add_eos_token, tokenizer.skip_special_tokens) == (None, None, True)
    overrides = ("export.tokenizer.add_bos_token=false", "export.tokenizer.add_eos_token=true")
    tokenizer = validate(composed(*overrides)).export.tokenizer
    assert (tokenizer.add_bos_token, tokenizer.add_eos_token) == (False, True)


def test_unknown_key_is_refused():
    from omegaconf import open_dict

    cfg = composed()
    with open_dict(cfg):  # as a typo in a user's own YAML file would arrive
        cfg.export.model["tensor_parallel"] = 2
    with pytest.raises(ConfigError, match="tensor_parallel"):
        validate(cfg)
