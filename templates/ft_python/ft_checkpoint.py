"""Read and check FasterTransformer GPT weight shards (`<tp>-gpu/` directories).

Self-contained (stdlib + numpy; torch where tensors are loaded): this file is copied into generated Triton model
repositories and must work without the exporter project installed. The exporter imports
`FTConfig` (the one config.ini schema), `CheckpointError` and `expected_files` from here, so
the schema and the file list live in one place.

Shard layout (FT's GPT / GPT-J / GPT-NeoX C++ loaders, plus this project's conventions for
what FT lacks: exporter/arch/layout.md): raw row-major little-endian arrays, element type =
config.ini `weight_data_type`, matrices stored [in, out], tensor-parallel (TP) pieces
suffixed `.<rank>.bin`; `tensor_table` is the one table of files and shapes. FT itself only
warns about a missing or short file and then serves uninitialised weights; `verify` refuses.
"""

import configparser
import dataclasses
import os
import re
import typing
from collections.abc import Mapping

import numpy as np

# Bytes per element of each weight_data_type FT understands.
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
LM_HEAD_FILE = "model.lm_head.weight.bin"


def __getattr__(name):
    """TORCH_DTYPES (weight_data_type -> torch dtype), built on first use: torch is imported by the functions that
    load tensors, not with this module, so that the exporter's launcher reads config.ini and the shard table (the
    schema kept here) without paying for torch's import; its sub-stage imports torch once."""
    if name == "TORCH_DTYPES":
        import torch

        globals()[name] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# config.ini sections: FT's GPT (also OPT), GPT-J, GPT-NeoX, and Llama (no FT backend; python runtime only).
SECTIONS = ("gpt", "gptj", "gptneox", "llama")

# Prompt learning (FT's PromptLearningType): config.ini `prompt_learning_type`. Only p/prompt tuning reads tables from
# the shard directory: FT's ParallelGptWeight loads `model.prompt_table.<task_name>.weight.bin` [prompt_length, hidden]
# per [task_<i>] section when the type is 3 (2, prefix prompt, reads per-layer k/v prefixes; 1, soft prompt, takes
# its embeddings in each request and loads nothing).
PROMPT_LEARNING_TYPES = {0: "no_prompt", 1: "soft_prompt", 2: "prefix_prompt", 3: "p_prompt_tuning"}
P_PROMPT_TUNING = 3
# Task names become file names and config.ini section values.
_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# Keys config.ini must have: FT's loaders have no default for them.
REQUIRED_KEYS = ("head_num", "size_per_head", "inter_size", "num_layer", "max_pos_seq_len",
                 "vocab_size", "end_id", "weight_data_type", "tensor_para_size")
# What FT's GPT-J / GPT-NeoX loaders (and this project's [llama] layout) imply where config.ini
# has no key; FTConfig's own defaults are FT's GPT ones. See exporter/arch/layout.md.
SECTION_DEFAULTS = {
    "gpt": {},
    "gptj": {"has_positional_encoding": False, "rotary_style": "gptj", "use_gptj_residual": True,
             "attention_bias": False, "lm_head_bias": True},
    "gptneox": {"has_positional_encoding": False, "rotary_style": "neox", "use_gptj_residual": True},
    "llama": {"has_positional_encoding": False, "norm_type": "rmsnorm", "activation_type": "SiGLU",
              "attention_bias": False, "mlp_bias": False},
}
# FT's loader also looks up the mixture-of-experts structure; a dense model has none.
STRUCTURE = {"gpt_with_moe": "0", "expert_num": "0", "moe_layers": "[]"}
GATED_ACTIVATIONS = ("geglu", "siglu")
# FT's NeoX converter stores these biases divided by tensor_para_size (each rank adds its share
# before the all-reduce); merged weights multiply them back.
_NEOX_RANK_SCALED = ("attention.dense.bias", "mlp.dense_4h_to_h.bias", "mlp.attention.bias.sum")


