"""The contract with FasterTransformer's C++ loaders and Triton backend, written down from FT's sources as data.

For each of FT's model types the tables below say which files one tensor-parallel rank opens, with how many
elements, and which config.ini keys (section, names, how they are parsed) the loader reads. Tiny seeded HF models
of each family (and the NeMo GPT fixture) are exported at TP 1 and 2 and the shard directory is checked against the
table: every file FT opens exists with exactly the element count it reads (FT's loadWeightFromBin only logs a
warning and leaves the weights uninitialised on a short or missing file), and nothing is written that FT would not
open. The expected config.ini values come from the source's own config (transformers' HF config, NeMo's saved
model_config.yaml), not from this project.

The rendered model config.pbtxt is checked against FT's backend's all_models/<model>/fastertransformer/config.pbtxt
for the same model type.

Sources (NVIDIA/FasterTransformer at df4a7534, triton-inference-server/fastertransformer_backend at c6936c39):
  GPT-J:    src/fastertransformer/models/gptj/GptJWeight.cc (loadModel), GptJDecoderLayerWeight.cc (loadModel),
            src/fastertransformer/triton_backend/gptj/GptJTritonModel.cc (config.ini [gptj] keys)
  GPT-NeoX: src/fastertransformer/models/gptneox/GptNeoXWeight.cc, GptNeoXDecoderLayerWeight.cc (loadModel),
            src/fastertransformer/triton_backend/gptneox/GptNeoXTritonModel.cc ([gptneox] keys)
  GPT/OPT:  src/fastertransformer/models/multi_gpu_gpt/ParallelGptWeight.cc, ParallelGptDecoderLayerWeight.cc
            (loadModel, int8_mode 0 and 1 open the same files), triton_backend/multi_gpu_gpt/ParallelGptTritonModel.cc
            ([gpt] keys and their defaults)
  all:      src/fastertransformer/utils/cuda_utils.cc getModelFileType (weight_data_type: fp32 | fp16 | bf16, else
            fp32); fastertransformer_backend src/libfastertransformer.cc ModelFactory (model_type strings).
"""

from __future__ import annotations

import configparser
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from conftest import build_hf_gpt2
from family_fixtures import NEMO_AVAILABLE, NEMO_FIXTURES, NEMO_MISSING, build_gptj, build_gptneox, build_opt, \
    nemo_checkpoint

from exporter.parallel import ParallelLayout
from exporter.runtimes import ModelSettings
from exporter.stages.export import build_repository

# A file FT opens: (name, element count, condition). Names: {N} = the layer index, {R} = the tensor-parallel rank.
# Counts and conditions are Python expressions over the config.ini values FT reads (after its defaults) and
# h = head_num * size_per_head (FT's hidden_units_), tp = tensor_para_size; `exists` = FT checks for the file.
File = tuple[str, str, str]


@dataclass(frozen=True)
class Loader:
    model_type: str  # the backend's model_type parameter (libfastertransformer.cc ModelFactory)
    section: str  # the config.ini section the loader reads
    keys: dict[str, tuple[str, object]]  # key -> (INIReader getter: int | float | bool | str, default or REQUIRED)
    global_files: tuple[File, ...]
    layer_files: tuple[File, ...]


REQUIRED = object()

