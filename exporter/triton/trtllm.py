"""The TensorRT-LLM-compatible entry point of a decoder repository: a python BLS model (templates/trtllm/model.py)
with TensorRT-LLM backend's tensor names (text_input, max_tokens, ... -> text_output, ...), over the runtime's model.

What GenAI-Perf's `--service-kind triton --backend tensorrtllm` mode, Triton's generate endpoints
(`/v2/models/<name>/generate`, `generate_stream`) and TensorRT-LLM users call. The dims and types are those of
tensorrtllm_backend's all_models/inflight_batcher_llm/ensemble/config.pbtxt.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as pb

from . import render
from .render import Tensor

# Default model name; `ensemble` (TensorRT-LLM's) is the FT-style ensemble's already.
DEFAULT_NAME = "trtllm"
STRING, INT32, UINT64, FP32, BOOL = pb.TYPE_STRING, pb.TYPE_INT32, pb.TYPE_UINT64, pb.TYPE_FP32, pb.TYPE_BOOL

INPUTS = (
    Tensor("text_input", STRING, (-1,)),
    Tensor("max_tokens", INT32, (-1,), optional=True),  # absent: as the ensemble, HF's default length
    Tensor("bad_words", STRING, (-1,), optional=True),
    Tensor("stop_words", STRING, (-1,), optional=True),
    Tensor("exclude_input_in_output", BOOL, (1,), optional=True),
    Tensor("end_id", INT32, (1,), optional=True),
    Tensor("pad_id", INT32, (1,), optional=True),  # accepted; padding is internal
    Tensor("top_k", INT32, (1,), optional=True),
    Tensor("top_p", FP32, (1,), optional=True),
    Tensor("temperature", FP32, (1,), optional=True),
    Tensor("length_penalty", FP32, (1,), optional=True),
    Tensor("repetition_penalty", FP32, (1,), optional=True),
    Tensor("min_length", INT32, (1,), optional=True),  # refused unless 0
    Tensor("presence_penalty", FP32, (1,), optional=True),  # refused unless 0
    Tensor("frequency_penalty", FP32, (1,), optional=True),  # refused unless 0
    Tensor("random_seed", UINT64, (1,), optional=True),
    Tensor("return_log_probs", BOOL, (1,), optional=True),
    Tensor("beam_width", INT32, (1,), optional=True),
    Tensor("stream", BOOL, (1,), optional=True),
)
OUTPUTS = (
    Tensor("text_output", STRING, (-1,)),  # [B, beam]
    Tensor("cum_log_probs", FP32, (-1,)),  # [B, beam]
    Tensor("output_log_probs", FP32, (-1, -1)),  # [B, beam, steps]
    Tensor("num_input_tokens", INT32, (1,)),  # [B, 1]
    Tensor("num_output_tokens", INT32, (-1,)),  # [B, beam]
)
# Copied into the model's version directory: (path under templates/, name there).
FILES = (("trtllm/model.py", "model.py"), ("tokenizer_model.py", "tokenizer_model.py"),
         ("preprocessing/model.py", "text_preprocessing.py"))


def trtllm_config(name: str, model_name: str, max_batch_size: int, model_decoupled: bool, end_id: int,
                  eos_ids: tuple[int, ...] = (), skip_special_tokens: bool = True,
                  output_length: dict[str, int] | None = None, exclude_input_in_output: bool = True) -> pb.ModelConfig:
    """Always decoupled (Triton's generate_stream and gRPC streams need it; a request without `stream` still gets
    one response). model_decoupled: whether `model_name` streams (needed for `stream` true)."""
    config = pb.ModelConfig(name=name, backend=render.PYTHON_BACKEND, max_batch_size=max_batch_size)
    render._add_inputs(config, INPUTS)
    render._add_outputs(config, OUTPUTS)
    config.model_transaction_policy.decoupled = True
    config.instance_group.add(count=1, kind=pb.ModelInstanceGroup.KIND_CPU)
    render._parameters(config, {
        "end_id": end_id, "model_name": model_name, "model_decoupled": model_decoupled,
        "exclude_input_in_output": exclude_input_in_output, "skip_special_tokens": skip_special_tokens,
        **({"eos_ids": ",".join(str(i) for i in eos_ids)} if eos_ids else {}),
        **{key: value for key, value in (output_length or {}).items() if value is not None}})
    return config


def add_trtllm_model(repo: Path, config: pb.ModelConfig, tokenizer_json: Path, templates: Path) -> Path:
    """`<repo>/<name>/{config.pbtxt, 1/*.py, 1/tokenizer/tokenizer.json}`."""
    version_dir = repo / config.name / "1"
    version_dir.mkdir(parents=True)
    for relative, name in FILES:
        shutil.copy2(templates / relative, version_dir / name)
    (version_dir / "tokenizer").mkdir()
    shutil.copy2(tokenizer_json, version_dir / "tokenizer" / "tokenizer.json")
    render.write_config(config, repo / config.name)
    return repo / config.name