class CheckpointError(ValueError, RuntimeError):
    """A checkpoint (the source the exporter reads, or a shard directory: missing or wrongly sized files, a bad
    config.ini) cannot be used. The one such class for the exporter and the runtime: a ValueError, as the exporter's
    callers catch bad input, and a RuntimeError, as the runtime's callers catch a failed load."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class FTConfig(Mapping):
    """config.ini, the one schema: every key FT's loaders (GPT, GPT-J, GPT-NeoX and its Triton
    backend) read, plus this project's keys for what FT has no key for (exporter/arch/layout.md),
    typed and in file order, and the section they live in. Defaults are FT's GPT ones;
    `from_mapping` / `from_ini` fill what is absent with the section's (SECTION_DEFAULTS).

    Also a read-only mapping (config["end_id"], "key" in config, {**config}) with "section"
    among its keys, for callers that index the dict read_config used to return.
    """

    model_name: str = ""
    head_num: int
    size_per_head: int
    inter_size: int
    num_layer: int
    max_pos_seq_len: int
    vocab_size: int  # rows of the embedding and output layer (a checkpoint's padded vocabulary included)
    # Ids the tokenizer can decode are [0, tokenizer_vocab_size); the rows from there to vocab_size are padding
    # (GPT-J 50400 vs 50257, Pythia, OPT, Megatron's make_vocab_size_divisible_by) that the python runtime never
    # generates. 0: no padding (replaced by vocab_size on construction), as config.ini files without the key mean.
    tokenizer_vocab_size: int = 0
    start_id: int = 0
    end_id: int = 0  # required in config.ini (REQUIRED_KEYS)
    weight_data_type: str = "fp32"
    tensor_para_size: int = 1
    pipeline_para_size: int = 1
    layernorm_eps: float = 1e-5
    layernorm_type: str = "pre_layernorm"  # | post_layernorm
    activation_type: str = "Gelu"  # Gelu | Relu | Silu | GeGLU | SiGLU (the last two gated)
    # GELU flavour for Gelu/GeGLU: "tanh" (FT's kernel, GPT-2's gelu_new) or "none" (exact erf
    # GELU: NeMo's default, Pythia's `gelu`). FT's backend always computes tanh; the python
    # runtime follows the key.
    gelu_approximation: str = "tanh"
    has_positional_encoding: bool = True
    has_pre_decoder_layernorm: bool = False
    has_post_decoder_layernorm: bool = True
    has_adapters: bool = False
    adapter_inter_size: int = 0
    use_attention_linear_bias: bool = False
    int8_mode: int = 0
    rotary_embedding: int = 0  # rotary dims per head, 0 = none
    rotary_style: str = "neox"  # gptj (interleaved pairs) | neox (halves)
    rope_theta: float = 10000.0
    # Scaled rotary (HF rope_parameters / rope_scaling; ft_rotary.py computes the tables). The
    # defaults are unscaled RoPE, so shards written before these keys load unchanged.
    rope_type: str = "default"  # default | linear | dynamic | yarn | llama3
    rope_scaling_factor: float = 1.0
    # The context length the scaling is relative to: HF original_max_position_embeddings (llama3,
    # yarn), max_position_embeddings (dynamic); 0 = unused.
    rope_original_max_positions: int = 0
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_beta_fast: float = 32.0  # yarn
    rope_beta_slow: float = 1.0  # yarn
    rope_truncate: bool = True  # yarn: round the correction range outwards
    rope_attention_factor: float = 1.0  # yarn: cos and sin are multiplied by it
    use_gptj_residual: bool = False  # parallel attention + MLP
    kv_head_num: int = 0  # 0: as many as head_num (replaced by head_num on construction)
    # Model width h; 0: head_num * size_per_head (replaced on construction). Differs where the
    # source sets its own head_dim (Gemma, Qwen3): q/k/v and attention.dense then use the
    # attention width head_num * size_per_head, everything else h.
    hidden_units: int = 0
    # Per-head RMSNorm of q and k before rotary (Qwen3): attention.{q,k}_layernorm.weight [d]
    qk_norm: bool = False
    # Token embeddings are multiplied by it, in the compute dtype (Gemma: sqrt(h)); the output
    # layer uses wte unscaled.
    embedding_multiplier: float = 1.0
    norm_type: str = "layernorm"  # | rmsnorm
    attention_bias: bool = True
    mlp_bias: bool = True
    # With attention_bias: whether attention.dense (the output projection) has a bias too; 0 = only
    # q/k/v carry biases (Qwen2).
    attention_output_bias: bool = True
    # Sliding-window attention (Mistral, Qwen2): a query at position i sees keys at positions
    # > i - sliding_window, in the layers listed (comma-separated global indices); 0 = none.
    sliding_window: int = 0
    sliding_window_layers: str = ""
    lm_head_bias: bool = False
    # Prompt learning (PROMPT_LEARNING_TYPES), written only when the type is not 0. FT reads them from the model's
    # section (ParallelGptTritonModel: prompt_learning_start_id defaults to end_id + 1 there; the exporter always
    # writes it) plus `num_tasks` and one [task_<i>] section per task, i = the id a request names in
    # prompt_learning_task_name_ids.
    prompt_learning_type: int = 0
    prompt_learning_start_id: int = 0  # input ids >= it are virtual tokens: row (id - start) of the task's table
    prompt_tasks: tuple = ()  # ((task_name, prompt_length), ...) in task-id order; [task_<i>] sections, not keys
    section: str = "gpt"  # one of SECTIONS: the [section] of config.ini, not a key

    def __post_init__(self):
        if not self.kv_head_num:
            object.__setattr__(self, "kv_head_num", self.head_num)
        if not self.hidden_units:
            object.__setattr__(self, "hidden_units", self.head_num * self.size_per_head)
        if not self.tokenizer_vocab_size:
            object.__setattr__(self, "tokenizer_vocab_size", self.vocab_size)
        if not 0 < self.tokenizer_vocab_size <= self.vocab_size:
            raise CheckpointError(f"tokenizer_vocab_size {self.tokenizer_vocab_size} must be in [1, vocab_size "
                                  f"{self.vocab_size}] (0 = no padding)")
        object.__setattr__(self, "prompt_tasks", tuple((str(n), int(k)) for n, k in self.prompt_tasks))
        self._check_prompt_learning()

    def _check_prompt_learning(self):
        if self.prompt_learning_type not in PROMPT_LEARNING_TYPES:
            raise CheckpointError(f"prompt_learning_type {self.prompt_learning_type} is not one of "
                                  f"{PROMPT_LEARNING_TYPES}")
        names = [name for name, _ in self.prompt_tasks]
        bad = [name for name in names if not _TASK_NAME.match(name)]
        if bad:
            raise CheckpointError(f"prompt task names {bad} must be letters, digits, '_', '.' or '-' "
                                  "(they name files)")
        if len(set(names)) != len(names):
            raise CheckpointError(f"prompt task names repeat: {names}")
        short = [name for name, length in self.prompt_tasks if length < 1]
        if short:
            raise CheckpointError(f"prompt tasks {short} have prompt_length < 1")
        if self.prompt_tasks and self.prompt_learning_type == 0:
            raise CheckpointError("prompt tasks are listed but prompt_learning_type is 0 (none)")
        if self.prompt_learning_type and self.prompt_learning_start_id < self.vocab_size:
            # FT's default is end_id + 1; ids from there on would be read as virtual tokens, vocabulary ids included.
            raise CheckpointError(f"prompt_learning_start_id {self.prompt_learning_start_id} is inside the "
                                  f"vocabulary (vocab_size {self.vocab_size}): real tokens would be read as virtual")

    @property
    def prompt_task_ids(self):
        """{task_name: task id} (the id a request sends in prompt_learning_task_name_ids)."""
        return {name: index for index, (name, _) in enumerate(self.prompt_tasks)}

    @property
    def hidden_size(self):
        return self.hidden_units

    @property
    def gated(self):
        return str(self.activation_type).lower() in GATED_ACTIVATIONS

    @property
    def window_layers(self):
        """Global indices of the layers with sliding-window attention (empty without a window)."""
        if not self.sliding_window:
            return frozenset()
        try:
            return frozenset(int(i) for i in self.sliding_window_layers.split(",") if i.strip())
        except ValueError:
            raise CheckpointError(f"sliding_window_layers {self.sliding_window_layers!r} is not a "
                                  "comma-separated list of layer indices") from None

    # -- config.ini text -------------------------------------------------------------------------
    def to_ini(self):
        """config.ini text: [<section>] with every key in field order, then [structure]."""
        lines = [f"[{self.section}]"]
        lines += [f"{name} = {_format(kind, getattr(self, name))}" for name, kind in _KEY_TYPES.items()
                  if name not in _PROMPT_KEYS]
        if self.prompt_learning_type:
            lines += [f"prompt_learning_type = {self.prompt_learning_type}",
                      f"prompt_learning_start_id = {self.prompt_learning_start_id}",
                      f"num_tasks = {len(self.prompt_tasks)}"]
        lines += ["", "[structure]"] + [f"{name} = {value}" for name, value in STRUCTURE.items()]
        for index, (name, length) in enumerate(self.prompt_tasks):  # FT: section task_<i>, i = the task's id
            lines += ["", f"[task_{index}]", f"task_name = {name}", f"prompt_length = {length}"]
        return "\n".join(lines) + "\n\n"

    @classmethod
    def from_ini(cls, path):
        """Parse a config.ini file (section [gpt], [gptj], [gptneox] or [llama]).

        Integers, floats and booleans (1/0/true/false) are converted by the field types; unknown
        keys are ignored. Missing optional keys get FT's defaults (per section); a missing file,
        a missing required key or a value of the wrong type raises CheckpointError.
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise CheckpointError(f"missing file: {path}")
        parser = configparser.ConfigParser()
        parser.read(path)
        return cls._from_parser(parser, path)

    @classmethod
    def from_text(cls, text, origin="config.ini"):
        """Parse config.ini text (see from_ini); `origin` names it in errors."""
        parser = configparser.ConfigParser()
        parser.read_string(text, source=origin)
        return cls._from_parser(parser, origin)

    @classmethod
    def _from_parser(cls, parser, path):
        found = [name for name in SECTIONS if parser.has_section(name)]
        if len(found) != 1:
            raise CheckpointError(f"{path}: expected exactly one of the sections {list(SECTIONS)}, found {found}")
        section = found[0]
        raw = dict(parser.items(section))
        missing = [k for k in REQUIRED_KEYS if k not in raw]
        if missing:
            raise CheckpointError(f"{path}: [{section}] lacks required keys: {', '.join(missing)}")
        values = {"section": section}
        for key, text in raw.items():
            if key not in _KEY_TYPES:
                continue
            try:
                values[key] = _parse(_KEY_TYPES[key], f"[{section}] {key}", text)
            except CheckpointError:
                raise
            except ValueError as exc:
                raise CheckpointError(f"{path}: [{section}] {key} = {text!r}: {exc}") from None
        if values["weight_data_type"] not in DTYPE_BYTES:
            raise CheckpointError(f"{path}: weight_data_type {values['weight_data_type']!r} "
                                  f"is not one of {sorted(DTYPE_BYTES)}")
        values["prompt_tasks"] = _read_tasks(parser, raw, section, path)
        return cls.from_mapping(values)

    @classmethod
    def from_mapping(cls, values):
        """From typed values by key (e.g. a dict read_config used to return): keys absent get the
        defaults of values["section"] (default "gpt"); unknown keys are ignored."""
        section = values.get("section", "gpt")
        known = {key: value for key, value in values.items() if key in _FIELD_NAMES}
        return cls(**{**SECTION_DEFAULTS[section], **known, "section": section})

    # -- read-only mapping view -----------------------------------------------------------------
    def __getitem__(self, key):
        if key not in _FIELD_NAMES:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self):
        return iter(_FIELD_NAMES)

    def __len__(self):
        return len(_FIELD_NAMES)