# GptJWeight::loadModel + GptJDecoderLayerWeight::loadModel; keys: GptJTritonModel(model_dir) constructor.
# No q/k/v bias (zeroed in memory), no attention output bias, no post_attention_layernorm (one layernorm).
GPTJ = Loader(
    model_type="GPT-J", section="gptj",
    keys={"model_name": ("str", REQUIRED), "head_num": ("int", REQUIRED), "size_per_head": ("int", REQUIRED),
          "inter_size": ("int", REQUIRED), "num_layer": ("int", REQUIRED), "vocab_size": ("int", REQUIRED),
          "rotary_embedding": ("int", REQUIRED), "start_id": ("int", REQUIRED), "end_id": ("int", REQUIRED),
          "num_tasks": ("int", 0), "weight_data_type": ("str", REQUIRED)},
    global_files=(
        ("model.wte.bin", "vocab_size * h", "True"),
        ("model.final_layernorm.bias.bin", "h", "True"),
        ("model.final_layernorm.weight.bin", "h", "True"),
        ("model.lm_head.weight.bin", "vocab_size * h", "True"),
        ("model.lm_head.bias.bin", "vocab_size", "True"),
    ),
    layer_files=(
        ("model.layers.{N}.input_layernorm.bias.bin", "h", "True"),
        ("model.layers.{N}.input_layernorm.weight.bin", "h", "True"),
        ("model.layers.{N}.attention.query_key_value.weight.{R}.bin", "h * 3 * h // tp", "True"),
        ("model.layers.{N}.attention.dense.weight.{R}.bin", "h // tp * h", "True"),
        ("model.layers.{N}.mlp.dense_h_to_4h.weight.{R}.bin", "h * (inter_size // tp)", "True"),
        ("model.layers.{N}.mlp.dense_h_to_4h.bias.{R}.bin", "inter_size // tp", "True"),
        ("model.layers.{N}.mlp.dense_4h_to_h.weight.{R}.bin", "inter_size // tp * h", "True"),
        ("model.layers.{N}.mlp.dense_4h_to_h.bias.bin", "h", "True"),
    ),
)

# GptNeoXWeight::loadModel + GptNeoXDecoderLayerWeight::loadModel; keys: GptNeoXTritonModel(model_dir).
# use_gptj_residual (default 1): the two output biases are read summed from mlp.attention.bias.sum.bin and
# attention.dense.bias.bin / mlp.dense_4h_to_h.bias.bin are not opened; with 0 the two are opened separately.
GPTNEOX = Loader(
    model_type="GPT-NeoX", section="gptneox",
    keys={"model_name": ("str", REQUIRED), "head_num": ("int", REQUIRED), "size_per_head": ("int", REQUIRED),
          "inter_size": ("int", REQUIRED), "num_layer": ("int", REQUIRED), "vocab_size": ("int", REQUIRED),
          "rotary_embedding": ("int", REQUIRED), "start_id": ("int", REQUIRED), "end_id": ("int", REQUIRED),
          "use_gptj_residual": ("int", 1), "num_tasks": ("int", 0), "weight_data_type": ("str", REQUIRED)},
    global_files=(
        ("model.wte.bin", "vocab_size * h", "True"),
        ("model.final_layernorm.bias.bin", "h", "True"),
        ("model.final_layernorm.weight.bin", "h", "True"),
        ("model.lm_head.weight.bin", "vocab_size * h", "True"),
    ),
    layer_files=(
        ("model.layers.{N}.input_layernorm.bias.bin", "h", "True"),
        ("model.layers.{N}.input_layernorm.weight.bin", "h", "True"),
        ("model.layers.{N}.attention.query_key_value.weight.{R}.bin", "h * 3 * h // tp", "True"),
        ("model.layers.{N}.attention.query_key_value.bias.{R}.bin", "3 * h // tp", "True"),
        ("model.layers.{N}.attention.dense.weight.{R}.bin", "h // tp * h", "True"),
        ("model.layers.{N}.attention.dense.bias.bin", "h", "not use_gptj_residual"),
        ("model.layers.{N}.mlp.dense_h_to_4h.weight.{R}.bin", "h * (inter_size // tp)", "True"),
        ("model.layers.{N}.mlp.dense_h_to_4h.bias.{R}.bin", "inter_size // tp", "True"),
        ("model.layers.{N}.mlp.dense_4h_to_h.weight.{R}.bin", "inter_size // tp * h", "True"),
        ("model.layers.{N}.mlp.attention.bias.sum.bin", "h", "use_gptj_residual"),
        ("model.layers.{N}.mlp.dense_4h_to_h.bias.bin", "h", "not use_gptj_residual"),
        ("model.layers.{N}.post_attention_layernorm.bias.bin", "h", "True"),
        ("model.layers.{N}.post_attention_layernorm.weight.bin", "h", "True"),
    ),
)

