"""A PyTorch decoder that runs FasterTransformer shards of every family this project exports.

Copied into generated Triton model repositories next to ft_checkpoint.py and model.py; it
needs only torch and numpy. Everything comes from config.ini (see exporter/arch/layout.md):
pre- or post-layernorm (OPT), LayerNorm or RMSNorm, Gelu (tanh approximation, FT's kernel) /
Relu / Silu or gated GeGLU / SiGLU MLPs, learned positions or rotary embeddings (GPT-J's
interleaved pairs or NeoX/Llama halves, partial rotary, scaled rope types: ft_rotary.py),
sequential or parallel residual (GPT-J, NeoX), grouped-query attention, sliding-window
attention per layer (Mistral, Qwen2, Phi-3), per-head q/k RMSNorm (Qwen3), scaled token
embeddings (Gemma), optional biases, a final layernorm and logits =
h @ lm_head^T (+ bias) with lm_head = wte unless model.lm_head.weight exists, -inf for the
padded vocabulary (ids >= tokenizer_vocab_size). Pipeline parallel layouts run stage after
stage, on one device or one device per stage.

The decoder only: embeddings, blocks with a KV cache, logits. Decoding (sampling, batching
rules, the output layout) lives in ft_generate.py and uses the public methods below.
"""

import numpy as np
import torch
import torch.nn.functional as F

try:  # imported as templates.ft_python.ft_gpt inside the project
    from . import ft_checkpoint, ft_rotary
except ImportError:  # imported as a top-level module inside a Triton model directory
    import ft_checkpoint
    import ft_rotary

# torch >= 2.5: SDPA reads grouped-query kv heads in place (enable_gqa) instead of a repeated copy per step.
_SDPA_GQA = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device="auto"):
    """"auto" -> cuda if available else cpu; anything else goes to torch.device."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(device, requested=None, weight_data_type="fp32"):
    """Compute dtype: always fp32 on CPU; on CUDA the requested type, else the weights' type."""
    if device.type == "cpu":
        return torch.float32
    name = requested or weight_data_type
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown data_type {name!r}; expected one of fp32, fp16, bf16")
    return DTYPES[name]


ACTIVATIONS = ("gelu", "relu", "silu", "geglu", "siglu")


def _activation(name, x, gelu_approximation="tanh"):
    if name in ("gelu", "geglu"):
        # FT's Gelu kernel is the tanh approximation; config.ini gelu_approximation=none asks for exact GELU.
        return F.gelu(x, approximate=gelu_approximation)
    if name in ("silu", "siglu"):
        return F.silu(x)
    return F.relu(x)


class _CpuMatrix:
    """A weight matrix for the CPU's fp32 products (_linear): held once, dense, as [out, in] (`weight`, and `array`,
    the same memory seen by numpy).

    One row (a batch-1 decoding step) goes through numpy's BLAS matrix-vector product, more rows through oneDNN's inner
    product, instead of torch.mm (MKL's sgemm, slow for a few rows on the benchmarks' AMD EPYC; each kernel side by
    side: benchmarks/cpu_matmul.py, figures in the README's "CPU matrix products"). FT_PYTHON_ONEDNN=0 in the
    environment keeps torch.mm.
    """

    __slots__ = ("weight", "array")

    def __init__(self, weight):  # weight [in, out] (the transposed view of an [out, in] matrix is not copied)
        self.weight = weight.t().contiguous()
        self.array = self.weight.numpy()


def _cpu_kernels_work():
    import os

    if os.environ.get("FT_PYTHON_ONEDNN", "1") == "0" or not torch.backends.mkldnn.is_available():
        return False
    try:  # the ops exist and agree with torch.mm on a small case (else: torch.mm)
        weight, x = torch.randn(8, 4), torch.randn(3, 8)
        matrix = _CpuMatrix(weight)
        return bool(torch.allclose(_linear(x, matrix), x @ weight, atol=1e-5)
                    and torch.allclose(_linear(x[:1], matrix), x[:1] @ weight, atol=1e-5))
    except (AttributeError, RuntimeError):
        return False


_CPU_KERNELS = None  # decided at the first FTGPT on the CPU in fp32 (_pack)


