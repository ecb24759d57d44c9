"""Triton `config.pbtxt` files built as tritonclient's protobuf `ModelConfig` and written with `text_format`.

The model's tensors are those of FasterTransformer's GPT Triton backend, so the preprocessing -> model ->
postprocessing ensemble is the same whichever runtime (FT backend or the python runtime) serves the model.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from templates.ft_python import ft_interface, ft_t5_interface

from ..atomic import write_text_atomic
from . import PYTHON_BACKEND

# Types of the text models' tensors (the middle model's come from ft_interface's table).
UINT32, INT32, BOOL, STRING = pb.TYPE_UINT32, pb.TYPE_INT32, pb.TYPE_BOOL, pb.TYPE_STRING


@dataclass(frozen=True)
class Tensor:
    name: str
    data_type: int
    dims: tuple[int, ...]
    scalar: bool = False  # dims [1] reshaped to a per-row scalar, as FT's backend declares them
    optional: bool = False


def _from_interface(tensors) -> tuple[Tensor, ...]:
    """ft_interface's tensors as config.pbtxt declares them (Triton type "UINT32" -> pb.TYPE_UINT32)."""
    return tuple(Tensor(tensor.name, pb.DataType.Value(f"TYPE_{tensor.triton_dtype}"), tensor.dims,
                        scalar=tensor.scalar, optional=tensor.optional) for tensor in tensors)


# FT GPT backend inputs and outputs (all_models/gpt/fastertransformer/config.pbtxt), per row of the batch, in its
# order: the table of templates/ft_python/ft_interface.py, which the python runtime and the clients read too.
MODEL_INPUTS = _from_interface(ft_interface.MODEL_INPUTS)
SAMPLING_INPUTS = _from_interface(ft_interface.SAMPLING_INPUTS)  # optional, per row
WORD_LIST_INPUTS = tuple(tensor.name for tensor in ft_interface.WORD_LIST_INPUTS)  # FT's word-list format [2, len]
MODEL_OUTPUTS = _from_interface(ft_interface.MODEL_OUTPUTS)
# Added by the python runtime when decoupled, for the streaming ensemble's postprocessing (see ft_interface.OUTPUTS).
STREAMING_OUTPUTS = _from_interface(ft_interface.STREAMING_OUTPUTS)

PREPROCESSING_INPUTS = (
    Tensor("QUERY", STRING, (-1,)),
    # Optional: preprocessing fills in the checkpoint's default (generation_config.json, else HF's) when absent.
    Tensor("REQUEST_OUTPUT_LEN", UINT32, (-1,), optional=True),
    # Comma-separated words per row (CSV, quotes allowed), as FT's preprocessing takes them.
    Tensor("BAD_WORDS_DICT", STRING, (-1,), optional=True),
    Tensor("STOP_WORDS_DICT", STRING, (-1,), optional=True),
)
PREPROCESSING_OUTPUTS = (
    Tensor("INPUT_ID", UINT32, (-1,)),
    Tensor("REQUEST_INPUT_LEN", UINT32, (1,)),
    Tensor("BAD_WORDS_IDS", INT32, (2, -1)),
    Tensor("STOP_WORDS_IDS", INT32, (2, -1)),
    Tensor("REQUEST_OUTPUT_LEN", UINT32, (-1,)),
)
# With prompt-learning tasks (FT's p/prompt tuning): a task picked by name; preprocessing prepends its virtual ids
# and gives the model the task's id (prompt_learning_task_name_ids).
PROMPT_TASK_INPUT = Tensor("PROMPT_TASK_NAME", STRING, (1,), optional=True)
PROMPT_TASK_OUTPUT = Tensor("PROMPT_TASK_ID", UINT32, (1,))
PROMPT_TASK_MODEL_INPUT = "prompt_learning_task_name_ids"
POSTPROCESSING_INPUTS = (
    Tensor("TOKENS_BATCH", UINT32, (-1, -1)),
    Tensor("SEQUENCE_LENGTH", UINT32, (-1,)),
    Tensor("INPUT_LENGTHS", UINT32, (1,)),
    Tensor("IS_FINAL", BOOL, (1,), optional=True),  # streaming: a false row may end in a partial character
    Tensor("END_ID", UINT32, (1,), optional=True),
)
POSTPROCESSING_OUTPUTS = (Tensor("OUTPUT", STRING, (-1,)),)