# ParallelGptWeight::loadModel + ParallelGptDecoderLayerWeight::loadModel (no adapters); keys and defaults:
# ParallelGptTritonModel(model_dir). model.wpe.bin holds max_pos_seq_len rows; model.lm_head.weight.bin is used
# iff it exists (else the output layer is model.wte.bin).
GPT = Loader(
    model_type="GPT", section="gpt",
    keys={"model_name": ("str", REQUIRED), "head_num": ("int", REQUIRED), "size_per_head": ("int", REQUIRED),
          "inter_size": ("int", REQUIRED), "num_layer": ("int", REQUIRED), "vocab_size": ("int", REQUIRED),
          "layernorm_eps": ("float", 1e-6), "layernorm_type": ("str", "pre_layernorm"),
          "activation_type": ("str", "Gelu"), "has_positional_encoding": ("bool", True),
          "has_pre_decoder_layernorm": ("bool", False), "has_post_decoder_layernorm": ("bool", True),
          "use_attention_linear_bias": ("bool", False), "has_adapters": ("bool", False),
          "start_id": ("int", REQUIRED), "end_id": ("int", REQUIRED), "max_pos_seq_len": ("int", REQUIRED),
          "num_tasks": ("int", 0), "weight_data_type": ("str", REQUIRED)},
    global_files=(
        ("model.wpe.bin", "max_pos_seq_len * h", "has_positional_encoding"),
        ("model.wte.bin", "vocab_size * h", "True"),
        ("model.pre_decoder_layernorm.weight.bin", "h", "has_pre_decoder_layernorm"),
        ("model.pre_decoder_layernorm.bias.bin", "h", "has_pre_decoder_layernorm"),
        ("model.final_layernorm.bias.bin", "h", "has_post_decoder_layernorm"),
        ("model.final_layernorm.weight.bin", "h", "has_post_decoder_layernorm"),
        ("model.lm_head.weight.bin", "vocab_size * h", "exists"),
    ),
    layer_files=(
        ("model.layers.{N}.input_layernorm.bias.bin", "h", "True"),
        ("model.layers.{N}.input_layernorm.weight.bin", "h", "True"),
        ("model.layers.{N}.attention.query_key_value.bias.{R}.bin", "3 * (h // tp)", "True"),
        ("model.layers.{N}.attention.dense.bias.bin", "h", "True"),
        ("model.layers.{N}.post_attention_layernorm.bias.bin", "h", "True"),
        ("model.layers.{N}.post_attention_layernorm.weight.bin", "h", "True"),
        ("model.layers.{N}.mlp.dense_h_to_4h.bias.{R}.bin", "inter_size // tp", "True"),
        ("model.layers.{N}.mlp.dense_4h_to_h.bias.bin", "h", "True"),
        ("model.layers.{N}.attention.query_key_value.weight.{R}.bin", "h * 3 * h // tp", "True"),
        ("model.layers.{N}.attention.dense.weight.{R}.bin", "h // tp * h", "True"),
        ("model.layers.{N}.mlp.dense_h_to_4h.weight.{R}.bin", "h * (inter_size // tp)", "True"),
        ("model.layers.{N}.mlp.dense_4h_to_h.weight.{R}.bin", "inter_size // tp * h", "True"),
    ),
)

# getModelFileType: the element type of every file.
BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}

# FT's INIReader (inih): GetInteger parses with strtol (a value like "True" falls back to the default), GetBoolean
# accepts true/yes/on/1 and false/no/off/0 (any case).
INTEGER = re.compile(r"^-?(0x[0-9a-fA-F]+|[0-9]+)$")
TRUE, FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def read_as_ft(path: Path, loader: Loader) -> dict[str, object]:
    """config.ini's values as FT's loader gets them; fails on a required key that is absent or a value FT's
    INIReader would not parse (it would silently use its default)."""
    parser = configparser.ConfigParser()
    parser.read(path)
    assert parser.has_section(loader.section), f"{path}: no [{loader.section}] section"
    raw, values = parser[loader.section], {}
    for key, (kind, default) in loader.keys.items():
        if key not in raw:
            assert default is not REQUIRED, f"[{loader.section}] {key} is required by FT's loader"
            values[key] = default
            continue
        text = raw[key].strip()
        if kind == "int":
            assert INTEGER.match(text), f"[{loader.section}] {key}={text!r}: FT's GetInteger would not parse it"
            values[key] = int(text, 0)
        elif kind == "float":
            values[key] = float(text)
        elif kind == "bool":
            assert text.lower() in TRUE | FALSE, f"[{loader.section}] {key}={text!r}: not an INIReader boolean"
            values[key] = text.lower() in TRUE
        else:
            values[key] = text
    return values