def _pack(weight):
    """weight [in, out] as _linear takes it: a _CpuMatrix (fp32 on the CPU, where the kernels work), else as it is."""
    global _CPU_KERNELS
    if weight is None or weight.device.type != "cpu" or weight.dtype != torch.float32:
        return weight
    if _CPU_KERNELS is None:
        _CPU_KERNELS = _cpu_kernels_work()
    return _CpuMatrix(weight) if _CPU_KERNELS else weight


def trim_heap():
    """Give the C heap's free memory back to the system (glibc's malloc_trim; elsewhere nothing).

    Loading leaves the freed temporaries of every transposed or merged matrix in the heap (a process loading SmolLM2:
    resident memory 1195 MB after loading, 762 MB after a trim), and decoding leaves those of caches laid out
    again: without a trim they stay resident, counted against the server, until reused."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def _linear(x, weight, bias=None):
    # x [N, in] @ weight [in, out] (+ bias [out]); weight a dense [in, out] tensor or a _CpuMatrix
    if isinstance(weight, _CpuMatrix):
        if x.shape[0] == 1:  # matrix-vector: numpy's BLAS
            out = torch.from_numpy(weight.array @ x.contiguous().numpy()[0])[None]
            return out if bias is None else out.add_(bias)
        return torch.ops.mkldnn._linear_pointwise(x, weight.weight, bias, "none", [], "")
    return torch.mm(x, weight) if bias is None else torch.addmm(bias, x, weight)


class FTGPT:
    """Decoder over TP-merged FT weights (see ft_checkpoint.load_weights for names).

    devices: None (everything on `device`) or one device per pipeline stage (config.ini
    pipeline_para_size; a single entry puts every stage on it). Stage s owns the layers
    ft_checkpoint.stage_layers gives it (FT's rule); embeddings and the output layer live on
    the first stage's device, which is also `self.device`.
    """

    def __init__(self, weights, config, device="cpu", dtype=torch.float32, devices=None, consume=False):
        """config: an ft_checkpoint.FTConfig (a mapping of its keys is completed with its defaults).

        consume: drop each tensor from `weights` once it is placed (from_shards: the load's peak memory stays the
        weights', although the output projection is transposed and gated MLPs joined into new tensors)."""
        config = ft_checkpoint.as_config(config)
        if config.layernorm_type not in ("pre_layernorm", "post_layernorm"):
            raise ValueError(f"layernorm_type {config.layernorm_type!r} is not supported")
        if config.use_attention_linear_bias:
            raise ValueError("use_attention_linear_bias=1 (ALiBi) is not supported")
        act = str(config.activation_type).lower()
        if act not in ACTIVATIONS:
            raise ValueError(f"activation_type {config.activation_type!r} is not supported "
                             f"(one of Gelu, Relu, Silu, GeGLU, SiGLU)")
        if config.norm_type not in ("layernorm", "rmsnorm"):
            raise ValueError(f"norm_type {config.norm_type!r} is not supported (layernorm or rmsnorm)")
        if config.rotary_style not in ("gptj", "neox"):
            raise ValueError(f"rotary_style {config.rotary_style!r} is not supported (gptj or neox)")
        self.config = config
        self.dtype = dtype
        self.num_heads = config.head_num
        self.kv_heads = config.kv_head_num
        self.head_dim = config.size_per_head
        self.hidden = config.hidden_size
        self.num_layers = config.num_layer
        self.vocab_size = config.vocab_size
        # Ids >= tokenizer_vocab_size are padding rows the tokenizer cannot decode: logits() masks them.
        self.tokenizer_vocab_size = config.tokenizer_vocab_size
        self.max_positions = config.max_pos_seq_len
        self.eps = config.layernorm_eps
        self.act = act
        self.gelu_approximation = config.gelu_approximation
        if self.gelu_approximation not in ("tanh", "none"):
            raise ValueError(f"gelu_approximation {self.gelu_approximation!r} is not supported (tanh or none)")
        self.gated = config.gated
        self.rmsnorm = config.norm_type == "rmsnorm"
        self.post_layernorm = config.layernorm_type == "post_layernorm"
        self.parallel_residual = config.use_gptj_residual
        self.end_id = config.end_id
        self.rotary_dim = config.rotary_embedding
        self.rotary_style = config.rotary_style
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise ValueError(f"rotary_embedding {self.rotary_dim} must be even and <= size_per_head "
                             f"{self.head_dim}")

        pp = config.pipeline_para_size
        if devices is None:
            devices = [device]
        devices = [torch.device(d) for d in devices]
        if len(devices) not in (1, pp):
            raise ValueError(f"{len(devices)} devices for pipeline_para_size={pp}: give one or {pp}")
        self.stage_devices = devices * pp if len(devices) == 1 else devices
        self.stages = [ft_checkpoint.stage_layers(self.num_layers, pp, s) for s in range(pp)]
        self.device = self.stage_devices[0]
        h = self.hidden

        def w(name, dev=None):
            return weights[name].to(device=dev or self.device, dtype=dtype)

        def optional(name, dev=None):
            return w(name, dev) if name in weights else None

        def norm_weights(prefix, dev=None):
            return (w(prefix + ".weight", dev), optional(prefix + ".bias", dev))

        wte = w("model.wte")                                          # [V, h]
        self.wpe = w("model.wpe") if config.has_positional_encoding else None
        self.learned_positions = self.wpe is not None  # bounds prompt + output length
        self.pre_ln = norm_weights("model.pre_decoder_layernorm") if config.has_pre_decoder_layernorm else None
        last = self.stage_devices[-1]
        self.final_ln = norm_weights("model.final_layernorm", last) if config.has_post_decoder_layernorm else None
        # Output projection, the logits' matrix (_linear). Tied to wte unless FT would load a separate lm_head. A
        # _CpuMatrix holds head's [V, h] rows as they are (a tied lookup reads them as wte). Otherwise it is kept
        # transposed and contiguous [h, V] (lm_head_t): torch.mm(hidden, lm_head_t) reads it in order (hidden @
        # W.t() over [V, h] took 1.6x as long at batch 1 and 8 on a CPU); tied, that copy also serves the embedding
        # lookup (columns) and wte is None.
        tied = "model.lm_head.weight" not in weights
        head = wte if tied else w("model.lm_head.weight")
        self.lm_head = _pack(head.t())
        if isinstance(self.lm_head, _CpuMatrix):
            self.lm_head_t = None
            self.wte = self.lm_head.weight if tied else wte
        else:
            self.lm_head = self.lm_head_t = head.t().contiguous()
            self.wte = None if tied else wte
        del head, wte
        if consume:
            weights.pop("model.wte"), weights.pop("model.lm_head.weight", None)
        self.lm_head_bias = optional("model.lm_head.bias")            # [V] (GPT-J)
        # FT's p/prompt tuning (ft_checkpoint.PROMPT_LEARNING_TYPES): every task's table stacked [sum P_t, h];
        # task t's rows start at prompt_offsets[t]. Ids >= prompt_start_id are virtual tokens of the row's task.
        if config.prompt_learning_type not in (0, ft_checkpoint.P_PROMPT_TUNING):
            raise ValueError(f"prompt_learning_type {config.prompt_learning_type} "
                             f"({ft_checkpoint.PROMPT_LEARNING_TYPES[config.prompt_learning_type]}) is not supported; "
                             "only 3 (p/prompt tuning) reads tables from the shards")
        tasks = config.prompt_tasks if config.prompt_learning_type else ()
        self.prompt_task_names = tuple(name for name, _ in tasks)
        self.prompt_lengths = tuple(length for _, length in tasks)
        self.prompt_start_id = config.prompt_learning_start_id
        self.prompt_rows = (torch.cat([w(f"model.prompt_table.{name}.weight") for name in self.prompt_task_names])
                            if tasks else None)
        self.prompt_offsets = torch.tensor(np.cumsum((0,) + self.prompt_lengths[:-1]), dtype=torch.long,
                                           device=self.device)
        # cos / sin per position for the config's rope type (ft_rotary.py); None without rotary
        self.rotary_tables = ft_rotary.RotaryTables(config) if self.rotary_dim else None
        # Sliding-window attention: the window (in positions) of each layer, 0 = full causal.
        window_layers = config.window_layers
        if any(i >= self.num_layers for i in window_layers):
            raise ValueError(f"sliding_window_layers {config.sliding_window_layers!r} names layers beyond "
                             f"num_layer {self.num_layers}")
        self.layers = []
        for stage, layer_range in enumerate(self.stages):
            dev = self.stage_devices[stage]
            for i in layer_range:
                p = f"model.layers.{i}."
                qkv_w = w(p + "attention.query_key_value.weight", dev)
                qkv_b = optional(p + "attention.query_key_value.bias", dev)
                out_bias = optional(p + "mlp.dense_4h_to_h.bias", dev)
                if out_bias is None:  # FT NeoX: the attention and MLP output biases summed in one file
                    out_bias = optional(p + "mlp.attention.bias.sum", dev)
                ln2 = (norm_weights(p + "post_attention_layernorm", dev)
                       if p + "post_attention_layernorm.weight" in weights else None)
                self.layers.append({
                    "device": dev,
                    "window": config.sliding_window if i in window_layers else 0,
                    "ln1": norm_weights(p + "input_layernorm", dev), "ln2": ln2,
                    # [h, 3, h] or [h, q + 2kv] -> [h, q + 2kv]: columns are q | k | v, heads in order.
                    "qkv_w": _pack(qkv_w.reshape(h, -1)),
                    "qkv_b": None if qkv_b is None else qkv_b.reshape(-1),
                    "q_norm": optional(p + "attention.q_layernorm.weight", dev),  # [d] (Qwen3)
                    "k_norm": optional(p + "attention.k_layernorm.weight", dev),
                    "o_w": _pack(w(p + "attention.dense.weight", dev)),
                    "o_b": optional(p + "attention.dense.bias", dev),
                    "fc2_w": _pack(w(p + "mlp.dense_4h_to_h.weight", dev)),
                    "fc2_b": out_bias,
                    **self._inner_projection(weights, p, w, optional, dev),
                })
                if consume:
                    for name in [name for name in weights if name.startswith(p)]:
                        del weights[name]

    def _inner_projection(self, weights, p, w, optional, dev):
        """fc1_w [h, I] (+ fc1_b); gated: gate | up side by side in one [h, 2I] matrix (one product per token
        instead of two; the activation takes the first half), the biases likewise when both exist."""
        fc1_w, fc1_b = w(p + "mlp.dense_h_to_4h.weight", dev), optional(p + "mlp.dense_h_to_4h.bias", dev)
        if not self.gated:
            return {"fc1_w": _pack(fc1_w), "fc1_b": fc1_b}
        if p + "mlp.dense_h_to_4h_2.weight" not in weights:
            raise ValueError(f"activation_type {self.config.activation_type} needs "
                             "mlp.dense_h_to_4h_2.weight in every layer")
        up_w, up_b = w(p + "mlp.dense_h_to_4h_2.weight", dev), optional(p + "mlp.dense_h_to_4h_2.bias", dev)
        if (fc1_b is None) != (up_b is None):  # one bias only: the missing one is zero
            fc1_b = torch.zeros_like(up_b) if fc1_b is None else fc1_b
            up_b = torch.zeros_like(fc1_b) if up_b is None else up_b
        return {"fc1_w": _pack(torch.cat([fc1_w, up_w], dim=1)),
                "fc1_b": None if fc1_b is None else torch.cat([fc1_b, up_b])}

    @classmethod
    def from_shards(cls, shard_dir, device="cpu", dtype=None, devices=None):
        """Verify and load a `<tp>-gpu/` directory; dtype None -> resolve_dtype's choice.

        devices: optional list, one device per pipeline stage (see the class docstring).
        """
        device = resolve_device(device)
        config = ft_checkpoint.verify(shard_dir)
        compute = resolve_dtype(device, dtype, config.weight_data_type)
        # Load (and merge) on CPU, then move tensor by tensor in __init__.
        weights = ft_checkpoint.load_weights(shard_dir, device="cpu", dtype=compute)
        if devices is not None:
            devices = [resolve_device(d) for d in devices]
            device = devices[0]
        model = cls(weights, config, device=device, dtype=compute, devices=devices, consume=True)
        del weights
        trim_heap()
        return model

    # ------------------------------------------------------------------ forward pieces
    def _rms(self, x, weight):
        # y = x / sqrt(mean(x^2) + eps) * weight over the last dim, computed in fp32. One F.rms_norm call instead of
        # six element-wise ops: 61 norms per decoded token, ~13 us less each on this CPU, the same fp32 result.
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), weight, self.eps)
        return F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype) * weight

    def _norm(self, x, weights):
        weight, bias = weights
        if self.rmsnorm:
            return self._rms(x, weight)
        return F.layer_norm(x, (self.hidden,), weight, bias, self.eps)

    def _embed(self, ids, pos, prompt_tasks=None):
        # ids, pos [B, S] -> [B, S, h]; prompt_tasks [B] task id per row (-1: none) or None
        virtual, given = None, ids
        if prompt_tasks is not None and self.prompt_rows is not None:
            virtual = (ids >= self.prompt_start_id) & (prompt_tasks[:, None] >= 0)   # [B, S]
            ids = torch.where(virtual, 0, ids)  # any real row: overwritten below
        if self.wte is None:  # tied: columns of the one [h, V] copy
            x = self.lm_head_t.index_select(1, ids.reshape(-1)).t().reshape(*ids.shape, self.hidden)
        else:
            x = F.embedding(ids, self.wte)
        if self.config.embedding_multiplier != 1.0:  # Gemma: sqrt(h), rounded to the compute dtype
            x = x * torch.tensor(self.config.embedding_multiplier, dtype=x.dtype)
        if virtual is not None and bool(virtual.any()):
            # FT's lookup: row (id - prompt_learning_start_id) of the row's task table, used as it is (no
            # embedding multiplier), then the position embedding of the token's place, as for any token.
            rows, cols = virtual.nonzero(as_tuple=True)
            index = self.prompt_offsets[prompt_tasks[rows]] + given[rows, cols] - self.prompt_start_id
            x = x.index_put((rows, cols), self.prompt_rows[index])
        if self.wpe is not None:
            x = x + F.embedding(pos, self.wpe)
        if self.pre_ln is not None:
            x = self._norm(x, self.pre_ln)
        return x

    @staticmethod
    def _window_mask(mask, start, window):
        """mask [B, 1, S|1, K] restricted to keys less than `window` slots behind each query.

        Query q sits in cache slot start+q (start: an int, or a LongTensor [B] of each row's slot when S = 1); a
        row's slots hold consecutive positions (left-aligned padding), so slot distance = position distance:
        transformers' `kv_idx > q_idx - window`.
        """
        keys = torch.arange(mask.shape[-1], device=mask.device)                  # [K]
        if torch.is_tensor(start):  # one query per row, in its own slot
            return mask & (keys[None, :] > start.to(mask.device)[:, None] - window)[:, None, None, :]
        queries = keys[start:]                                                  # [S]
        return mask & (keys[None, :] > queries[:, None] - window)

    def _rotary_heads(self, cos, sin):
        """rotary_tables' cos, sin [B, 1, S, r/2] -> full-width [B, S, 1, r] tables for _rotate (once per forward):
        halves (NeoX/Llama) repeat the table, pairs (GPT-J) repeat each entry."""
        if self.rotary_style == "gptj":
            cos, sin = cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)
        else:
            cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
        return cos.transpose(1, 2), sin.transpose(1, 2)

    def _rotate(self, x, cos, sin):
        """x [B, S, heads, d] (q and k heads together): the first rotary_dim dims of each head rotated, in fp32.

        x * cos + partner(x) * sin with partner = (-second half, first half) (NeoX) or (-odd, even) per pair
        (GPT-J): element for element the same products and sums as rotating the halves / pairs one by one
        (a + (-b) is a - b exactly), in five ops for all heads."""
        r = self.rotary_dim
        rot = x if r == x.shape[-1] else x[..., :r]
        rot = rot.float()
        if self.rotary_style == "gptj":  # pairs (0, 1), (2, 3), ...
            partner = torch.stack((-rot[..., 1::2], rot[..., 0::2]), dim=-1).flatten(-2)
        else:  # halves [0, r/2) and [r/2, r)
            partner = torch.cat((-rot[..., r // 2:], rot[..., :r // 2]), dim=-1)
        rot = (rot * cos + partner * sin).to(x.dtype)
        return rot if r == x.shape[-1] else torch.cat((rot, x[..., r:]), dim=-1)

    def _attention(self, y, lw, parts, rotary, valid=None):
        """Self-attention of y [B, S, h] -> [B, S, h] (without the output bias), filling the caches.

        valid [B, S] bool (a prefill without its padding, _blocks): y is then [1, T, h], the T real tokens only, and
        so is the result; the projections run over those T tokens, which are laid out [B, S] (pads zero) for the
        attention only.

        parts: per group of consecutive rows, (layer_cache, start, mask): the group's rows are the first
        layer_cache[0].shape[0] rows not taken by the groups before it; the projections run once over all rows,
        attention per group against its own cache (mask None: every key up to start + S). start: the cache slot of
        the group's first column, an int, or a LongTensor [rows] with each row's own slot when S = 1 (a pool of
        rows at different lengths, FTGPT.hidden_states): the keys are then the mask's K first slots.
        rotary: _rotary_heads' tables or None.
        """
        bsz, seq, h = y.shape
        d, nq, nkv = self.head_dim, self.num_heads, self.kv_heads
        qkv = _linear(y.reshape(-1, h), lw["qkv_w"], lw["qkv_b"])          # [B*S, (nq + 2 nkv) d]
        qk = qkv[:, :(nq + nkv) * d].view(bsz, seq, nq + nkv, d)           # q and k heads, rotated together
        if lw["q_norm"] is not None:  # per-head RMSNorm over d
            qk = torch.cat((self._rms(qk[:, :, :nq], lw["q_norm"]), self._rms(qk[:, :, nq:], lw["k_norm"])), dim=2)
        if rotary is not None:
            qk = self._rotate(qk, *rotary)
        v = qkv[:, (nq + nkv) * d:].view(bsz, seq, nkv, d)
        if valid is not None:  # [1, T] real tokens -> [B, S] with zeros at the pads (queries and keys nobody uses)
            heads = torch.cat((qk, v), dim=2)[0]                            # [T, nq + 2 nkv, d]
            laid = heads.new_zeros(*valid.shape, *heads.shape[1:])
            laid[valid] = heads
            (bsz, seq), qk, v = valid.shape, laid[:, :, :nq + nkv], laid[:, :, nq + nkv:]
        q = qk[:, :, :nq].transpose(1, 2)                                   # [B, nq, S, d]
        k = qk[:, :, nq:].transpose(1, 2)                                   # [B, nkv, S, d]
        v = v.transpose(1, 2)                                               # [B, nkv, S, d]
        outputs, row = [], 0
        for (k_cache, v_cache), start, mask in parts:
            rows = slice(row, row + k_cache.shape[0])
            row = rows.stop
            if torch.is_tensor(start):  # row r's one token goes to its own slot start[r]
                end = mask.shape[-1]
                index = (torch.arange(k_cache.shape[0], device=k_cache.device), slice(None),
                         start.to(k_cache.device))
                k_cache[index] = k[rows, :, 0]
                v_cache[index] = v[rows, :, 0]
            else:
                end = start + seq
                k_cache[:, :, start:end] = k[rows]
                v_cache[:, :, start:end] = v[rows]
            keys, values = k_cache[:, :, :end], v_cache[:, :, :end]
            grouped = {}
            if nkv != nq:  # grouped-query attention: q head j reads kv head j // (nq / nkv)
                if _SDPA_GQA:
                    grouped = {"enable_gqa": True}
                else:
                    keys = keys.repeat_interleave(nq // nkv, dim=1)
                    values = values.repeat_interleave(nq // nkv, dim=1)
            outputs.append(F.scaled_dot_product_attention(q[rows], keys, values, attn_mask=mask, **grouped))
        if row != bsz:
            raise ValueError(f"the caches hold {row} rows for {bsz} rows of hidden states")
        attn = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        attn = attn.transpose(1, 2)                                         # [B, S, nq, d]
        if valid is not None:
            attn = attn[valid]                                              # [T, nq, d]
        attn = attn.reshape(-1, nq * d)                                     # [B*S | T, h]
        return _linear(attn, lw["o_w"]).view(*y.shape)

    def _mlp(self, y, lw):
        bsz, seq, h = y.shape
        inner = _linear(y.reshape(-1, h), lw["fc1_w"], lw["fc1_b"])
        if self.gated:  # act(x W_gate) * (x W_up), both from one product
            gate, up = inner.chunk(2, dim=-1)
            inner = _activation(self.act, gate, self.gelu_approximation) * up
        else:
            inner = _activation(self.act, inner, self.gelu_approximation)
        return _linear(inner, lw["fc2_w"]).view(bsz, seq, h)

    def _blocks(self, x, pos, groups, valid=None):
        """Run all layers on x [B, S, h] (positions pos [B, S]).

        valid [B, S] bool or None: the real tokens of a prefill whose rows are padded; every projection, norm and
        residual then runs over those tokens only (FT's "remove padding"), attention over the [B, S] layout. The
        pads' hidden states come back as zeros and their cache slots hold zeros (keys no mask lets anyone read).

        groups: (cache, start, mask) per group of consecutive rows (hidden_states_grouped); a group's tokens go to
        its cache slots start..start+S-1. cache: per layer (k, v) each [rows, kv_heads, Smax, d] on the layer's
        device; mask [rows, 1, S|1, start+S] bool, True = may attend. Returns final hidden states [B, S, h] on
        self.device.
        """
        device, rotary, masks = None, None, None
        # A group whose mask lets every query see every key (a decoding step without padding) attends unmasked:
        # the same result (the mask only adds 0 there), one pass less over the scores in each layer.
        # (Rows at their own slots, a tensor start, keep the mask: its width is where their keys end.)
        unmasked = [not torch.is_tensor(start) and bool(mask.all()) for _, start, mask in groups]
        shape = x.shape
        if valid is not None and bool(valid.all()):
            valid = None  # nothing to remove
        index = None
        for i, lw in enumerate(self.layers):
            if lw["device"] != device:  # first layer of a pipeline stage on a new device
                device = lw["device"]
                x = x.to(device)
                # per group: {window (0 = full causal): mask}, built once per call and device
                masks = [{0: mask.to(device)} for _, _, mask in groups]
                # cos, sin [B, S, 1, r] (fp32) for positions pos [B, S]
                rotary = self._rotary_heads(*self.rotary_tables(pos, device)) if self.rotary_dim else None
                if valid is not None:  # the real tokens only: x [1, T, h], tables [1, T, 1, r]
                    first, index = index is None, valid.to(device)
                    if first:
                        x = x[index][None]
                    if rotary is not None:
                        rotary = tuple(table[index][None] for table in rotary)
            window = lw["window"]
            for (_, start, _), group_masks in zip(groups, masks):
                if window not in group_masks:
                    group_masks[window] = self._window_mask(group_masks[0], start, window)
            parts = [(cache[i], start, None if window == 0 and every else group_masks[window])
                     for (cache, start, _), group_masks, every in zip(groups, masks, unmasked)]
            if self.post_layernorm:  # OPT with do_layer_norm_before=False
                x = self._norm(x + self._bias(self._attention(x, lw, parts, rotary, index), lw["o_b"]), lw["ln1"])
                x = self._norm(x + self._bias(self._mlp(x, lw), lw["fc2_b"]), lw["ln2"])
            elif self.parallel_residual:  # GPT-J (one layernorm) / NeoX (two)
                y = self._norm(x, lw["ln1"])
                attn = self._attention(y, lw, parts, rotary, index)
                mlp = self._mlp(self._norm(x, lw["ln2"]) if lw["ln2"] is not None else y, lw)
                x = self._bias(self._bias(x + attn + mlp, lw["o_b"]), lw["fc2_b"])
            else:
                y = self._norm(x, lw["ln1"])
                x = x + self._bias(self._attention(y, lw, parts, rotary, index), lw["o_b"])
                x = x + self._bias(self._mlp(self._norm(x, lw["ln2"]), lw), lw["fc2_b"])
        if self.final_ln is not None:
            x = self._norm(x, self.final_ln)
        if index is not None:  # back to [B, S, h], zeros at the pads
            laid = x.new_zeros(shape)
            laid[index] = x[0]
            x = laid
        return x.to(self.device)

    @staticmethod
    def _bias(x, bias):
        return x if bias is None else x + bias

    def logits(self, hidden):
        # [..., h] -> [..., V] in fp32 (sampling and log-probs are done in fp32)
        logits = _linear(hidden.reshape(-1, self.hidden), self.lm_head).view(*hidden.shape[:-1], -1)
        if self.lm_head_bias is not None:
            logits = logits + self.lm_head_bias
        logits = logits.float()
        if self.tokenizer_vocab_size < self.vocab_size:
            # Padded vocabulary: -inf for the padding rows, so greedy, sampling and beam search never pick an id
            # the tokenizer cannot decode (NeMo masks its padding the same way), and log-probs are over real ids.
            logits[..., self.tokenizer_vocab_size:] = float("-inf")
        return logits

    def new_cache(self, batch, slots):
        """Empty KV cache for `batch` rows and `slots` positions: per layer (k, v), each
        [batch, kv_heads, slots, d] on the layer's device."""
        shape = (batch, self.kv_heads, slots, self.head_dim)
        return [(torch.empty(shape, device=lw["device"], dtype=self.dtype),
                 torch.empty(shape, device=lw["device"], dtype=self.dtype)) for lw in self.layers]

    @staticmethod
    def reorder_cache(cache, rows):
        """The cache with batch rows taken in the order of `rows` (a LongTensor), e.g. beams."""
        return [tuple(part.index_select(0, rows.to(part.device)) for part in layer) for layer in cache]

    def grow_cache(self, cache, slots):
        """The cache with room for `slots` positions (>= its own), the filled positions copied."""
        grown = self.new_cache(cache[0][0].shape[0], slots)
        for old, new in zip(cache, grown):
            for old_part, new_part in zip(old, new):
                new_part[:, :, :old_part.shape[2]] = old_part
        return grown

    def move_cache(self, cache, drop, length, slots):
        """A cache of `slots` positions whose 0 .. length-1 are `cache`'s drop .. drop+length-1 (a joint prefill's
        left padding removed)."""
        moved = self.new_cache(cache[0][0].shape[0], slots)
        for old, new in zip(cache, moved):
            for old_part, new_part in zip(old, new):
                new_part[:, :, :length] = old_part[:, :, drop:drop + length]
        return moved

    @staticmethod
    def cache_bytes(cache):
        """Bytes held by a cache: 2 x layers x rows x kv_heads x slots x head_dim x element size."""
        return sum(part.numel() * part.element_size() for layer in cache for part in layer)

    # hidden_states takes a LongTensor start (each row's own cache slot): ft_generate.Engine keeps every running
    # request's cache in one pool of rows and attends for all of them in one call per layer.
    ROW_SLOTS = True

    # hidden_states and hidden_states_grouped take valid [B, S]: a padded prefill's real tokens (_blocks).
    SKIPS_PADDING = True
    # ft_generate.Engine calls it when its last request leaves.
    trim_heap = staticmethod(trim_heap)

    def hidden_states(self, ids, pos, cache, start, mask, prompt_tasks=None, valid=None):
        """Final hidden states [B, S, h] for ids/pos [B, S] written to cache slots start..

        mask [B, 1, S|1, start+S] bool, True = may attend. prompt_tasks [B]: each row's p/prompt-tuning task
        (-1: none); its ids >= prompt_start_id are that task's virtual tokens.
        start may also be a LongTensor [B] when S = 1: row r's token goes to its slot start[r] and attends to the
        slots the mask [B, 1, 1, K] allows among the first K (rows of a pool at different lengths).
        valid [B, S] bool: the real tokens (the others are padding: computed as nothing, zeros in the result and
        the cache; no real query may attend to them).
        """
        return self._blocks(self._embed(ids, pos, prompt_tasks), pos, [(cache, start, mask)], valid)

    def hidden_states_grouped(self, ids, pos, groups, prompt_tasks=None, valid=None):
        """hidden_states for groups of rows that each have their own cache: ids/pos [B, S] stacked group after
        group, groups = [(cache, start, mask), ...] as hidden_states takes them (a group's rows = its cache's
        batch size). Every projection runs once over all B rows (the weights are read once), attention per group.
        """
        return self._blocks(self._embed(ids, pos, prompt_tasks), pos, groups, valid)

    @torch.inference_mode()
    def forward_logits(self, input_ids):
        """Full-sequence logits [B, S, V] (fp32, CPU) for input_ids [B, S], no padding logic.

        With right padding the logits at a row's real positions are exact (causal attention
        never looks at later pad tokens).
        """
        ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long).to(self.device)
        bsz, seq = ids.shape
        pos = torch.arange(seq, device=self.device).expand(bsz, seq)
        mask = torch.ones(seq, seq, dtype=torch.bool, device=self.device).tril()
        hidden = self.hidden_states(ids, pos, self.new_cache(bsz, seq), 0, mask)
        return self.logits(hidden).cpu()