# The ensemble declares the sampling inputs as plain [1] (no reshape): Triton matches ensemble tensors against the
# model's declared dims, before the model's reshape.
# INPUT_2 / INPUT_3: bad / stop words as CSV strings, tokenized by preprocessing into the word-list tensors.
# The prompt-learning task id is not an ensemble input: the ensemble takes the task's name (PROMPT_TASK_INPUT).
_PASSED_THROUGH = tuple(tensor for tensor in SAMPLING_INPUTS
                        if tensor.name not in WORD_LIST_INPUTS + (PROMPT_TASK_MODEL_INPUT,))
ENSEMBLE_INPUTS = (
    Tensor("INPUT_0", STRING, (-1,)),
    Tensor("INPUT_1", UINT32, (-1,), optional=True),  # output length; absent: preprocessing's default
    Tensor("INPUT_2", STRING, (-1,), optional=True),
    Tensor("INPUT_3", STRING, (-1,), optional=True),
) + tuple(replace(tensor, scalar=False) for tensor in _PASSED_THROUGH)
ENSEMBLE_OUTPUTS = (Tensor("OUTPUT_0", STRING, (-1,)),) + MODEL_OUTPUTS


def _add_inputs(config: pb.ModelConfig, tensors: tuple[Tensor, ...], ragged: tuple[str, ...] = ()) -> None:
    for tensor in tensors:
        message = config.input.add(name=tensor.name, data_type=tensor.data_type, dims=list(tensor.dims))
        if tensor.scalar:
            message.reshape.SetInParent()  # reshape: { shape: [ ] }
        message.optional = tensor.optional
        message.allow_ragged_batch = tensor.name in ragged


def _add_outputs(config: pb.ModelConfig, tensors: tuple[Tensor, ...]) -> None:
    for tensor in tensors:
        config.output.add(name=tensor.name, data_type=tensor.data_type, dims=list(tensor.dims))


def _parameters(config: pb.ModelConfig, values: dict[str, object]) -> None:
    for key, value in values.items():
        if isinstance(value, bool):
            value = int(value)
        config.parameters[key].string_value = str(value)


# model_warmup: Triton sends each model instance one request before reporting it ready, so the first real request
# does not pay for lazy initialisation (torch's first kernels and allocations, a CUDA context). One prompt token
# (id 1) generating one token; the values come from files in <model>/warmup/ (zero_data would send input_lengths 0,
# which the model refuses, and a refused warm-up fails the model's load).
WARMUP_DIR = "warmup"
WARMUP_FILES = {"one_uint32": struct.pack("<I", 1)}  # name -> raw little-endian bytes, as Triton reads them
WARMUP_INPUTS = ("input_ids", "input_lengths", "request_output_len")


def add_warmup(config: pb.ModelConfig) -> None:
    """One warm-up request (see WARMUP_FILES), written by `write_warmup_files` into the model's folder."""
    warmup = config.model_warmup.add(name="one_token", batch_size=1 if config.max_batch_size > 0 else 0)
    for name in WARMUP_INPUTS:
        tensor = warmup.inputs[name]
        tensor.data_type, tensor.dims[:] = pb.TYPE_UINT32, [1]
        tensor.input_data_file = "one_uint32"


def write_warmup_files(model_dir: Path) -> None:
    """`<model_dir>/warmup/<file>` for add_warmup's request (inside the repository being built)."""
    folder = Path(model_dir) / WARMUP_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in WARMUP_FILES.items():
        (folder / name).write_bytes(data)


