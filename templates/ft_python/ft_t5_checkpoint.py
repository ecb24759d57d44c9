"""Read and check FasterTransformer T5 weight shards (`<tp>-gpu/` directories of an encoder-decoder model).

Self-contained (stdlib + numpy; torch where tensors are loaded): copied into generated Triton model repositories
beside ft_checkpoint.py, whose `CheckpointError` and dtype tables it shares. The exporter imports `T5Config` (the T5
config.ini schema), `tensor_table` and `expected_files` from here, so the schema and the file list live in one place.

The layout is the one FasterTransformer's own converter writes (examples/pytorch/t5/utils/
huggingface_t5_ckpt_convert.py) and its T5 loaders open (src/fastertransformer/models/t5/T5EncoderWeight.cc,
T5EncoderLayerWeight.cc, T5DecodingWeight.cc, T5DecoderLayerWeight.cc; config.ini read by
src/fastertransformer/triton_backend/t5/T5TritonModel.cc). Documented file by file in exporter/arch/t5_layout.md:
raw row-major little-endian arrays of config.ini `weight_data_type`, HF names kept as file names, every HF
nn.Linear weight transposed to [in, out], tensor-parallel pieces suffixed `.<rank>.bin`.
"""

import configparser
import dataclasses
import os

import numpy as np

try:  # imported as templates.ft_python.ft_t5_checkpoint inside the project
    from .ft_checkpoint import DTYPE_BYTES, CheckpointError
except ImportError:  # imported as a top-level module inside a Triton model directory
    from ft_checkpoint import DTYPE_BYTES, CheckpointError

SECTIONS = ("encoder", "decoder")
# feed_forward_proj values served: T5's ReLU MLP and T5 v1.1 / Flan-T5 / UL2's gated GELU (HF computes it with
# gelu_new, the tanh approximation, as FT's GeGLU kernel does).
FEED_FORWARD_PROJ = ("relu", "gated-gelu")
# FT's Triton T5 model fixes the relative attention's max distance ("use default value of huggingface here").
FT_MAX_DISTANCE = 128
# Written by FT's converter (the embedding transposed, [d_model, vocab]) but opened by none of FT's loaders.
WRITTEN_NOT_OPENED = ("shared.weight",)
# The key FT's converter renames (relative_attention_num_buckets) and the name its loaders read.
BUCKETS_KEY = "relative_attention_num_buckets_or_max_pos_seq_len"