def files_ft_opens(loader: Loader, values: dict[str, object], tp: int, shard_dir: Path) -> dict[str, int]:
    """File name -> element count, for every rank and layer (one directory holds every rank's files)."""
    scope = {**values, "h": values["head_num"] * values["size_per_head"], "tp": tp}
    opened = {}
    for name, count, condition in loader.global_files:
        if eval(condition, {}, {**scope, "exists": (shard_dir / name).exists()}):
            opened[name] = eval(count, {}, scope)
    for layer in range(values["num_layer"]):
        for rank in range(tp):
            for name, count, condition in loader.layer_files:
                file = name.format(N=layer, R=rank)
                if eval(condition, {}, scope):
                    opened[file] = eval(count, {}, scope)
    return opened


# The tiny families: builder, FT loader, and config.ini values FT reads, from the HF config (transformers).
def _gpt2_expected(config) -> dict:
    return {"head_num": config.n_head, "size_per_head": config.n_embd // config.n_head, "inter_size": 4 * config.n_embd,
            "num_layer": config.n_layer, "vocab_size": config.vocab_size, "max_pos_seq_len": config.n_positions,
            "layernorm_eps": config.layer_norm_epsilon, "layernorm_type": "pre_layernorm", "activation_type": "Gelu",
            "has_positional_encoding": True, "has_post_decoder_layernorm": True, "has_pre_decoder_layernorm": False,
            "use_attention_linear_bias": False, "has_adapters": False}


def _opt_expected(config) -> dict:
    return {"head_num": config.num_attention_heads, "size_per_head": config.hidden_size // config.num_attention_heads,
            "inter_size": config.ffn_dim, "num_layer": config.num_hidden_layers, "vocab_size": config.vocab_size,
            "max_pos_seq_len": config.max_position_embeddings, "layernorm_eps": 1e-5,  # nn.LayerNorm's default
            "layernorm_type": "pre_layernorm" if config.do_layer_norm_before else "post_layernorm",
            "activation_type": "Relu", "has_positional_encoding": True,
            "has_post_decoder_layernorm": config.do_layer_norm_before, "has_pre_decoder_layernorm": False,
            "use_attention_linear_bias": False, "has_adapters": False}


def _gptj_expected(config) -> dict:
    return {"head_num": config.n_head, "size_per_head": config.n_embd // config.n_head,
            "inter_size": config.n_inner or 4 * config.n_embd, "num_layer": config.n_layer,
            "vocab_size": config.vocab_size, "rotary_embedding": config.rotary_dim}


def _gptneox_expected(config) -> dict:
    head_dim = config.hidden_size // config.num_attention_heads
    rotary_pct = config.rope_parameters.get("partial_rotary_factor") if hasattr(config, "rope_parameters") \
        else config.rotary_pct
    return {"head_num": config.num_attention_heads, "size_per_head": head_dim,
            "inter_size": config.intermediate_size, "num_layer": config.num_hidden_layers,
            "vocab_size": config.vocab_size, "rotary_embedding": int(head_dim * rotary_pct),
            "use_gptj_residual": int(config.use_parallel_residual)}


def _nemo_gpt_expected(_) -> dict:
    """From the model_config.yaml NeMo saved beside the fixture (learned positions, pre-LN, LayerNorm, GELU)."""
    import yaml

    config = yaml.safe_load((NEMO_FIXTURES / "gpt_tp1.model_config.yaml").read_text())
    heads = config["num_attention_heads"]
    return {"head_num": heads, "size_per_head": config["hidden_size"] // heads,
            "inter_size": config["ffn_hidden_size"], "num_layer": config["num_layers"],
            "max_pos_seq_len": config["max_position_embeddings"], "layernorm_eps": config["layernorm_epsilon"],
            "layernorm_type": "pre_layernorm", "activation_type": "Gelu", "has_positional_encoding": True,
            "has_post_decoder_layernorm": True, "has_pre_decoder_layernorm": False,
            "use_attention_linear_bias": False, "has_adapters": False}


