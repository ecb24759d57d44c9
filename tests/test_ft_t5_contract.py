"""The contract with FasterTransformer's T5 loaders and its Triton T5 model, written down from FT's sources as data.

The tables say which files one tensor-parallel rank of FT's T5 opens, with how many elements, and which config.ini
keys (section, name, how INIReader parses them, default) the backend reads. Tiny seeded HF T5 models (relu tied,
gated-gelu untied) are exported at TP 1 and 2 and the shard directory is checked against them: every file FT opens
exists with exactly the element count it reads (loadWeightFromBin only warns on a short or missing file and
leaves the weights uninitialised), and nothing else is written but the one file FT's own converter writes and no
loader opens (shared.weight.bin). Expected config.ini values come from transformers' T5Config of the source.

Sources (NVIDIA/FasterTransformer at df4a7534):
  src/fastertransformer/models/t5/T5EncoderWeight.cc (initialize, loadModel), T5EncoderLayerWeight.cc,
  T5DecodingWeight.cc (lm_head.weight.bin used iff it exists, else shared.weight_T.bin), T5DecoderLayerWeight.cc;
  src/fastertransformer/triton_backend/t5/T5TritonModel.cc (the constructor taking model_dir: config.ini keys);
  src/fastertransformer/utils/cuda_utils.cc getModelFileType (weight_data_type per section);
  src/fastertransformer/utils/activation_types.h getActivationType (feed_forward_proj strings).
"""

from __future__ import annotations

import configparser
from pathlib import Path

import pytest

from family_fixtures import build_t5

from exporter.ft.convert import convert_checkpoint
from exporter.parallel import ParallelLayout

REQUIRED = object()
BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}

# config.ini keys T5TritonModel(reader, model_dir) reads: (section, key) -> (INIReader getter, default or REQUIRED).
KEYS = {
    ("encoder", "_name_or_path"): ("str", REQUIRED),
    **{(section, key): ("int", REQUIRED) for section in ("encoder", "decoder")
       for key in ("num_heads", "d_kv", "d_model", "d_ff", "num_layers", "vocab_size",
                   "relative_attention_num_buckets_or_max_pos_seq_len")},
    **{(section, "adapter_inter_size"): ("int", 0) for section in ("encoder", "decoder")},
    **{(section, "adapter_norm_position"): ("str", "pre") for section in ("encoder", "decoder")},
    ("encoder", "num_tasks"): ("int", 0),
    ("encoder", "prompt_learning_type"): ("int", 0),
    ("decoder", "decoder_start_token_id"): ("int", REQUIRED),
    ("decoder", "eos_token_id"): ("int", REQUIRED),
    ("decoder", "tie_word_embeddings"): ("bool", True),
    ("structure", "t5_with_bias"): ("bool", False),
    ("structure", "use_gated_activation"): ("bool", False),
    ("structure", "position_embedding_type"): ("str", "relative"),
    ("structure", "ia3_num_tasks"): ("int", 0),
    ("encoder", "feed_forward_proj"): ("str", REQUIRED),
    # getModelFileType(config.ini, "encoder" / "decoder")
    ("encoder", "weight_data_type"): ("str", REQUIRED),
    ("decoder", "weight_data_type"): ("str", REQUIRED),
}
# getActivationType: the strings FT maps (anything else is an error there).
FT_ACTIVATIONS = {"Gelu", "gelu", "Relu", "relu", "Silu", "silu", "GeGLU", "geglu", "gated-gelu", "ReGLU", "reglu",
                  "gated-relu", "SiGLU", "gated-silu"}