@dataclasses.dataclass(frozen=True, kw_only=True)
class T5Config:
    """config.ini of a T5 export: [encoder], [decoder] (the same hyper-parameters, each section with its own layer
    count, as FT's converter writes HF's encoder and decoder configs) and [structure].

    `scale_decoder_output` is written as FT's `tie_word_embeddings` key: FT (T5Decoding.cc) and HF multiply the
    decoder's output by d_model ** -0.5 before the output layer when it is true (original T5), not otherwise
    (T5 v1.1, Flan-T5, UL2; transformers 5 calls it `scale_decoder_outputs`).
    """

    name_or_path: str = ""
    num_heads: int
    d_kv: int
    d_model: int
    d_ff: int
    vocab_size: int
    encoder_num_layers: int
    decoder_num_layers: int
    relative_attention_num_buckets: int
    relative_attention_max_distance: int = FT_MAX_DISTANCE
    feed_forward_proj: str = "relu"
    layer_norm_epsilon: float = 1e-6
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    scale_decoder_output: bool = True
    weight_data_type: str = "fp32"
    tensor_para_size: int = 1
    pipeline_para_size: int = 1

    def __post_init__(self):
        if self.feed_forward_proj not in FEED_FORWARD_PROJ:
            raise CheckpointError(f"feed_forward_proj {self.feed_forward_proj!r} is not supported "
                                  f"(supported: {', '.join(FEED_FORWARD_PROJ)})")
        if self.weight_data_type not in DTYPE_BYTES:
            raise CheckpointError(f"weight_data_type {self.weight_data_type!r} is not one of {sorted(DTYPE_BYTES)}")

    @property
    def gated(self):
        return self.feed_forward_proj.startswith("gated-")

    @property
    def inner_dim(self):
        """Attention width: num_heads * d_kv (may differ from d_model)."""
        return self.num_heads * self.d_kv

    @property
    def num_layer(self):
        """Encoder plus decoder layers: the units the exporter's writer reports progress in."""
        return self.encoder_num_layers + self.decoder_num_layers

    # -- config.ini text -------------------------------------------------------------------------
    def section_keys(self, section):
        """{key: text} of [encoder] or [decoder], in file order: HF T5Config keys under FT's names."""
        decoder = section == "decoder"
        return {
            "_name_or_path": self.name_or_path,
            "model_type": "t5",
            "num_heads": str(self.num_heads),
            "d_kv": str(self.d_kv),
            "d_model": str(self.d_model),
            "d_ff": str(self.d_ff),
            "num_layers": str(self.decoder_num_layers if decoder else self.encoder_num_layers),
            "num_decoder_layers": str(self.decoder_num_layers),
            "vocab_size": str(self.vocab_size),
            BUCKETS_KEY: str(self.relative_attention_num_buckets),
            "relative_attention_max_distance": str(self.relative_attention_max_distance),
            "feed_forward_proj": self.feed_forward_proj,
            "layer_norm_epsilon": repr(float(self.layer_norm_epsilon)),
            "is_decoder": str(decoder),
            "is_encoder_decoder": str(not decoder),  # as HF's decoder sub-config says
            "pad_token_id": str(self.pad_token_id),
            "eos_token_id": str(self.eos_token_id),
            "decoder_start_token_id": str(self.decoder_start_token_id),
            "tie_word_embeddings": str(self.scale_decoder_output),
            "weight_data_type": self.weight_data_type,
            "tensor_para_size": str(self.tensor_para_size),
            "pipeline_para_size": str(self.pipeline_para_size),
        }

    def to_ini(self):
        lines = []
        for section in SECTIONS:
            lines += [f"[{section}]"] + [f"{key} = {value}" for key, value in self.section_keys(section).items()]
            lines.append("")
        lines += ["[structure]", "t5_with_bias = false", f"use_gated_activation = {str(self.gated).lower()}",
                  "position_embedding_type = relative", ""]
        return "\n".join(lines) + "\n"

    @classmethod
    def from_ini(cls, path, tensor_para_size=None):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise CheckpointError(f"missing file: {path}")
        with open(path, encoding="utf-8") as handle:
            return cls.from_text(handle.read(), path, tensor_para_size)

    @classmethod
    def from_text(cls, text, origin="config.ini", tensor_para_size=None):
        """Parse config.ini text; both sections must agree on every shared key (one model width, one vocabulary).

        Also reads the config.ini FT's own converter writes (HF's to_dict values, Python-style booleans, no
        tensor_para_size / pipeline_para_size keys: `tensor_para_size` then gives the split, e.g. from the
        `<tp>-gpu` directory name)."""
        parser = configparser.ConfigParser(interpolation=None)
        try:
            parser.read_string(text, source=origin)
        except configparser.Error as exc:
            raise CheckpointError(f"{origin}: {exc}") from None
        missing = [name for name in (*SECTIONS, "structure") if not parser.has_section(name)]
        if missing:
            raise CheckpointError(f"{origin}: missing section(s) {missing} (a T5 config.ini has [encoder], "
                                  "[decoder] and [structure])")
        for key, expected in (("t5_with_bias", False), ("position_embedding_type", "relative")):
            value = parser.get("structure", key, fallback=None)
            found = _parse_bool(key, value, origin) if expected is False and value is not None else value
            if value is not None and found != expected:
                raise CheckpointError(f"{origin}: [structure] {key} = {value} is not supported (only {expected})")
        values = {}
        for section in SECTIONS:
            raw = parser[section]
            read = {}
            for field in dataclasses.fields(cls):
                key = _INI_KEYS.get(field.name, field.name)
                if field.name in ("encoder_num_layers", "decoder_num_layers"):
                    continue
                if key not in raw:
                    if field.default is dataclasses.MISSING:
                        raise CheckpointError(f"{origin}: [{section}] lacks the key {key}")
                    continue
                read[field.name] = _parse(field.type, key, raw[key], origin)
            if "num_layers" not in raw:
                raise CheckpointError(f"{origin}: [{section}] lacks the key num_layers")
            read[f"{section}_num_layers"] = _parse("int", "num_layers", raw["num_layers"], origin)
            for name, value in read.items():
                if name in values and values[name] != value:
                    raise CheckpointError(f"{origin}: [encoder] and [decoder] disagree on "
                                          f"{_INI_KEYS.get(name, name)} ({values[name]} vs {value})")
                values[name] = value
        if "tensor_para_size" not in values and tensor_para_size is not None:
            values["tensor_para_size"] = tensor_para_size
        gated = parser.get("structure", "use_gated_activation", fallback="false")
        config = cls(**values)
        if _parse_bool("use_gated_activation", gated, origin) != config.gated:
            raise CheckpointError(f"{origin}: [structure] use_gated_activation = {gated} contradicts "
                                  f"feed_forward_proj {config.feed_forward_proj}")
        return config