FAMILIES = {
    "gpt2": (build_hf_gpt2, GPT, _gpt2_expected),
    "opt": (build_opt, GPT, _opt_expected),
    "opt_post_layernorm_projected": (lambda d: build_opt(d, post_layernorm=True, project=True), GPT, _opt_expected),
    "gptj": (build_gptj, GPTJ, _gptj_expected),
    "nemo_gpt": (nemo_checkpoint("gpt_tp1"), GPT, _nemo_gpt_expected),
    # FT's rotary kernels use base 10000 (other bases are refused at planning, see test_plan_for_fts_backend).
    "gptneox_parallel": (lambda d: build_gptneox(d, rotary_emb_base=10000), GPTNEOX, _gptneox_expected),
    "gptneox_sequential": (lambda d: build_gptneox(d, parallel=False, rotary_emb_base=10000), GPTNEOX,
                           _gptneox_expected),
}


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """export(family, tp) -> (checkpoint, repository): a repository served by FT's backend, fp16 shards; each
    checkpoint and export is built once per module."""
    checkpoints, repositories = {}, {}

    def build(family: str, tp: int) -> tuple[Path, Path]:
        if family not in checkpoints:
            checkpoints[family] = FAMILIES[family][0](tmp_path_factory.mktemp(family))
        if (family, tp) not in repositories:
            settings = ModelSettings(name="model", runtime="fastertransformer", max_batch_size=8,
                                     layout=ParallelLayout(tp, 1), data_type="fp16")
            repositories[family, tp] = build_repository(tmp_path_factory.mktemp(f"{family}-tp{tp}") / "repo",
                                                        checkpoints[family], settings, "fp16")
        return checkpoints[family], repositories[family, tp]

    return build


@pytest.fixture(scope="module", params=[
    pytest.param((family, tp), id=f"{family}-tp{tp}",
                 marks=pytest.mark.skipif(family == "nemo_gpt" and not NEMO_AVAILABLE, reason=NEMO_MISSING))
    for family in FAMILIES for tp in (1, 2)])
def exported(request, export):
    family, tp = request.param
    return (family, tp, *export(family, tp))


def test_shards_are_what_fts_loader_opens(exported):
    from transformers import AutoConfig

    family, tp, checkpoint, repository = exported
    _, loader, expected_values = FAMILIES[family]
    shard_dir = repository / "model" / "1" / f"{tp}-gpu"
    values = read_as_ft(shard_dir / "config.ini", loader)
    source_config = None if checkpoint.suffix == ".nemo" else AutoConfig.from_pretrained(checkpoint)
    for key, value in expected_values(source_config).items():
        assert values[key] == (pytest.approx(value) if isinstance(value, float) else value), key
    assert values["weight_data_type"] == "fp16"
    if loader is GPT and values["has_positional_encoding"]:
        assert values["max_pos_seq_len"] > 0  # FT sizes model.wpe.bin by it

    opened = files_ft_opens(loader, values, tp, shard_dir)
    written = {path.name: path.stat().st_size for path in shard_dir.glob("*.bin")}
    missing = sorted(set(opened) - set(written))
    assert not missing, f"FT's loader opens files the export did not write: {missing}"
    unread = sorted(set(written) - set(opened))
    assert not unread, f"written but never opened by FT's loader: {unread}"
    element_bytes = BYTES[values["weight_data_type"]]
    wrong = {name: (written[name], count * element_bytes) for name, count in opened.items()
             if written[name] != count * element_bytes}
    assert not wrong, f"bytes written vs FT's read: {wrong}"


@pytest.mark.parametrize("family", ["gptneox_parallel", "gptneox_sequential"])
def test_neox_parallel_residual_opens_the_bias_sum_only(export, family):
    """NeoX with use_gptj_residual=1: FT reads mlp.attention.bias.sum.bin and neither output bias on its own; with
    0 it reads the two separate biases (GptNeoXDecoderLayerWeight::loadModel)."""
    _, repository = export(family, 2)
    shard_dir = repository / "model" / "1" / "2-gpu"
    residual = read_as_ft(shard_dir / "config.ini", GPTNEOX)["use_gptj_residual"]
    assert residual == (family == "gptneox_parallel")
    names = {path.name for path in shard_dir.glob("model.layers.*.bin")}
    for layer in range(2):
        prefix = f"model.layers.{layer}"
        separate = {f"{prefix}.attention.dense.bias.bin", f"{prefix}.mlp.dense_4h_to_h.bias.bin"}
        bias_sum = f"{prefix}.mlp.attention.bias.sum.bin"
        if residual:
            assert bias_sum in names and not separate & names
        else:
            assert separate <= names and bias_sum not in names


