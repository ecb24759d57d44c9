"""A llama.cpp GGUF file read as if it were an HF checkpoint: HF tensor names and shapes, a config.json dict built
from the metadata, one de-quantised tensor at a time.

gguf_header.py parses the header (metadata and the tensor table; gguf's own GGUFReader takes seconds over a large
vocabulary); each tensor's bytes are read with one positioned read (as hf.py reads safetensors: pages touched through
a map stay resident until it is unmapped), then de-quantised with `gguf.quants.dequantize`. Peak memory follows the
largest tensor (its quantised bytes plus its float32 values), not the model.

What llama.cpp's converter changed, undone here:
- tensor names (`blk.{i}.attn_q.weight` ...) -> the HF names the architecture files read (`TENSOR_NAMES`);
- shapes: GGUF lists dimensions innermost first (`[in, out]` for an HF `[out, in]` weight);
- q and k rows (`llama` files): permuted per head from HF's rotary halves to llama.cpp's interleaved pairs
  (`_unpermute`);
- the tokenizer: rebuilt from the metadata by gguf_tokenizer.py.
Everything is checked on opening (architecture, every tensor's type and name, the tokenizer), before anything is
written.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from templates.ft_python.ft_checkpoint import CheckpointError

from ..lazy import torch
from . import gguf_tokenizer
from .gguf_header import MAGIC, GGUFHeader

# De-quantised by `gguf.quants.dequantize` (names as `gguf.GGMLQuantizationType` spells them); each is tested
# against transformers reading the same bytes (Q5_0 / Q5_1 are left out: transformers, the reference, cannot).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# Types kept in their own precision; every quantised type becomes float32, as transformers de-quantises.
_FLOAT_TYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}  # torch dtype names

# llama.cpp tensor name -> HF name (`{i}`: the block index). Llama's names, which Qwen2 shares (with q/k/v biases).
TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.attn_output.bias": "model.layers.{i}.self_attn.o_proj.bias",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
_PATTERNS = [
    (re.compile(re.escape(gguf).replace(r"\{i\}", r"(\d+)") + r"\Z"), hf) for gguf, hf in TENSOR_NAMES.items()
]
# Rows permuted by llama.cpp's converter for its rotary layout, and whose heads count: q by all heads, k by kv heads.
_PERMUTED = {"attn_q": "num_attention_heads", "attn_k": "num_key_value_heads"}


def is_gguf(path: Path) -> bool:
    """A file that starts with GGUF's magic bytes."""
    if not path.is_file():
        return False
    with open(path, "rb") as handle:
        return handle.read(4) == MAGIC


def _llama_config(key: Callable[..., Any], tensor_names: set[str]) -> dict[str, Any]:
    """The `LlamaForCausalLM` config.json that llama.cpp's `llama.*` keys describe."""
    heads = key("attention.head_count")
    hidden = key("embedding_length")
    head_dim = key("attention.key_length", hidden // heads)
    rotary = key("rope.dimension_count", head_dim)
    if rotary != head_dim:
        raise CheckpointError(f"GGUF rope.dimension_count {rotary} != head dimension {head_dim} (partial rotary "
                              "is not Llama)")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "max_position_embeddings": key("context_length"),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon"),
        "rope_theta": key("rope.freq_base", 10000.0),
        "hidden_act": "silu",
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": False,
        # llama.cpp writes the output layer only when it is not the embedding again.
        "tie_word_embeddings": "output.weight" not in tensor_names,
    }
    scaling = key("rope.scaling.type", None)
    if scaling not in (None, "none"):
        # Handed on as transformers names it: the architecture refuses a type it cannot compute.
        config["rope_scaling"] = {"rope_type": scaling, "factor": key("rope.scaling.factor", 1.0),
                                  "original_max_position_embeddings": key("rope.scaling.original_context_length",
                                                                          config["max_position_embeddings"])}
    return config


def _qwen2_config(key: Callable[..., Any], tensor_names: set[str]) -> dict[str, Any]:
    """The `Qwen2ForCausalLM` config.json of llama.cpp's `qwen2.*` keys: Llama's, with q/k/v biases (the
    architecture file adds them) and no sliding window (llama.cpp writes none; Qwen2's default is off)."""
    return {**_llama_config(key, tensor_names), "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
            "use_sliding_window": False}


# general.architecture -> the HF config built from its `<architecture>.*` keys. llama.cpp writes Mistral (and
# Llama-2 / 3) files as "llama", with the same tensors.
ARCHITECTURES: dict[str, Callable[[Callable[..., Any], set[str]], dict[str, Any]]] = {
    "llama": _llama_config, "qwen2": _qwen2_config}
# The architectures whose q/k rows llama.cpp's converter permuted: those it runs with interleaved rotary pairs
# (qwen2 runs NeoX-style rotary on HF's own row order).
PERMUTED_ARCHITECTURES = ("llama",)


@functools.lru_cache(maxsize=4)
def _reader(path: Path, size: int, mtime: float) -> GGUFHeader:
    """One parsed header per file version (the launcher and the architecture both open the file)."""
    return GGUFHeader(path)