def decoder_model_config(name: str, backend: str, max_batch_size: int, instance_count: int,
                         parameters: dict[str, object], *, ragged: bool = False, decoupled: bool = False,
                         max_queue_delay_microseconds: int | None = None, warmup: bool = False) -> pb.ModelConfig:
    """The middle model of a decoder-only ensemble, with FT's GPT backend's tensors whichever runtime serves it.

    ragged: every input with a -1 dimension may differ in shape between the requests of one batch. decoupled: the
    model streams, and adds STREAMING_OUTPUTS. max_queue_delay_microseconds: dynamic batching (None: none). warmup:
    add_warmup's request (the runtime writes its files). The runtime (exporter/runtimes/) chooses these and the
    parameters.
    """
    config = pb.ModelConfig(name=name, max_batch_size=max_batch_size)
    config.backend = backend
    config.model_transaction_policy.decoupled = decoupled
    inputs = MODEL_INPUTS + SAMPLING_INPUTS
    _add_inputs(config, inputs, ragged=_ragged(inputs) if ragged else ())
    _add_outputs(config, MODEL_OUTPUTS + (STREAMING_OUTPUTS if decoupled else ()))
    config.instance_group.add(count=instance_count, kind=pb.ModelInstanceGroup.KIND_CPU)
    if max_queue_delay_microseconds is not None:
        config.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_microseconds
    _parameters(config, parameters)
    if warmup:
        add_warmup(config)
    return config


def _ragged(tensors: tuple[Tensor, ...]) -> tuple[str, ...]:
    """Names of the inputs whose per-row shape may differ between requests (a -1 dimension)."""
    return tuple(tensor.name for tensor in tensors if -1 in tensor.dims)


def _python_model(name: str, max_batch_size: int, inputs, outputs, parameters: dict[str, object],
                  max_queue_delay_microseconds: int | None = None) -> pb.ModelConfig:
    config = pb.ModelConfig(name=name, backend=PYTHON_BACKEND, max_batch_size=max_batch_size)
    _add_inputs(config, inputs, ragged=_ragged(inputs))
    _add_outputs(config, outputs)
    config.instance_group.add(count=1, kind=pb.ModelInstanceGroup.KIND_CPU)
    if max_queue_delay_microseconds is not None:
        config.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_microseconds
    _parameters(config, parameters)
    return config


def preprocessing_config(max_batch_size: int, end_id: int, max_queue_delay_microseconds: int | None = None,
                         output_length: dict[str, int] | None = None, prompt_tasks: tuple = (),
                         prompt_start_id: int = 0) -> pb.ModelConfig:
    """output_length: what sizes a request that leaves REQUEST_OUTPUT_LEN out, as parameters: `max_new_tokens`
    and `max_length` (generation_config.json's, when set), `max_pos_seq_len` (the model's context length).
    prompt_tasks: ((name, prompt_length), ...) in task-id order (config.ini's): input PROMPT_TASK_NAME, output
    PROMPT_TASK_ID, parameters `prompt_tasks` ("name:length,...") and `prompt_learning_start_id`."""
    parameters = {"end_id": end_id, **{key: value for key, value in (output_length or {}).items()
                                       if value is not None}}
    inputs, outputs = PREPROCESSING_INPUTS, PREPROCESSING_OUTPUTS
    if prompt_tasks:
        inputs, outputs = inputs + (PROMPT_TASK_INPUT,), outputs + (PROMPT_TASK_OUTPUT,)
        parameters.update(prompt_tasks=",".join(f"{name}:{length}" for name, length in prompt_tasks),
                          prompt_learning_start_id=prompt_start_id)
    return _python_model("preprocessing", max_batch_size, inputs, outputs, parameters, max_queue_delay_microseconds)


def postprocessing_config(max_batch_size: int, end_id: int, max_queue_delay_microseconds: int | None = None,
                          eos_ids: tuple[int, ...] = (), skip_special_tokens: bool = True) -> pb.ModelConfig:
    """eos_ids: the model's eos set, parameter `eos_ids` ("a,b,c"): text is cut before the first of them (end_id
    alone when empty, or when a request sends END_ID). skip_special_tokens: parameter `skip_special_tokens` (1 / 0)."""
    parameters = {"end_id": end_id, **({"eos_ids": ",".join(str(i) for i in eos_ids)} if eos_ids else {}),
                  "skip_special_tokens": skip_special_tokens}
    return _python_model("postprocessing", max_batch_size, POSTPROCESSING_INPUTS, POSTPROCESSING_OUTPUTS,
                         parameters, max_queue_delay_microseconds)