# Field name -> config.ini key where they differ.
_INI_KEYS = {"name_or_path": "_name_or_path", "relative_attention_num_buckets": BUCKETS_KEY,
             "scale_decoder_output": "tie_word_embeddings"}


def _parse(kind, key, text, origin):
    try:
        if kind in ("bool", bool):
            return _parse_bool(key, text, origin)
        if kind in ("int", int):
            return int(text)
        if kind in ("float", float):
            return float(text)
    except ValueError:
        raise CheckpointError(f"{origin}: {key} = {text!r} is not a {kind}") from None
    return text.strip()


def _parse_bool(key, text, origin):
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):  # FT's INIReader GetBoolean accepts these, any case
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise CheckpointError(f"{origin}: {key} = {text!r} is not a boolean")


def read_config(shard_dir):
    """`<shard_dir>/config.ini`; without a tensor_para_size key (FT's converter writes none) the directory's
    `<tp>-gpu` name gives it."""
    name = os.path.basename(os.path.normpath(os.fspath(shard_dir)))
    tp = int(name[:-len("-gpu")]) if name.endswith("-gpu") and name[:-len("-gpu")].isdigit() else None
    return T5Config.from_ini(os.path.join(os.fspath(shard_dir), "config.ini"), tp)


def tensor_table(config):
    """Ordered [(stem, per-rank shape, split)] for every file of a T5 shard directory.

    split: None (one file `<stem>.bin`, the same for every rank), "column" / "row" (TP pieces `<stem>.<rank>.bin`
    concatenated on the last / first dim to merge). Shapes as FT's loaders size them (element counts per rank:
    T5EncoderWeight / T5EncoderLayerWeight / T5DecodingWeight / T5DecoderLayerWeight `initialize()`).
    """
    tp = config.tensor_para_size
    for name, value in (("num_heads", config.num_heads), ("d_ff", config.d_ff)):
        if tp < 1 or value % tp:
            raise CheckpointError(f"{name}={value} is not divisible by tensor_para_size={tp}")
    d, vocab, buckets = config.d_model, config.vocab_size, config.relative_attention_num_buckets
    width, inter, heads = config.inner_dim // tp, config.d_ff // tp, config.num_heads // tp
    fcs = ("wi", "wi2") if config.gated else ("wi",)
    table = [
        ("shared.weight", (d, vocab), None),  # FT's converter writes it; no loader opens it
        ("shared.weight_T", (vocab, d), None),  # the embedding [vocab, d_model] (encoder and decoder)
        ("lm_head.weight", (vocab, d), None),  # [vocab, d_model]: FT's decoder uses it iff the file exists
        ("encoder.final_layer_norm.weight", (d,), None),
        ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", (heads, buckets), "row"),
        ("decoder.final_layer_norm.weight", (d,), None),
        ("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", (heads, buckets), "row"),
    ]
    for i in range(config.encoder_num_layers):
        p = f"encoder.block.{i}."
        table += [(p + f"layer.0.SelfAttention.{n}.weight", (d, width), "column") for n in "qkv"]
        table += [(p + "layer.0.SelfAttention.o.weight", (width, d), "row"),
                  (p + "layer.0.layer_norm.weight", (d,), None)]
        table += [(p + f"layer.1.DenseReluDense.{fc}.weight", (d, inter), "column") for fc in fcs]
        table += [(p + "layer.1.DenseReluDense.wo.weight", (inter, d), "row"),
                  (p + "layer.1.layer_norm.weight", (d,), None)]
    for i in range(config.decoder_num_layers):
        p = f"decoder.block.{i}."
        table += [(p + "layer.0.layer_norm.weight", (d,), None),
                  (p + "layer.0.SelfAttention.qkv.weight", (d, 3, width), "column"),
                  (p + "layer.0.SelfAttention.o.weight", (width, d), "row"),
                  (p + "layer.1.layer_norm.weight", (d,), None)]
        # k and v read the encoder's output: FT sizes them by mem_d_model, the encoder's d_model (the same here)
        table += [(p + f"layer.1.EncDecAttention.{n}.weight", (d, width), "column") for n in "qkv"]
        table += [(p + "layer.1.EncDecAttention.o.weight", (width, d), "row"),
                  (p + "layer.2.layer_norm.weight", (d,), None)]
        table += [(p + f"layer.2.DenseReluDense.{fc}.weight", (d, inter), "column") for fc in fcs]
        table.append((p + "layer.2.DenseReluDense.wo.weight", (inter, d), "row"))
    return table