class GGUFCheckpoint:
    """One .gguf file with HFCheckpoint's interface: `config`, `names()`, `shape()`, `dtype()`, `load()`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not is_gguf(self.path):
            raise CheckpointError(f"{self.path} is not a GGUF file (no GGUF magic)")
        stat = self.path.stat()
        try:
            self.reader = _reader(self.path.resolve(), stat.st_size, stat.st_mtime)
        except (ValueError, UnicodeDecodeError) as error:  # a damaged, truncated or big-endian header
            raise CheckpointError(f"{self.path}: unreadable GGUF header ({error})") from None
        self.metadata = _Metadata(self.reader)
        architecture = self.metadata.get("general.architecture")
        if architecture not in ARCHITECTURES:
            raise CheckpointError(f"{self.path}: GGUF architecture {architecture!r} is not supported "
                                  f"(supported: {', '.join(sorted(ARCHITECTURES))})")
        self._permuted = architecture in PERMUTED_ARCHITECTURES
        tensors = {tensor.name: tensor for tensor in self.reader.tensors}
        self.config = ARCHITECTURES[architecture](self.metadata.prefixed(architecture), set(tensors))
        self._check_types(tensors.values())
        self._tensors = {self._hf_name(name): tensor for name, tensor in tensors.items()}
        self.config["vocab_size"] = self.shape("model.embed_tokens.weight")[0]
        # Refused now (unknown tokenizer model or pre-tokenizer), not after the shards are written.
        self.tokenizer, self.tokenizer_config = gguf_tokenizer.build(self.metadata)
        for name in ("bos", "eos", "pad"):
            token_id = self.metadata.get(f"tokenizer.ggml.{'padding' if name == 'pad' else name}_token_id")
            if token_id is not None:
                self.config[f"{name}_token_id"] = int(token_id)

    def _check_types(self, tensors) -> None:
        unsupported = sorted({tensor.tensor_type.name for tensor in tensors} - set(SUPPORTED_TYPES))
        if unsupported:
            examples = [tensor.name for tensor in tensors if tensor.tensor_type.name in unsupported][:3]
            raise CheckpointError(f"{self.path}: GGUF tensor type(s) {unsupported} not supported (e.g. {examples}); "
                                  f"supported: {', '.join(SUPPORTED_TYPES)}")

    def _hf_name(self, name: str) -> str:
        for pattern, hf in _PATTERNS:
            match = pattern.match(name)
            if match:
                return hf.format(i=match.group(1)) if match.groups() else hf
        raise CheckpointError(f"{self.path}: GGUF tensor {name!r} has no HF name here (known: "
                              f"{', '.join(TENSOR_NAMES)})")

    # -- HFCheckpoint's interface ----------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._tensors)

    def _tensor(self, name: str):
        try:
            return self._tensors[name]
        except KeyError:
            raise CheckpointError(f"tensor {name!r} is not in checkpoint {self.path}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(dim) for dim in reversed(self._tensor(name).shape))  # GGUF: innermost dimension first

    def dtype(self, name: str) -> torch.dtype:
        return getattr(torch, _FLOAT_TYPES.get(self._tensor(name).tensor_type.name, "float32"))

    def load(self, name: str, scratch=None) -> torch.Tensor:
        """One tensor, de-quantised, in HF's layout (`scratch` is accepted for HFCheckpoint's interface)."""
        from gguf import quants

        tensor = self._tensor(name)
        raw = np.empty(tensor.n_bytes, dtype=np.uint8)
        with open(self.path, "rb", buffering=0) as handle:
            handle.seek(tensor.data_offset)
            if handle.readinto(memoryview(raw)) != tensor.n_bytes:
                raise CheckpointError(f"{self.path} is truncated: cannot read {tensor.name}")
        shape = self.shape(name)
        kind = tensor.tensor_type.name
        if kind in _FLOAT_TYPES:
            values = torch.from_numpy(raw).view(getattr(torch, _FLOAT_TYPES[kind])).reshape(shape)
        else:
            # [rows, bytes per row] -> [rows, elements per row] float32
            values = torch.from_numpy(quants.dequantize(raw.reshape(shape[0] if len(shape) > 1 else 1, -1),
                                                        tensor.tensor_type)).reshape(shape)
        part = tensor.name.split(".")
        if self._permuted and len(part) == 4 and part[0] == "blk" and part[2] in _PERMUTED:
            values = _unpermute(values, self.config[_PERMUTED[part[2]]])
        return values

    def tokenizer_files(self) -> Iterator[Path]:
        return iter(())  # none on disk: `save_tokenizer` writes the one rebuilt from the metadata

    def save_tokenizer(self, directory: Path) -> None:
        """tokenizer.json and tokenizer_config.json rebuilt from the metadata, into `directory`."""
        gguf_tokenizer.save(self.tokenizer, self.tokenizer_config, Path(directory))


def _unpermute(values: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation. Per head, HF keeps the rotary halves [x0..x{d/2-1}, y0..y{d/2-1}];
    llama.cpp stores the pairs interleaved [x0, y0, x1, y1, ...]: rows [heads, d/2, 2] -> [heads, 2, d/2]."""
    rows = values.shape[0]
    return values.reshape(heads, rows // heads // 2, 2, *values.shape[1:]).transpose(1, 2).reshape(values.shape)


class _Metadata:
    """The GGUF key-value metadata."""

    def __init__(self, reader: GGUFHeader):
        self._fields = reader.fields

    def get(self, key: str, default: Any = None) -> Any:
        return self._fields.get(key, default)

    def prefixed(self, prefix: str) -> Callable[..., Any]:
        """`key(name[, default])` reading `<prefix>.<name>`; a key without a default must be there."""
        missing = object()

        def key(name: str, default: Any = missing) -> Any:
            value = self.get(f"{prefix}.{name}", missing)
            if value is missing:
                if default is missing:
                    raise CheckpointError(f"GGUF metadata lacks {prefix}.{name}")
                return default
            return value

        return key