# FT's backend's model config per model type (all_models/gpt, all_models/gptj, all_models/gptneox
# fastertransformer/config.pbtxt): inputs (type, dims, reshaped to a scalar, optional) and outputs (type, dims).
_J_NEOX_INPUTS = {
    "input_ids": ("UINT32", [-1], False, False), "start_id": ("UINT32", [1], True, True),
    "end_id": ("UINT32", [1], True, True), "input_lengths": ("UINT32", [1], True, False),
    "request_output_len": ("UINT32", [-1], False, False), "runtime_top_k": ("UINT32", [1], True, True),
    "runtime_top_p": ("FP32", [1], True, True), "beam_search_diversity_rate": ("FP32", [1], True, True),
    "temperature": ("FP32", [1], True, True), "len_penalty": ("FP32", [1], True, True),
    "repetition_penalty": ("FP32", [1], True, True), "random_seed": ("UINT64", [1], True, True),
    "is_return_log_probs": ("BOOL", [1], True, True), "beam_width": ("UINT32", [1], True, True),
    "bad_words_list": ("INT32", [2, -1], False, True), "stop_words_list": ("INT32", [2, -1], False, True),
    "prompt_learning_task_name_ids": ("UINT32", [1], True, True), "top_p_decay": ("FP32", [1], True, True),
    "top_p_min": ("FP32", [1], True, True), "top_p_reset_ids": ("UINT32", [1], True, True),
}
_J_NEOX_OUTPUTS = {"output_ids": ("UINT32", [-1, -1]), "sequence_length": ("UINT32", [-1]),
                   "cum_log_probs": ("FP32", [-1]), "output_log_probs": ("FP32", [-1, -1])}
FT_BACKEND_MODELS = {
    "GPT": (
        {**_J_NEOX_INPUTS, "is_return_context_embeddings": ("BOOL", [1], True, True),
         "request_prompt_embedding": ("FP16", [-1, -1], False, True),
         "request_prompt_lengths": ("UINT32", [1], True, True), "request_prompt_type": ("UINT32", [1], True, True)},
        {**_J_NEOX_OUTPUTS, "response_input_lengths": ("INT32", [-1]), "context_embeddings": ("FP32", [-1, -1])},
        {"tensor_para_size", "pipeline_para_size", "data_type", "model_type", "model_checkpoint_path", "int8_mode",
         "enable_custom_all_reduce"},
    ),
    "GPT-J": (_J_NEOX_INPUTS, _J_NEOX_OUTPUTS, {"tensor_para_size", "pipeline_para_size", "data_type", "model_type",
                                                "model_checkpoint_path", "enable_custom_all_reduce"}),
    "GPT-NeoX": (_J_NEOX_INPUTS, _J_NEOX_OUTPUTS, {"tensor_para_size", "pipeline_para_size", "data_type",
                                                   "model_type", "model_checkpoint_path",
                                                   "enable_custom_all_reduce"}),
}


def test_model_config_is_fts_for_the_model_type(exported):
    family, tp, _, repository = exported
    loader = FAMILIES[family][1]
    config = text_format.Parse((repository / "model" / "config.pbtxt").read_text(), pb.ModelConfig())
    inputs, outputs, parameter_keys = FT_BACKEND_MODELS[loader.model_type]
    assert config.backend == "fastertransformer"
    assert [group.kind for group in config.instance_group] == [pb.ModelInstanceGroup.KIND_CPU]
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    assert set(parameters) == parameter_keys
    assert parameters["model_type"] == loader.model_type
    assert parameters["tensor_para_size"] == str(tp) and parameters["pipeline_para_size"] == "1"
    assert parameters["data_type"] == "fp16"
    assert parameters["model_checkpoint_path"] == str(repository / "model" / "1" / f"{tp}-gpu")
    rendered = {i.name: (pb.DataType.Name(i.data_type)[len("TYPE_"):], list(i.dims), i.HasField("reshape"),
                         i.optional) for i in config.input}
    assert {name: inputs.get(name) for name in rendered} == rendered  # each as FT declares it
    assert {name for name, (*_, optional) in inputs.items() if not optional} <= set(rendered)
    rendered_outputs = {o.name: (pb.DataType.Name(o.data_type)[len("TYPE_"):], list(o.dims)) for o in config.output}
    assert {name: outputs.get(name) for name in rendered_outputs} == rendered_outputs
    assert {"output_ids", "sequence_length"} <= set(rendered_outputs)