# Files one rank opens: (name, element count, condition); {N} layer, {R} rank. Expressions over d (d_model), heads,
# dk (d_kv), inter (d_ff), vocab, buckets, tp, gated (use_gated_activation), with_bias (t5_with_bias).
ENCODER_FILES = (
    ("encoder.final_layer_norm.weight.bin", "d", "True"),
    ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight.{R}.bin", "heads // tp * buckets", "True"),
    ("shared.weight_T.bin", "d * vocab", "True"),
)
ENCODER_LAYER_FILES = (
    ("encoder.block.{N}.layer.0.SelfAttention.q.weight.{R}.bin", "d * (heads // tp) * dk", "True"),
    ("encoder.block.{N}.layer.0.SelfAttention.k.weight.{R}.bin", "d * (heads // tp) * dk", "True"),
    ("encoder.block.{N}.layer.0.SelfAttention.v.weight.{R}.bin", "d * (heads // tp) * dk", "True"),
    ("encoder.block.{N}.layer.0.SelfAttention.o.weight.{R}.bin", "(heads // tp) * dk * d", "True"),
    ("encoder.block.{N}.layer.0.layer_norm.weight.bin", "d", "True"),
    ("encoder.block.{N}.layer.1.DenseReluDense.wi.weight.{R}.bin", "d * (inter // tp)", "True"),
    ("encoder.block.{N}.layer.1.DenseReluDense.wi2.weight.{R}.bin", "d * (inter // tp)", "gated"),
    ("encoder.block.{N}.layer.1.DenseReluDense.wo.weight.{R}.bin", "(inter // tp) * d", "True"),
    ("encoder.block.{N}.layer.1.layer_norm.weight.bin", "d", "True"),
)
DECODER_FILES = (
    ("shared.weight_T.bin", "d * vocab", "True"),
    ("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight.{R}.bin", "heads // tp * buckets", "True"),
    ("decoder.final_layer_norm.weight.bin", "d", "True"),
    ("lm_head.weight.bin", "d * vocab", "exists"),  # else shared.weight_T.bin again
)
DECODER_LAYER_FILES = (
    ("decoder.block.{N}.layer.0.layer_norm.weight.bin", "d", "True"),
    ("decoder.block.{N}.layer.0.SelfAttention.qkv.weight.{R}.bin", "d * 3 * (heads // tp) * dk", "True"),
    ("decoder.block.{N}.layer.0.SelfAttention.o.weight.{R}.bin", "(heads // tp) * dk * d", "True"),
    ("decoder.block.{N}.layer.1.layer_norm.weight.bin", "d", "True"),
    ("decoder.block.{N}.layer.1.EncDecAttention.q.weight.{R}.bin", "d * (heads // tp) * dk", "True"),
    ("decoder.block.{N}.layer.1.EncDecAttention.k.weight.{R}.bin", "d * (heads // tp) * dk", "True"),  # mem_d_model
    ("decoder.block.{N}.layer.1.EncDecAttention.v.weight.{R}.bin", "d * (heads // tp) * dk", "True"),
    ("decoder.block.{N}.layer.1.EncDecAttention.o.weight.{R}.bin", "(heads // tp) * dk * d", "True"),
    ("decoder.block.{N}.layer.2.layer_norm.weight.bin", "d", "True"),
    ("decoder.block.{N}.layer.2.DenseReluDense.wi.weight.{R}.bin", "d * (inter // tp)", "True"),
    ("decoder.block.{N}.layer.2.DenseReluDense.wi2.weight.{R}.bin", "d * (inter // tp)", "gated"),
    ("decoder.block.{N}.layer.2.DenseReluDense.wo.weight.{R}.bin", "(inter // tp) * d", "True"),
)
# Written by FT's converter, opened by no loader.
CONVERTER_ONLY = {"shared.weight.bin"}


def ini_get(parser: configparser.ConfigParser, section: str, key: str, getter: str, default):
    """As FT's INIReader: Get / GetInteger (strtol) / GetBoolean ("true", "yes", "on", "1" and the negatives, any
    case), the default when the key is absent."""
    if not parser.has_option(section, key):
        assert default is not REQUIRED, f"FT requires [{section}] {key}"
        return default
    text = parser.get(section, key)
    if getter == "int":
        return int(text, 0)
    if getter == "bool":
        low = text.lower()
        assert low in ("true", "yes", "on", "1", "false", "no", "off", "0"), (key, text)
        return low in ("true", "yes", "on", "1")
    return text