def ensemble_config(model_name: str, max_batch_size: int, decoupled: bool = False,
                    prompt_tasks: bool = False) -> pb.ModelConfig:
    """Text in (`INPUT_0`, optional output length `INPUT_1`) -> text out (`OUTPUT_0`), as FT's all_models/gpt ensemble.

    decoupled: the model streams (python runtime, with STREAMING_OUTPUTS). A step downstream of a decoupled model
    may take tensors from that model only, so postprocessing reads the prompt lengths from the model's responses,
    and the ensemble returns `OUTPUT_0` only, once per streamed response (token ids: ask the model itself).
    prompt_tasks: the model has prompt-learning tasks; a request names one in PROMPT_TASK_NAME (preprocessing maps it).
    """
    config = pb.ModelConfig(name="ensemble", platform="ensemble", max_batch_size=max_batch_size)
    _add_inputs(config, ENSEMBLE_INPUTS + ((PROMPT_TASK_INPUT,) if prompt_tasks else ()))
    _add_outputs(config, ENSEMBLE_OUTPUTS[:1] if decoupled else ENSEMBLE_OUTPUTS)
    steps = config.ensemble_scheduling.step

    preprocessing = steps.add(model_name="preprocessing", model_version=-1)
    preprocessing.input_map["QUERY"] = "INPUT_0"
    preprocessing.input_map["REQUEST_OUTPUT_LEN"] = "INPUT_1"
    preprocessing.input_map["BAD_WORDS_DICT"] = "INPUT_2"
    preprocessing.input_map["STOP_WORDS_DICT"] = "INPUT_3"
    for tensor in PREPROCESSING_OUTPUTS + ((PROMPT_TASK_OUTPUT,) if prompt_tasks else ()):
        preprocessing.output_map[tensor.name] = f"_{tensor.name}"
    if prompt_tasks:
        preprocessing.input_map[PROMPT_TASK_INPUT.name] = PROMPT_TASK_INPUT.name

    model = steps.add(model_name=model_name, model_version=-1)
    model.input_map["input_ids"] = "_INPUT_ID"
    model.input_map["input_lengths"] = "_REQUEST_INPUT_LEN"
    model.input_map["request_output_len"] = "_REQUEST_OUTPUT_LEN"
    model.input_map["bad_words_list"] = "_BAD_WORDS_IDS"
    model.input_map["stop_words_list"] = "_STOP_WORDS_IDS"
    for tensor in _PASSED_THROUGH:
        model.input_map[tensor.name] = tensor.name
    if prompt_tasks:
        model.input_map[PROMPT_TASK_MODEL_INPUT] = f"_{PROMPT_TASK_OUTPUT.name}"
    if decoupled:  # only what postprocessing reads (Triton refuses unused ensemble tensors)
        for name in ("output_ids", "sequence_length") + tuple(tensor.name for tensor in STREAMING_OUTPUTS):
            model.output_map[name] = f"_{name}"
    else:
        for tensor in MODEL_OUTPUTS:
            model.output_map[tensor.name] = tensor.name

    # With a decoupled model every streamed model response runs this step once (Triton ensembles forward each
    # response of a decoupled step downstream), so OUTPUT_0 arrives once per generated token.
    postprocessing = steps.add(model_name="postprocessing", model_version=-1)
    postprocessing.input_map["TOKENS_BATCH"] = model.output_map["output_ids"]
    postprocessing.input_map["SEQUENCE_LENGTH"] = model.output_map["sequence_length"]
    if decoupled:
        postprocessing.input_map["INPUT_LENGTHS"] = "_prompt_lengths"
        postprocessing.input_map["IS_FINAL"] = "_is_final"
    else:
        postprocessing.input_map["INPUT_LENGTHS"] = "_REQUEST_INPUT_LEN"
        postprocessing.input_map["END_ID"] = "end_id"
    postprocessing.output_map["OUTPUT"] = "OUTPUT_0"
    return config


def write_config(config: pb.ModelConfig, model_dir: Path) -> Path:
    """Write `<model_dir>/config.pbtxt` atomically."""
    return write_text_atomic(Path(model_dir) / "config.pbtxt", text_format.MessageToString(config))