def weight_shapes(config):
    """Ordered {file name: element shape} of every file (one rank's shape for split tensors)."""
    shapes = {}
    for stem, shape, split in tensor_table(config):
        names = [stem + ".bin"] if split is None else [f"{stem}.{r}.bin" for r in range(config.tensor_para_size)]
        shapes.update({name: shape for name in names})
    return shapes


def expected_files(config):
    """{file name: exact byte size} of every file written for `config`. Pure: touches no files."""
    nbytes = DTYPE_BYTES[config.weight_data_type]
    return {name: int(np.prod(shape)) * nbytes for name, shape in weight_shapes(config).items()}


def verify(shard_dir):
    """Check config.ini and every weight file; return the parsed T5Config (CheckpointError naming every missing
    or wrongly sized file otherwise: FT itself would only warn and serve uninitialised weights)."""
    shard_dir = os.fspath(shard_dir)
    if not os.path.isdir(shard_dir):
        raise CheckpointError(f"checkpoint directory does not exist: {shard_dir}")
    config = read_config(shard_dir)
    missing, wrong = [], []
    for name, size in expected_files(config).items():
        path = os.path.join(shard_dir, name)
        if not os.path.isfile(path):
            missing.append(name)
        elif os.path.getsize(path) != size:
            wrong.append(f"{name} (expected {size} bytes, found {os.path.getsize(path)} bytes)")
    if missing or wrong:
        lines = [f"FasterTransformer T5 checkpoint {shard_dir} is incomplete or corrupt "
                 f"(weight_data_type={config.weight_data_type}, tensor_para_size={config.tensor_para_size}):"]
        if missing:
            lines.append(f"{len(missing)} missing file(s): " + ", ".join(missing))
        if wrong:
            lines.append(f"{len(wrong)} file(s) with the wrong size: " + ", ".join(wrong))
        raise CheckpointError("\n".join(lines))
    return config


def _read_raw(path, shape, weight_data_type):
    import torch  # here, not with the module: the exporter's launcher reads config.ini without torch

    if weight_data_type == "bf16":  # numpy has no bfloat16: read the bit patterns, reinterpret in torch
        return torch.from_numpy(np.fromfile(path, dtype="<i2")).view(torch.bfloat16).reshape(shape)
    return torch.from_numpy(np.fromfile(path, dtype="<f4" if weight_data_type == "fp32" else "<f2")).reshape(shape)


def load_weights(shard_dir, device="cpu", dtype=None):
    """A verified T5 shard directory as full (TP-merged) tensors keyed by file stem, in FT's layouts:
    linear weights [in, out]; decoder self-attention qkv [d_model, 3, heads * d_kv] (q | k | v); relative attention
    biases [heads, buckets]; shared.weight_T and lm_head.weight [vocab, d_model]. shared.weight (the transposed
    copy no FT loader reads) is left out. `dtype` defaults to float32."""
    import torch

    dtype = torch.float32 if dtype is None else dtype
    shard_dir = os.fspath(shard_dir)
    config = verify(shard_dir)
    tp, wdt = config.tensor_para_size, config.weight_data_type
    weights = {}
    for stem, shape, split in tensor_table(config):
        if stem in WRITTEN_NOT_OPENED:
            continue
        if split is None:
            full = _read_raw(os.path.join(shard_dir, stem + ".bin"), shape, wdt)
        else:
            parts = [_read_raw(os.path.join(shard_dir, f"{stem}.{r}.bin"), shape, wdt) for r in range(tp)]
            full = torch.cat(parts, dim=0 if split == "row" else -1)
        weights[stem] = full.to(device=device, dtype=dtype).contiguous()
    return weights
