"""Rendered config.pbtxt files parse back into ModelConfig, and the ensemble is wired to tensors that exist."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from exporter.parallel import ParallelLayout
from exporter.runtimes import ModelSettings
from exporter.stages.export import build_repository

FT_BACKEND_INPUTS = {
    # name: (data type, dims) as FT's GPT backend declares them (all_models/gpt/fastertransformer/config.pbtxt)
    "input_ids": (pb.TYPE_UINT32, [-1]), "input_lengths": (pb.TYPE_UINT32, [1]),
    "request_output_len": (pb.TYPE_UINT32, [-1]), "runtime_top_k": (pb.TYPE_UINT32, [1]),
    "runtime_top_p": (pb.TYPE_FP32, [1]), "beam_search_diversity_rate": (pb.TYPE_FP32, [1]),
    "temperature": (pb.TYPE_FP32, [1]), "len_penalty": (pb.TYPE_FP32, [1]),
    "repetition_penalty": (pb.TYPE_FP32, [1]), "random_seed": (pb.TYPE_UINT64, [1]),
    "is_return_log_probs": (pb.TYPE_BOOL, [1]), "beam_width": (pb.TYPE_UINT32, [1]),
    "start_id": (pb.TYPE_UINT32, [1]), "end_id": (pb.TYPE_UINT32, [1]),
    "bad_words_list": (pb.TYPE_INT32, [2, -1]), "stop_words_list": (pb.TYPE_INT32, [2, -1]),
    "top_p_decay": (pb.TYPE_FP32, [1]), "top_p_min": (pb.TYPE_FP32, [1]), "top_p_reset_ids": (pb.TYPE_UINT32, [1]),
    "prompt_learning_task_name_ids": (pb.TYPE_UINT32, [1]),
}
FT_BACKEND_OUTPUTS = {
    "output_ids": (pb.TYPE_UINT32, [-1, -1]), "sequence_length": (pb.TYPE_UINT32, [-1]),
    "cum_log_probs": (pb.TYPE_FP32, [-1]), "output_log_probs": (pb.TYPE_FP32, [-1, -1]),
}


def parse(path: Path) -> pb.ModelConfig:
    return text_format.Parse(path.read_text(), pb.ModelConfig())


@pytest.fixture(scope="module", params=["python", "fastertransformer"])
def repo(request, tmp_path_factory, tiny_gpt2):
    settings = ModelSettings(
        name="my_gpt", runtime=request.param, max_batch_size=16, layout=ParallelLayout(2, 1),
        data_type="fp16", int8_mode=False, enable_custom_all_reduce=True,
    )
    return build_repository(tmp_path_factory.mktemp(request.param) / "model_repo", tiny_gpt2, settings, "fp16")


def test_every_config_parses_back(repo):
    configs = {path.parent.name: parse(path) for path in repo.glob("*/config.pbtxt")}
    assert set(configs) == {"my_gpt", "preprocessing", "postprocessing", "ensemble", "trtllm"}
    for name, config in configs.items():
        assert config.name == name
        assert config.max_batch_size == 16


# tensorrtllm_backend's all_models/inflight_batcher_llm/ensemble/config.pbtxt: the names and types GenAI-Perf and
# TensorRT-LLM clients send ([1] per row unless -1; all optional but text_input, whose max_tokens is optional here).
TRTLLM_INPUTS = {
    "text_input": ("TYPE_STRING", [-1]), "max_tokens": ("TYPE_INT32", [-1]), "bad_words": ("TYPE_STRING", [-1]),
    "stop_words": ("TYPE_STRING", [-1]), "exclude_input_in_output": ("TYPE_BOOL", [1]),
    "end_id": ("TYPE_INT32", [1]), "pad_id": ("TYPE_INT32", [1]), "top_k": ("TYPE_INT32", [1]),
    "top_p": ("TYPE_FP32", [1]), "temperature": ("TYPE_FP32", [1]), "length_penalty": ("TYPE_FP32", [1]),
    "repetition_penalty": ("TYPE_FP32", [1]), "min_length": ("TYPE_INT32", [1]),
    "presence_penalty": ("TYPE_FP32", [1]), "frequency_penalty": ("TYPE_FP32", [1]),
    "random_seed": ("TYPE_UINT64", [1]), "return_log_probs": ("TYPE_BOOL", [1]), "beam_width": ("TYPE_INT32", [1]),
    "stream": ("TYPE_BOOL", [1]),
}


def test_trtllm_model_has_tensorrt_llm_names_and_streams(repo):
    config = parse(repo / "trtllm" / "config.pbtxt")
    inputs = {i.name: (pb.DataType.Name(i.data_type), list(i.dims)) for i in config.input}
    assert inputs == TRTLLM_INPUTS
    assert {i.name for i in config.input if not i.optional} == {"text_input"}
    assert {o.name: pb.DataType.Name(o.data_type) for o in config.output} == {
        "text_output": "TYPE_STRING", "cum_log_probs": "TYPE_FP32", "output_log_probs": "TYPE_FP32",
        "num_input_tokens": "TYPE_INT32", "num_output_tokens": "TYPE_INT32"}
    # decoupled: Triton's generate_stream needs it; the model it calls is the repository's GPT model
    assert config.model_transaction_policy.decoupled
    assert config.parameters["model_name"].string_value == "my_gpt"
    assert {path.name for path in (repo / "trtllm" / "1").iterdir()} == {
        "model.py", "tokenizer_model.py", "text_preprocessing.py", "tokenizer"}


def test_model_has_ft_backend_interface(repo):
    config = parse(repo / "my_gpt" / "config.pbtxt")
    inputs = {i.name: (i.data_type, list(i.dims)) for i in config.input}
    outputs = {o.name: (o.data_type, list(o.dims)) for o in config.output}
    assert inputs == FT_BACKEND_INPUTS and outputs == FT_BACKEND_OUTPUTS
    optional = {i.name for i in config.input if i.optional}
    assert optional == set(FT_BACKEND_INPUTS) - {"input_ids", "input_lengths", "request_output_len"}
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    assert parameters["tensor_para_size"] == "2" and parameters["pipeline_para_size"] == "1"
    assert parameters["data_type"] == "fp16" and parameters["model_type"] == "GPT"
    assert parameters["int8_mode"] == "0" and parameters["enable_custom_all_reduce"] == "1"
    if config.backend == "fastertransformer":
        # FT's backend needs the absolute path of the shards.
        assert parameters["model_checkpoint_path"] == str(repo / "my_gpt" / "1" / "2-gpu")
        assert not (repo / "my_gpt" / "1" / "model.py").exists()
    else:
        assert config.backend == "python"
        assert (repo / "my_gpt" / "1" / parameters["model_checkpoint_path"] / "config.ini").is_file()
        assert (repo / "my_gpt" / "1" / "model.py").is_file()


def test_ensemble_is_wired_to_existing_tensors(repo):
    configs = {path.parent.name: parse(path) for path in repo.glob("*/config.pbtxt")}
    ensemble = configs["ensemble"]
    assert ensemble.platform == "ensemble"
    assert {"INPUT_0", "INPUT_1"} <= {i.name for i in ensemble.input}
    assert "OUTPUT_0" in {o.name for o in ensemble.output}
    available = {i.name for i in ensemble.input}
    maybe_absent = {i.name for i in ensemble.input if i.optional}  # INPUT_1 too: preprocessing fills it in
    for step in ensemble.ensemble_scheduling.step:
        model = configs[step.model_name]
        assert set(step.input_map) <= {i.name for i in model.input}, step.model_name
        required = {i.name for i in model.input if not i.optional}
        assert required <= set(step.input_map), step.model_name
        assert not {name for name, source in step.input_map.items() if source in maybe_absent} & required
        assert set(step.input_map.values()) <= available, step.model_name
        assert set(step.output_map) <= {o.name for o in model.output}, step.model_name
        available |= set(step.output_map.values())
    assert {o.name for o in ensemble.output} <= available