def opened_files(parser: configparser.ConfigParser, shard_dir: Path, tp: int) -> dict[str, int]:
    """{file: bytes} every rank of FT's T5 opens, from config.ini as FT reads it."""
    read = {f"{section}.{key}": ini_get(parser, section, key, *spec) for (section, key), spec in KEYS.items()}
    values = {name: read[f"encoder.{name}"] for name in ("num_heads", "d_kv", "d_model", "d_ff", "vocab_size")}
    env = {"d": values["d_model"], "heads": values["num_heads"], "dk": values["d_kv"], "inter": values["d_ff"],
           "vocab": values["vocab_size"], "buckets": read["encoder.relative_attention_num_buckets_or_max_pos_seq_len"],
           "tp": tp, "gated": read["structure.use_gated_activation"],
           "with_bias": read["structure.t5_with_bias"], "exists": (shard_dir / "lm_head.weight.bin").is_file()}
    files: dict[str, int] = {}
    element_bytes = {section: BYTES[read[f"{section}.weight_data_type"]] for section in ("encoder", "decoder")}
    for section, global_files, layer_files in (("encoder", ENCODER_FILES, ENCODER_LAYER_FILES),
                                               ("decoder", DECODER_FILES, DECODER_LAYER_FILES)):
        layers = read[f"{section}.num_layers"]
        for rank in range(tp):
            for name, count, condition in global_files + tuple(
                    (name.replace("{N}", str(n)), count, condition) for n in range(layers)
                    for name, count, condition in layer_files):
                if eval(condition, {}, env):
                    files[name.replace("{R}", str(rank))] = eval(count, {}, env) * element_bytes[section]
    return files


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5-contract")
    built = {}
    for variant, gated in (("relu-tied", False), ("gated-untied", True)):
        checkpoint = build_t5(root / variant, gated=gated)
        for tp, dtype in ((1, "fp16"), (2, "fp32")):
            built[variant, tp] = (checkpoint, convert_checkpoint(checkpoint, root / f"{variant}-{tp}",
                                                                 ParallelLayout(tp), dtype), dtype)
    return built


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("variant", ["relu-tied", "gated-untied"])
def test_ft_t5_opens_exactly_what_is_written(exports, variant, tp):
    checkpoint, shard_dir, dtype = exports[variant, tp]
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(shard_dir / "config.ini")
    files = opened_files(parser, shard_dir, tp)
    for name, nbytes in files.items():
        assert (shard_dir / name).is_file(), f"FT opens {name}, not written"
        assert (shard_dir / name).stat().st_size == nbytes, name
    written = {path.name for path in shard_dir.glob("*.bin")}
    assert written - set(files) == CONVERTER_ONLY


@pytest.mark.parametrize("variant", ["relu-tied", "gated-untied"])
def test_config_ini_as_ft_reads_it(exports, variant):
    from transformers import T5Config as HFT5Config

    checkpoint, shard_dir, dtype = exports[variant, 2]
    hf = HFT5Config.from_pretrained(checkpoint)
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(shard_dir / "config.ini")
    read = {(section, key): ini_get(parser, section, key, *spec) for (section, key), spec in KEYS.items()}
    for section, layers in (("encoder", hf.num_layers), ("decoder", hf.num_decoder_layers)):
        assert read[section, "num_heads"] == hf.num_heads
        assert read[section, "d_kv"] == hf.d_kv
        assert read[section, "d_model"] == hf.d_model
        assert read[section, "d_ff"] == hf.d_ff
        assert read[section, "vocab_size"] == hf.vocab_size
        assert read[section, "num_layers"] == layers
        assert read[section, "relative_attention_num_buckets_or_max_pos_seq_len"] == hf.relative_attention_num_buckets
        assert read[section, "weight_data_type"] == dtype
        assert read[section, "adapter_inter_size"] == 0
    assert read["decoder", "decoder_start_token_id"] == hf.decoder_start_token_id
    assert read["decoder", "eos_token_id"] == hf.eos_token_id
    # FT multiplies the decoder output by d_model ** -0.5 iff tie_word_embeddings (and no bias): HF's own switch
    assert read["decoder", "tie_word_embeddings"] == hf.scale_decoder_outputs
    assert read["structure", "use_gated_activation"] == hf.is_gated_act
    assert read["structure", "t5_with_bias"] is False
    assert read["structure", "position_embedding_type"] == "relative"
    assert read["encoder", "feed_forward_proj"] == hf.feed_forward_proj
    assert read["encoder", "feed_forward_proj"] in FT_ACTIVATIONS
    assert read["encoder", "num_tasks"] == 0 and read["encoder", "prompt_learning_type"] == 0