# FT's T5 backend (model_type "T5") inputs and outputs, per row, in the order of fastertransformer_backend's
# all_models/t5/fastertransformer/config.pbtxt (c6936c39): the encoder's input ids and their length, the decoding
# options, FT's word-list format, prompt learning and IA3 task ids as FT declares them.
_SCALAR_UINT32, _SCALAR_FP32 = (pb.TYPE_UINT32, (1,)), (pb.TYPE_FP32, (1,))
ENCODER_DECODER_INPUTS = (
    Tensor("input_ids", UINT32, (-1,)),
    Tensor("sequence_length", UINT32, (1,), scalar=True),
    *(Tensor(name, *_SCALAR_UINT32, scalar=True, optional=True) for name in ("runtime_top_k",)),
    *(Tensor(name, *_SCALAR_FP32, scalar=True, optional=True)
      for name in ("runtime_top_p", "beam_search_diversity_rate", "temperature", "len_penalty",
                   "repetition_penalty")),
    Tensor("random_seed", pb.TYPE_UINT64, (1,), scalar=True, optional=True),
    Tensor("is_return_log_probs", BOOL, (1,), scalar=True, optional=True),
    Tensor("max_output_len", UINT32, (1,), scalar=True),
    *(Tensor(name, *_SCALAR_UINT32, scalar=True, optional=True) for name in ("beam_width", "start_id", "end_id")),
    Tensor("bad_words_list", INT32, (2, -1), optional=True),
    Tensor("stop_words_list", INT32, (2, -1), optional=True),
    *(Tensor(name, *_SCALAR_UINT32, scalar=True, optional=True)
      for name in ("prompt_learning_task_name_ids", "request_prompt_lengths")),
    Tensor("request_prompt_embedding", pb.TYPE_FP16, (-1, -1), optional=True),
    Tensor("ia3_tasks", INT32, (1,), scalar=True, optional=True),
    *(Tensor(name, *_SCALAR_FP32, scalar=True, optional=True) for name in ("top_p_decay", "top_p_min")),
    Tensor("top_p_reset_ids", UINT32, (1,), scalar=True, optional=True),
)
ENCODER_DECODER_OUTPUTS = (
    Tensor("output_ids", INT32, (-1, -1)),
    Tensor("sequence_length", INT32, (-1,)),
    Tensor("cum_log_probs", pb.TYPE_FP32, (-1,)),
    Tensor("output_log_probs", pb.TYPE_FP32, (-1, -1)),
)


def encoder_decoder_model_config(name: str, backend: str, max_batch_size: int, instance_count: int,
                                 parameters: dict[str, object], *, ragged: bool = False, decoupled: bool = False,
                                 max_queue_delay_microseconds: int | None = None) -> pb.ModelConfig:
    """The middle model of an encoder-decoder (T5) model with FT's T5 backend's tensors (all_models/t5).
    ragged, decoupled, max_queue_delay_microseconds: as decoder_model_config's (the python runtime sets them; a
    decoupled model adds STREAMING_OUTPUTS, as ft_t5_interface lists them)."""
    config = pb.ModelConfig(name=name, max_batch_size=max_batch_size)
    config.backend = backend
    config.model_transaction_policy.decoupled = decoupled
    _add_inputs(config, ENCODER_DECODER_INPUTS, ragged=_ragged(ENCODER_DECODER_INPUTS) if ragged else ())
    _add_outputs(config, ENCODER_DECODER_OUTPUTS + (STREAMING_OUTPUTS if decoupled else ()))
    config.instance_group.add(count=instance_count, kind=pb.ModelInstanceGroup.KIND_CPU)
    if max_queue_delay_microseconds is not None:
        config.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_microseconds
    _parameters(config, parameters)
    return config


# The text ensemble around an encoder-decoder model: the same preprocessing (its ids are the encoder's input);
# the model's FT T5 tensors; postprocessing reading INT32 generated tokens only (no prompt in output_ids, so no
# INPUT_LENGTHS; IS_FINAL when streaming). Passed through: the T5 model's options other than the word lists, which
# preprocessing builds.
ENCODER_DECODER_POSTPROCESSING_INPUTS = (
    Tensor("TOKENS_BATCH", INT32, (-1, -1)),
    Tensor("SEQUENCE_LENGTH", INT32, (-1,)),
    *(tensor for tensor in POSTPROCESSING_INPUTS if tensor.name in ("IS_FINAL", "END_ID")),
)
_ENCODER_DECODER_PASSED = tuple(tensor for tensor in ENCODER_DECODER_INPUTS if tensor.optional and tensor.name in
                                {entry.name for entry in ft_t5_interface.SAMPLING_INPUTS}
                                and tensor.name not in WORD_LIST_INPUTS)