_FIELD_NAMES = tuple(field.name for field in dataclasses.fields(FTConfig))
# config.ini key -> its type (every field but the section and the task list), in file order.
_KEY_TYPES = {name: kind for name, kind in typing.get_type_hints(FTConfig).items()
              if name not in ("section", "prompt_tasks")}
_PROMPT_KEYS = ("prompt_learning_type", "prompt_learning_start_id")  # written only with prompt learning on


def _read_tasks(parser, raw, section, path):
    """((task_name, prompt_length), ...) from `num_tasks` and the [task_<i>] sections, as FT's ParallelGptTritonModel
    reads them."""
    try:
        count = int(raw.get("num_tasks", "0"))
        tasks = []
        for index in range(count):
            name = f"task_{index}"
            if not parser.has_section(name):
                raise CheckpointError(f"{path}: [{section}] num_tasks = {count} but section [{name}] is missing")
            tasks.append((parser.get(name, "task_name").strip(), int(parser.get(name, "prompt_length"))))
    except (configparser.Error, ValueError) as exc:
        raise CheckpointError(f"{path}: prompt learning tasks: {exc}") from None
    return tuple(tasks)


def as_config(config):
    """`config` as an FTConfig (a mapping of typed values is completed by FTConfig.from_mapping)."""
    return config if isinstance(config, FTConfig) else FTConfig.from_mapping(config)