# fastertransformer_backend all_models/t5/fastertransformer/config.pbtxt (c6936c39): (name, type, dims, reshaped to
# a scalar, optional) of each input, in its order; (name, type, dims) of each output.
FT_T5_INPUTS = (
    ("input_ids", "TYPE_UINT32", [-1], False, False),
    ("sequence_length", "TYPE_UINT32", [1], True, False),
    ("runtime_top_k", "TYPE_UINT32", [1], True, True),
    ("runtime_top_p", "TYPE_FP32", [1], True, True),
    ("beam_search_diversity_rate", "TYPE_FP32", [1], True, True),
    ("temperature", "TYPE_FP32", [1], True, True),
    ("len_penalty", "TYPE_FP32", [1], True, True),
    ("repetition_penalty", "TYPE_FP32", [1], True, True),
    ("random_seed", "TYPE_UINT64", [1], True, True),
    ("is_return_log_probs", "TYPE_BOOL", [1], True, True),
    ("max_output_len", "TYPE_UINT32", [1], True, False),
    ("beam_width", "TYPE_UINT32", [1], True, True),
    ("start_id", "TYPE_UINT32", [1], True, True),
    ("end_id", "TYPE_UINT32", [1], True, True),
    ("bad_words_list", "TYPE_INT32", [2, -1], False, True),
    ("stop_words_list", "TYPE_INT32", [2, -1], False, True),
    ("prompt_learning_task_name_ids", "TYPE_UINT32", [1], True, True),
    ("request_prompt_lengths", "TYPE_UINT32", [1], True, True),
    ("request_prompt_embedding", "TYPE_FP16", [-1, -1], False, True),
    ("ia3_tasks", "TYPE_INT32", [1], True, True),
    ("top_p_decay", "TYPE_FP32", [1], True, True),
    ("top_p_min", "TYPE_FP32", [1], True, True),
    ("top_p_reset_ids", "TYPE_UINT32", [1], True, True),
)
FT_T5_OUTPUTS = (("output_ids", "TYPE_INT32", [-1, -1]), ("sequence_length", "TYPE_INT32", [-1]),
                 ("cum_log_probs", "TYPE_FP32", [-1]), ("output_log_probs", "TYPE_FP32", [-1, -1]))
FT_T5_PARAMETERS = {"tensor_para_size", "pipeline_para_size", "data_type", "enable_custom_all_reduce", "model_type",
                    "model_checkpoint_path"}


def test_t5_model_config_matches_ft_backend_example(tmp_path):
    """The FT runtime's config.pbtxt for a T5 export: FT's all_models/t5 tensors and parameters (model_type "T5",
    no int8_mode: the backend's T5 factory does not read it), the shards' absolute path."""
    from tritonclient.grpc import model_config_pb2 as pb

    from exporter.runtimes import ModelSettings, runtime_for

    settings = ModelSettings(name="t5", runtime="fastertransformer", max_batch_size=8, layout=ParallelLayout(2),
                             data_type="fp16", section="t5")
    config = runtime_for("fastertransformer").model_config(settings, tmp_path / "repo")
    inputs = tuple((tensor.name, pb.DataType.Name(tensor.data_type), list(tensor.dims), tensor.HasField("reshape"),
                    tensor.optional) for tensor in config.input)
    assert inputs == FT_T5_INPUTS
    assert all(not tensor.reshape.shape for tensor in config.input)  # reshape: { shape: [ ] }
    outputs = tuple((tensor.name, pb.DataType.Name(tensor.data_type), list(tensor.dims)) for tensor in config.output)
    assert outputs == FT_T5_OUTPUTS
    assert set(config.parameters) == FT_T5_PARAMETERS
    assert config.parameters["model_type"].string_value == "T5"
    assert config.parameters["tensor_para_size"].string_value == "2"
    assert config.parameters["model_checkpoint_path"].string_value == str(tmp_path / "repo" / "t5" / "1" / "2-gpu")
    assert config.backend == "fastertransformer"
    assert [group.kind for group in config.instance_group] == [pb.ModelInstanceGroup.KIND_CPU]