ENCODER_DECODER_ENSEMBLE_INPUTS = ENSEMBLE_INPUTS[:4] + tuple(replace(tensor, scalar=False)
                                                               for tensor in _ENCODER_DECODER_PASSED)
ENCODER_DECODER_ENSEMBLE_OUTPUTS = (Tensor("OUTPUT_0", STRING, (-1,)),) + ENCODER_DECODER_OUTPUTS


def encoder_decoder_postprocessing_config(max_batch_size: int, end_id: int,
                                          max_queue_delay_microseconds: int | None = None,
                                          eos_ids: tuple[int, ...] = (),
                                          skip_special_tokens: bool = True) -> pb.ModelConfig:
    """postprocessing_config for an encoder-decoder model's outputs (ENCODER_DECODER_POSTPROCESSING_INPUTS)."""
    config = postprocessing_config(max_batch_size, end_id, max_queue_delay_microseconds, eos_ids, skip_special_tokens)
    del config.input[:]
    _add_inputs(config, ENCODER_DECODER_POSTPROCESSING_INPUTS, ragged=_ragged(ENCODER_DECODER_POSTPROCESSING_INPUTS))
    return config


def encoder_decoder_ensemble_config(model_name: str, max_batch_size: int, decoupled: bool = False) -> pb.ModelConfig:
    """Text in (`INPUT_0`, optional output length `INPUT_1`, bad / stop words `INPUT_2` / `INPUT_3`) -> text out
    (`OUTPUT_0`) and the model's outputs, around an encoder-decoder model with FT's T5 tensors.

    decoupled: the model streams; as ensemble_config's, postprocessing then reads the model's responses only (its
    is_final; no END_ID: a step downstream of a decoupled model takes that model's tensors only) and the ensemble
    returns `OUTPUT_0` alone, once per streamed response."""
    config = pb.ModelConfig(name="ensemble", platform="ensemble", max_batch_size=max_batch_size)
    _add_inputs(config, ENCODER_DECODER_ENSEMBLE_INPUTS)
    _add_outputs(config, ENCODER_DECODER_ENSEMBLE_OUTPUTS[:1] if decoupled else ENCODER_DECODER_ENSEMBLE_OUTPUTS)
    steps = config.ensemble_scheduling.step

    preprocessing = steps.add(model_name="preprocessing", model_version=-1)
    for name, source in (("QUERY", "INPUT_0"), ("REQUEST_OUTPUT_LEN", "INPUT_1"), ("BAD_WORDS_DICT", "INPUT_2"),
                         ("STOP_WORDS_DICT", "INPUT_3")):
        preprocessing.input_map[name] = source
    for tensor in PREPROCESSING_OUTPUTS:
        preprocessing.output_map[tensor.name] = f"_{tensor.name}"

    model = steps.add(model_name=model_name, model_version=-1)
    model.input_map["input_ids"] = "_INPUT_ID"  # the encoder's input
    model.input_map["sequence_length"] = "_REQUEST_INPUT_LEN"
    model.input_map["max_output_len"] = "_REQUEST_OUTPUT_LEN"
    model.input_map["bad_words_list"] = "_BAD_WORDS_IDS"
    model.input_map["stop_words_list"] = "_STOP_WORDS_IDS"
    for tensor in _ENCODER_DECODER_PASSED:
        model.input_map[tensor.name] = tensor.name
    postprocessing = steps.add(model_name="postprocessing", model_version=-1)
    if decoupled:  # only what postprocessing reads (Triton refuses unused ensemble tensors)
        for name, target in (("output_ids", "TOKENS_BATCH"), ("sequence_length", "SEQUENCE_LENGTH"),
                             ("is_final", "IS_FINAL")):
            model.output_map[name] = f"_{name}"
            postprocessing.input_map[target] = f"_{name}"
    else:
        for tensor in ENCODER_DECODER_OUTPUTS:
            model.output_map[tensor.name] = tensor.name
        postprocessing.input_map["TOKENS_BATCH"] = "output_ids"
        postprocessing.input_map["SEQUENCE_LENGTH"] = "sequence_length"
        postprocessing.input_map["END_ID"] = "end_id"
    postprocessing.output_map["OUTPUT"] = "OUTPUT_0"
    return config