def _format(kind, value):
    if kind is bool:
        return "1" if value else "0"
    if kind is float:
        return repr(float(value))
    return str(value)


def _parse(kind, key, text):
    if kind is bool:
        return _parse_bool(key, text)
    if kind in (int, float):
        return kind(text)
    return text.strip()


def _parse_bool(key, text):
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise CheckpointError(f"config.ini {key} = {text!r} is not a boolean (1/0/true/false)")


def read_config(shard_dir):
    """`<shard_dir>/config.ini` as an FTConfig (see FTConfig.from_ini)."""
    return FTConfig.from_ini(os.path.join(os.fspath(shard_dir), "config.ini"))


def shard_dir_name(tensor_para_size):
    """The shard directory's name for a tensor-parallel size, e.g. "2-gpu" (FT's convention)."""
    return f"{tensor_para_size}-gpu"


def stage_layers(num_layers, pipeline_para_size, stage):
    """Global layer indices of pipeline stage `stage`: FT's C++ rule, ceil(layers / pp) per stage
    (the last stages may get fewer, even none; the exporter refuses layouts with an empty stage)."""
    per_stage = -(-num_layers // pipeline_para_size)
    return range(min(per_stage * stage, num_layers), min(per_stage * (stage + 1), num_layers))


def qkv_rank_heads(heads, kv_heads, tp):
    """(q heads, kv heads) each TP rank holds. kv heads are split whole when kv_heads % tp == 0;
    with fewer kv heads than ranks (tp % kv_heads == 0) each rank holds the one kv head its q
    heads read, replicated on tp / kv_heads ranks. Raises CheckpointError otherwise."""
    if heads % tp:
        raise CheckpointError(f"head_num={heads} is not divisible by tensor_para_size={tp}")
    if heads % kv_heads:
        raise CheckpointError(f"head_num={heads} is not a multiple of kv_head_num={kv_heads}")
    if kv_heads % tp == 0:
        return heads // tp, kv_heads // tp
    if tp % kv_heads == 0:
        return heads // tp, 1
    raise CheckpointError(f"kv_head_num={kv_heads} and tensor_para_size={tp}: one must divide the "
                          "other (each rank needs whole key/value heads)")


def first_kv_head(kv_heads, tp, rank):
    """Index of the first kv head TP rank `rank` holds (see qkv_rank_heads)."""
    if kv_heads % tp == 0:
        return rank * (kv_heads // tp)
    return rank // (tp // kv_heads)


def _check_divisible(config):
    tp = config.tensor_para_size
    if tp < 1:
        raise CheckpointError(f"tensor_para_size must be >= 1, got {tp}")
    if config.inter_size % tp:
        raise CheckpointError(f"inter_size={config.inter_size} is not divisible by tensor_para_size={tp}")
    qkv_rank_heads(config.head_num, config.kv_head_num, tp)


def tensor_table(config, untied=False):
    """Ordered [(stem, per-file shape, split)] for every tensor of a shard directory.

    split: None (one file `<stem>.bin`), "column" / "row" (TP pieces `<stem>.<rank>.bin`
    concatenated on the last / first dim) or "qkv" (pieces are [q_r | k_r | v_r] blocks).
    The layout is documented in exporter/arch/layout.md. `config`: an FTConfig, or a mapping
    with at least head_num, size_per_head, inter_size, num_layer, max_pos_seq_len, vocab_size
    (other keys default as in FTConfig.from_mapping). `untied` adds model.lm_head.weight (FT:
    used iff present).
    """
    cfg = as_config(config)
    _check_divisible(cfg)
    if cfg.has_adapters:
        raise CheckpointError("has_adapters=1 checkpoints are not supported")
    section = cfg.section
    tp = cfg.tensor_para_size
    d = cfg.size_per_head
    heads, kv = cfg.head_num, cfg.kv_head_num
    h = cfg.hidden_size
    width = heads * d  # attention width: h unless the source sets its own head_dim
    inter = cfg.inter_size
    vocab, max_pos = cfg.vocab_size, cfg.max_pos_seq_len
    norm_files = ("weight",) if cfg.norm_type == "rmsnorm" else ("weight", "bias")
    gated = cfg.gated
    attn_bias, mlp_bias = cfg.attention_bias, cfg.mlp_bias
    parallel = cfg.use_gptj_residual
    bias_sum = parallel and attn_bias and mlp_bias  # FT NeoX: one summed output bias

    table = [("model.wte", (vocab, h), None)]
    if cfg.has_positional_encoding:
        table.append(("model.wpe", (max_pos, h), None))
    if cfg.has_pre_decoder_layernorm:
        table += [(f"model.pre_decoder_layernorm.{p}", (h,), None) for p in norm_files]
    if cfg.has_post_decoder_layernorm:
        table += [(f"model.final_layernorm.{p}", (h,), None) for p in norm_files]
    if untied:
        table.append(("model.lm_head.weight", (vocab, h), None))
    if cfg.prompt_learning_type == P_PROMPT_TUNING:  # FT: the same whole table in the shard directory for every rank
        table += [(f"model.prompt_table.{name}.weight", (length, h), None) for name, length in cfg.prompt_tasks]
    if cfg.lm_head_bias:
        table.append(("model.lm_head.bias", (vocab,), None))
    if kv == heads:  # FT's own layout: [h, 3, h/tp]
        qkv_w, qkv_b = (h, 3, width // tp), (3, width // tp)
    else:
        q_rank, kv_rank = qkv_rank_heads(heads, kv, tp)
        rank_width = (q_rank + 2 * kv_rank) * d
        qkv_w, qkv_b = (h, rank_width), (rank_width,)
    for i in range(cfg.num_layer):
        p = f"model.layers.{i}."
        table += [(p + f"input_layernorm.{n}", (h,), None) for n in norm_files]
        table.append((p + "attention.query_key_value.weight", qkv_w, "qkv"))
        if attn_bias:
            table.append((p + "attention.query_key_value.bias", qkv_b, "qkv"))
        if cfg.qk_norm:
            table += [(p + f"attention.{n}_layernorm.weight", (d,), None) for n in "qk"]
        table.append((p + "attention.dense.weight", (width // tp, h), "row"))
        if attn_bias and cfg.attention_output_bias and not bias_sum:
            table.append((p + "attention.dense.bias", (h,), None))
        if section != "gptj":  # GPT-J: one layernorm feeds attention and MLP
            table += [(p + f"post_attention_layernorm.{n}", (h,), None) for n in norm_files]
        for fc in ("mlp.dense_h_to_4h", "mlp.dense_h_to_4h_2") if gated else ("mlp.dense_h_to_4h",):
            table.append((p + fc + ".weight", (h, inter // tp), "column"))
            if mlp_bias:
                table.append((p + fc + ".bias", (inter // tp,), "column"))
        table.append((p + "mlp.dense_4h_to_h.weight", (inter // tp, h), "row"))
        if bias_sum:
            table.append((p + "mlp.attention.bias.sum", (h,), None))
        elif mlp_bias:
            table.append((p + "mlp.dense_4h_to_h.bias", (h,), None))
    return table


def weight_shapes(config, untied=False):
    """Ordered {file name: element shape} for every file the loader opens (one TP rank's shape
    for split tensors); see tensor_table."""
    config = as_config(config)
    tp = config.tensor_para_size
    shapes = {}
    for stem, shape, split in tensor_table(config, untied):
        if split is None:
            shapes[stem + ".bin"] = shape
        else:
            for r in range(tp):
                shapes[f"{stem}.{r}.bin"] = shape
    return shapes


def expected_files(config, untied=False):
    """Every weight file name FT's GPT loader opens for `config`, with its exact byte size.

    `config`: an FTConfig or a mapping as tensor_table takes. Pure: touches no files.
    `untied=True` adds model.lm_head.weight.bin; FT decides by the file's existence.
    """
    config = as_config(config)
    dtype = config.weight_data_type
    if dtype not in DTYPE_BYTES:
        raise CheckpointError(f"weight_data_type {dtype!r} is not one of {sorted(DTYPE_BYTES)}")
    nbytes = DTYPE_BYTES[dtype]
    return {name: int(np.prod(shape)) * nbytes
            for name, shape in weight_shapes(config, untied).items()}


def is_untied(shard_dir):
    """FT's rule: a separate output projection is used iff model.lm_head.weight.bin exists."""
    return os.path.exists(os.path.join(os.fspath(shard_dir), LM_HEAD_FILE))


def verify(shard_dir):
    """Check config.ini and every weight file; return the parsed FTConfig.

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
                 f"(weight_data_type={config.weight_data_type}, "
                 f"tensor_para_size={config.tensor_para_size}):"]
        if missing:
            lines.append(f"{len(missing)} missing file(s): " + ", ".join(missing))
        if wrong:
            lines.append(f"{len(wrong)} file(s) with the wrong size: " + ", ".join(wrong))
        raise CheckpointError("\n".join(lines))
    return config


def _read_raw(path, shape, weight_dtype):
    """One raw file -> CPU torch tensor of `shape` in the stored dtype."""
    import torch  # here, not with the module: the exporter's launcher reads config.ini without torch

    if weight_dtype == "bf16":
        # numpy has no bfloat16: read the 16-bit patterns and reinterpret them in torch.
        arr = np.fromfile(path, dtype="<i2")
        tensor = torch.from_numpy(arr).view(torch.bfloat16)
    else:
        arr = np.fromfile(path, dtype="<f4" if weight_dtype == "fp32" else "<f2")
        tensor = torch.from_numpy(arr)
    return tensor.reshape(shape)


def _merge_qkv(pieces, config):
    """Per-rank [.., q_r | k_r | v_r] pieces -> full [.., q | k | v] (GQA layout, see tensor_table);
    kv heads replicated over ranks are taken once."""
    import torch

    tp, d, kv_heads = config.tensor_para_size, config.size_per_head, config.kv_head_num
    q_rank, kv_rank = qkv_rank_heads(config.head_num, kv_heads, tp)
    blocks = [torch.split(piece, [q_rank * d, kv_rank * d, kv_rank * d], dim=-1) for piece in pieces]
    owners = [r for r in range(tp) if r == 0 or first_kv_head(kv_heads, tp, r) != first_kv_head(kv_heads, tp, r - 1)]
    q = torch.cat([b[0] for b in blocks], dim=-1)
    k = torch.cat([blocks[r][1] for r in owners], dim=-1)
    v = torch.cat([blocks[r][2] for r in owners], dim=-1)
    return torch.cat([q, k, v], dim=-1)


def load_weights(shard_dir, device="cpu", dtype=None, layers=None):
    """Load a verified shard directory into full (TP-merged) tensors on `device` in `dtype` (default float32).

    Keys are the file names without the `.bin` / `.<rank>.bin` suffix, e.g.
    "model.layers.0.attention.query_key_value.weight". Merged shapes: qkv weight [h, 3, h]
    (FT's layout, heads in order) or, with grouped-query attention, [h, (n_q + 2 n_kv) d]
    = q | k | v; qkv bias [3, h] or [(n_q + 2 n_kv) d]; row-split tensors (attention.dense,
    dense_4h_to_h weights) concatenated on dim 0, column-split ones on the last dim; FT NeoX's
    rank-scaled biases multiplied back by tensor_para_size. `layers` (an iterable of layer
    indices) loads only those layers' tensors plus the global ones.
    """
    import torch

    dtype = torch.float32 if dtype is None else dtype
    shard_dir = os.fspath(shard_dir)
    config = verify(shard_dir)
    wdt = config.weight_data_type
    tp = config.tensor_para_size
    wanted = None if layers is None else {f"model.layers.{i}." for i in layers}
    weights = {}
    for stem, shape, split in tensor_table(config, untied=is_untied(shard_dir)):
        if wanted is not None and stem.startswith("model.layers.") and \
                stem[:stem.index(".", len("model.layers.")) + 1] not in wanted:
            continue
        if split is None:
            full = _read_raw(os.path.join(shard_dir, stem + ".bin"), shape, wdt)
        else:
            parts = [_read_raw(os.path.join(shard_dir, f"{stem}.{r}.bin"), shape, wdt)
                     for r in range(tp)]
            if split == "row":
                full = torch.cat(parts, dim=0)
            elif split == "qkv" and config.kv_head_num != config.head_num:
                full = _merge_qkv(parts, config)
            else:
                full = torch.cat(parts, dim=-1)
        if config.section == "gptneox" and stem.endswith(_NEOX_RANK_SCALED):
            full = full.float() * tp
        weights[stem] = full.to(device=device, dtype=dtype).contiguous()
    return weights
