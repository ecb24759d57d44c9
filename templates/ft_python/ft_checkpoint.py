"""Read and check FasterTransformer GPT weight shards (`<tp>-gpu/` directories).

Self-contained (stdlib + numpy + torch): this file is copied into generated Triton model
repositories and must work without the exporter project installed. The exporter imports
`expected_files` from here to verify what it wrote, so the file list lives in one place.

Shard layout (FT's GPT C++ loader): raw row-major little-endian arrays, element type =
config.ini `weight_data_type`, matrices stored [in, out], tensor-parallel (TP) pieces
suffixed `.<rank>.bin`. FT itself only warns about a missing or short file and then serves
uninitialised weights; `verify` refuses instead.
"""

import configparser
import os

import numpy as np
import torch

# Bytes per element of each weight_data_type FT understands.
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LM_HEAD_FILE = "model.lm_head.weight.bin"

_INT_KEYS = ("head_num", "size_per_head", "inter_size", "num_layer", "max_pos_seq_len",
             "vocab_size", "start_id", "end_id", "tensor_para_size", "adapter_inter_size")
_FLOAT_KEYS = ("layernorm_eps",)
_BOOL_KEYS = ("has_positional_encoding", "has_pre_decoder_layernorm",
              "has_post_decoder_layernorm", "use_attention_linear_bias", "has_adapters")
_REQUIRED = ("head_num", "size_per_head", "inter_size", "num_layer", "max_pos_seq_len",
             "vocab_size", "end_id", "weight_data_type", "tensor_para_size")
# Values FT uses when a key is absent from config.ini (GPT-2 style model).
_DEFAULTS = {"start_id": 0, "layernorm_eps": 1e-5, "layernorm_type": "pre_layernorm",
             "activation_type": "Gelu", "has_positional_encoding": True,
             "has_pre_decoder_layernorm": False, "has_post_decoder_layernorm": True,
             "use_attention_linear_bias": False, "has_adapters": False, "adapter_inter_size": 0}


class CheckpointError(RuntimeError):
    """The shard directory is missing files, has wrongly sized files or a bad config.ini."""


def _parse_bool(key, text):
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise CheckpointError(f"config.ini [gpt] {key} = {text!r} is not a boolean (1/0/true/false)")


def read_config(shard_dir):
    """Parse `<shard_dir>/config.ini` section [gpt] into a dict of typed values.

    Integers, floats and booleans (1/0/true/false) are converted; other keys stay strings.
    Missing optional keys get FT's defaults; missing required keys raise CheckpointError.
    """
    path = os.path.join(os.fspath(shard_dir), "config.ini")
    if not os.path.isfile(path):
        raise CheckpointError(f"missing file: {path}")
    parser = configparser.ConfigParser()
    parser.read(path)
    if not parser.has_section("gpt"):
        raise CheckpointError(f"{path}: no [gpt] section")
    raw = dict(parser.items("gpt"))
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise CheckpointError(f"{path}: [gpt] lacks required keys: {', '.join(missing)}")
    cfg = dict(_DEFAULTS)
    for key, text in raw.items():
        try:
            if key in _INT_KEYS:
                cfg[key] = int(text)
            elif key in _FLOAT_KEYS:
                cfg[key] = float(text)
            elif key in _BOOL_KEYS:
                cfg[key] = _parse_bool(key, text)
            else:
                cfg[key] = text.strip()
        except ValueError as exc:
            raise CheckpointError(f"{path}: [gpt] {key} = {text!r}: {exc}") from None
    if cfg["weight_data_type"] not in DTYPE_BYTES:
        raise CheckpointError(f"{path}: weight_data_type {cfg['weight_data_type']!r} "
                              f"is not one of {sorted(DTYPE_BYTES)}")
    return cfg


def _check_divisible(config):
    tp = config["tensor_para_size"]
    if tp < 1:
        raise CheckpointError(f"tensor_para_size must be >= 1, got {tp}")
    for key in ("head_num", "inter_size"):
        if config[key] % tp:
            raise CheckpointError(f"{key}={config[key]} is not divisible by tensor_para_size={tp}")