# Planning (main.run, before anything is written): what FT's backend serves from these shards, and with which
# settings. Messages name the key to change.
@pytest.mark.parametrize("builder, overrides, refusal", [
    # Regression: GPT-J / GPT-NeoX were refused ("the rendered config.pbtxt declares model_type 'GPT'") although
    # the shards follow FT's GPT-J / GPT-NeoX layouts.
    (build_gptj, [], None),
    (lambda d: build_gptneox(d, rotary_emb_base=10000), ["export.triton_deployment.data_type=fp16"], None),
    (build_opt, ["export.triton_deployment.int8_mode=1", "export.triton_deployment.data_type=bf16"], None),
    # FT's factory reads int8_mode for model_type GPT only: GPT-J would be served unquantised.
    (build_gptj, ["export.triton_deployment.int8_mode=1", "export.triton_deployment.data_type=fp16"],
     "export.triton_deployment.int8_mode=0"),
    # FT builds GPT-NeoX as <half> for fp16 and <float> otherwise: bf16 would silently run in fp32.
    (lambda d: build_gptneox(d, rotary_emb_base=10000), ["export.triton_deployment.data_type=bf16"],
     "export.triton_deployment.data_type=fp16"),
    # FT's rotary kernels use base 10000 whatever the checkpoint says.
    (lambda d: build_gptneox(d, rotary_emb_base=5000), [], "rotary base 5000 (FT's rotary kernels use 10000)"),
], ids=["gptj", "gptneox", "opt-int8", "gptj-int8", "gptneox-bf16", "gptneox-rotary-base"])
def test_plan_for_fts_backend(tmp_path, builder, overrides, refusal):
    from main import run
    from templates.ft_python.ft_checkpoint import CheckpointError
    from test_config import composed

    checkpoint = builder(tmp_path / "checkpoint")
    cfg = composed(f"base_results_dir={tmp_path / 'results'}", f"export.model.checkpoint_path={checkpoint}",
                   "export.triton_deployment.runtime=fastertransformer", "export.accuracy.enabled=false",
                   *overrides)
    if refusal is None:
        from exporter.config import validate
        from exporter.stages.export import plan

        assert [stage.name for stage in plan(validate(cfg))] == ["convert"]
        return
    with pytest.raises(CheckpointError, match=re.escape(refusal)):
        run(cfg)
    assert not (tmp_path / "results").exists() or not list((tmp_path / "results").rglob("*.bin"))


@pytest.mark.parametrize("overrides, message", [
    (["export.triton_deployment.int8_mode=2"], "SmoothQuant"),  # needs activation scales this export lacks
    (["export.triton_deployment.int8_mode=1"], "fp32 compute"),  # the default data_type is fp32
    (["export.triton_deployment.int8_mode=3"], "is not 0 (off), 1 (weight-only int8) or 2 (SmoothQuant)"),
])
def test_int8_mode_refused_naming_the_key(overrides, message):
    from exporter.config import ConfigError, validate
    from test_config import composed

    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        validate(composed("export.triton_deployment.runtime=fastertransformer", *overrides))
    assert str(error.value).startswith("export.triton_deployment.int8_mode")


def test_python_runtime_refuses_int8_naming_the_runtime_that_has_it():
    from exporter.config import ConfigError, validate
    from test_config import composed

    with pytest.raises(ConfigError, match="runtime=fastertransformer") as error:
        validate(composed("export.triton_deployment.int8_mode=1"))
    assert str(error.value).startswith("export.triton_deployment.int8_mode")