def weight_shapes(config, untied=False):
    """Ordered {file name: element shape} for every file FT's GPT loader opens.

    Shapes are those of one file (one TP rank for split tensors). `untied` adds
    model.lm_head.weight.bin (FT uses it when present, otherwise wte is the output layer).
    """
    _check_divisible(config)
    if config.get("has_adapters"):
        raise CheckpointError("has_adapters=1 checkpoints are not supported")
    tp = config["tensor_para_size"]
    h = config["head_num"] * config["size_per_head"]
    inter = config["inter_size"]
    vocab, max_pos = config["vocab_size"], config["max_pos_seq_len"]
    shapes = {"model.wte.bin": (vocab, h)}
    if config.get("has_positional_encoding", True):
        shapes["model.wpe.bin"] = (max_pos, h)
    if config.get("has_pre_decoder_layernorm", False):
        shapes["model.pre_decoder_layernorm.weight.bin"] = (h,)
        shapes["model.pre_decoder_layernorm.bias.bin"] = (h,)
    if config.get("has_post_decoder_layernorm", True):
        shapes["model.final_layernorm.weight.bin"] = (h,)
        shapes["model.final_layernorm.bias.bin"] = (h,)
    if untied:
        shapes[LM_HEAD_FILE] = (vocab, h)
    for i in range(config["num_layer"]):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight.bin"] = (h,)
        shapes[p + "input_layernorm.bias.bin"] = (h,)
        for r in range(tp):
            shapes[p + f"attention.query_key_value.weight.{r}.bin"] = (h, 3, h // tp)
            shapes[p + f"attention.query_key_value.bias.{r}.bin"] = (3, h // tp)
            shapes[p + f"attention.dense.weight.{r}.bin"] = (h // tp, h)
        shapes[p + "attention.dense.bias.bin"] = (h,)
        shapes[p + "post_attention_layernorm.weight.bin"] = (h,)
        shapes[p + "post_attention_layernorm.bias.bin"] = (h,)
        for r in range(tp):
            shapes[p + f"mlp.dense_h_to_4h.weight.{r}.bin"] = (h, inter // tp)
            shapes[p + f"mlp.dense_h_to_4h.bias.{r}.bin"] = (inter // tp,)
            shapes[p + f"mlp.dense_4h_to_h.weight.{r}.bin"] = (inter // tp, h)
        shapes[p + "mlp.dense_4h_to_h.bias.bin"] = (h,)
    return shapes


def expected_files(config, untied=False):
    """Every weight file name FT's GPT loader opens for `config`, with its exact byte size.

    `config` is a dict as returned by read_config (needs head_num, size_per_head, inter_size,
    num_layer, max_pos_seq_len, vocab_size, tensor_para_size, weight_data_type). Pure: touches
    no files. `untied=True` adds model.lm_head.weight.bin; FT decides by the file's existence.
    """
    dtype = config["weight_data_type"]
    if dtype not in DTYPE_BYTES:
        raise CheckpointError(f"weight_data_type {dtype!r} is not one of {sorted(DTYPE_BYTES)}")
    nbytes = DTYPE_BYTES[dtype]
    return {name: int(np.prod(shape)) * nbytes
            for name, shape in weight_shapes(config, untied).items()}


def is_untied(shard_dir):
    """FT's rule: a separate output projection is used iff model.lm_head.weight.bin exists."""
    return os.path.exists(os.path.join(os.fspath(shard_dir), LM_HEAD_FILE))


def verify(shard_dir):
    """Check config.ini and every weight file; return the parsed config.

    Raises CheckpointError naming every missing file and every file whose byte size differs
    from what config.ini implies (expected vs actual bytes).
    """
    shard_dir = os.fspath(shard_dir)
    if not os.path.isdir(shard_dir):
        raise CheckpointError(f"checkpoint directory does not exist: {shard_dir}")
    config = read_config(shard_dir)
    missing, wrong = [], []
    for name, size in expected_files(config, untied=is_untied(shard_dir)).items():
        path = os.path.join(shard_dir, name)
        if not os.path.isfile(path):
            missing.append(name)
            continue
        actual = os.path.getsize(path)
        if actual != size:
            wrong.append(f"{name} (expected {size} bytes, found {actual} bytes)")
    if missing or wrong:
        lines = [f"FasterTransformer checkpoint {shard_dir} is incomplete or corrupt "
                 f"(weight_data_type={config['weight_data_type']}, "
                 f"tensor_para_size={config['tensor_para_size']}):"]
        if missing:
            lines.append(f"{len(missing)} missing file(s): " + ", ".join(missing))
        if wrong:
            lines.append(f"{len(wrong)} file(s) with the wrong size: " + ", ".join(wrong))
        raise CheckpointError("\n".join(lines))
    return config


def _read_raw(path, shape, weight_dtype):
    """One raw file -> CPU torch tensor of `shape` in the stored dtype."""
    if weight_dtype == "bf16":
        # numpy has no bfloat16: read the 16-bit patterns and reinterpret them in torch.
        arr = np.fromfile(path, dtype="<i2")
        tensor = torch.from_numpy(arr).view(torch.bfloat16)
    else:
        arr = np.fromfile(path, dtype="<f4" if weight_dtype == "fp32" else "<f2")
        tensor = torch.from_numpy(arr)
    return tensor.reshape(shape)


def load_weights(shard_dir, device="cpu", dtype=torch.float32):
    """Load a verified shard directory into full (TP-merged) tensors on `device` in `dtype`.

    Keys are the FT file names without the `.bin` / `.<rank>.bin` suffix, e.g.
    "model.layers.0.attention.query_key_value.weight". Merged shapes:
      qkv weight [h, 3, h] (ranks concatenated on the last dim; heads in order),
      qkv bias [3, h], attention.dense.weight [h, h] (row split: ranks on dim 0),
      dense_h_to_4h weight [h, inter] / bias [inter] (column split: last dim),
      dense_4h_to_h weight [inter, h] (row split), everything else as stored.
    """
    shard_dir = os.fspath(shard_dir)
    config = verify(shard_dir)
    wdt = config["weight_data_type"]
    tp = config["tensor_para_size"]
    shapes = weight_shapes(config, untied=is_untied(shard_dir))
    # Row-split (input dim) tensors are concatenated on dim 0, all other split ones on the last.
    row_split = ("attention.dense.weight", "mlp.dense_4h_to_h.weight")
    pieces = {}
    for name, shape in shapes.items():
        stem = name[:-len(".bin")]
        head, _, last = stem.rpartition(".")
        if last.isdigit() and head.split(".")[-1] in ("weight", "bias"):
            pieces.setdefault(head, [None] * tp)[int(last)] = (name, shape)
        else:
            pieces[stem] = [(name, shape)]
    weights = {}
    for key, parts in pieces.items():
        tensors = [_read_raw(os.path.join(shard_dir, n), s, wdt) for n, s in parts]
        if len(tensors) == 1:
            full = tensors[0]
        else:
            dim = 0 if key.endswith(row_split) else -1
            full = torch.cat(tensors, dim=dim)
        weights[key] = full.to(device=device, dtype=dtype).contiguous()
    return weights
