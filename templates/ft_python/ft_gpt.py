"""A PyTorch GPT-2 style decoder that runs FasterTransformer GPT shards.

Copied into generated Triton model repositories next to ft_checkpoint.py and model.py; it
needs only torch and numpy. The maths follows FT's GPT with the config.ini this project
writes: pre-layernorm blocks, GELU (tanh approximation), learned positions, a final
layernorm and logits = h @ wte^T (or model.lm_head.weight when that file exists).

The decoder only: embeddings, blocks with a KV cache, logits. Decoding (sampling, batching
rules, the output layout) lives in ft_generate.py and uses the public methods below.
"""

import numpy as np
import torch
import torch.nn.functional as F

try:  # imported as templates.ft_python.ft_gpt inside the project
    from . import ft_checkpoint, ft_generate
except ImportError:  # imported as a top-level module inside a Triton model directory
    import ft_checkpoint
    import ft_generate

GenerationOutput = ft_generate.GenerationOutput

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


class FTGPT:
    """GPT decoder over TP-merged FT weights (see ft_checkpoint.load_weights for names)."""

    def __init__(self, weights, config, device="cpu", dtype=torch.float32):
        if config.get("layernorm_type", "pre_layernorm") != "pre_layernorm":
            raise ValueError(f"layernorm_type {config['layernorm_type']!r} is not supported "
                             "(only pre_layernorm)")
        if config.get("use_attention_linear_bias", False):
            raise ValueError("use_attention_linear_bias=1 (ALiBi) is not supported")
        act = str(config.get("activation_type", "Gelu")).lower()
        if act not in ("gelu", "relu"):
            raise ValueError(f"activation_type {config['activation_type']!r} is not supported")
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        self.num_heads = config["head_num"]
        self.head_dim = config["size_per_head"]
        self.hidden = self.num_heads * self.head_dim
        self.num_layers = config["num_layer"]
        self.vocab_size = config["vocab_size"]
        self.max_positions = config["max_pos_seq_len"]
        self.eps = float(config.get("layernorm_eps", 1e-5))
        self.act = act
        self.end_id = config["end_id"]
        h = self.hidden

        def w(name):
            return weights[name].to(device=self.device, dtype=dtype)

        self.wte = w("model.wte")                                     # [V, h]
        self.wpe = w("model.wpe") if config.get("has_positional_encoding", True) else None
        self.learned_positions = self.wpe is not None  # bounds prompt + output length
        self.pre_ln = ((w("model.pre_decoder_layernorm.weight"),
                        w("model.pre_decoder_layernorm.bias"))
                       if config.get("has_pre_decoder_layernorm", False) else None)
        self.final_ln = ((w("model.final_layernorm.weight"), w("model.final_layernorm.bias"))
                         if config.get("has_post_decoder_layernorm", True) else None)
        # Output projection [V, h]: tied to wte unless FT would load a separate lm_head.
        self.lm_head = w("model.lm_head.weight") if "model.lm_head.weight" in weights else self.wte
        self.layers = []
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            self.layers.append({
                "ln1_w": w(p + "input_layernorm.weight"), "ln1_b": w(p + "input_layernorm.bias"),
                # [h, 3, h] -> [h, 3h]: columns are q | k | v, heads in order inside each.
                "qkv_w": w(p + "attention.query_key_value.weight").reshape(h, 3 * h),
                "qkv_b": w(p + "attention.query_key_value.bias").reshape(3 * h),
                "o_w": w(p + "attention.dense.weight"), "o_b": w(p + "attention.dense.bias"),
                "ln2_w": w(p + "post_attention_layernorm.weight"),
                "ln2_b": w(p + "post_attention_layernorm.bias"),
                "fc1_w": w(p + "mlp.dense_h_to_4h.weight"),
                "fc1_b": w(p + "mlp.dense_h_to_4h.bias"),
                "fc2_w": w(p + "mlp.dense_4h_to_h.weight"),
                "fc2_b": w(p + "mlp.dense_4h_to_h.bias"),
            })

    @classmethod
    def from_shards(cls, shard_dir, device="cpu", dtype=None):
        """Verify and load a `<tp>-gpu/` directory; dtype None -> resolve_dtype's choice."""
        device = resolve_device(device)
        config = ft_checkpoint.verify(shard_dir)
        compute = resolve_dtype(device, dtype, config["weight_data_type"])
        # Load (and merge) on CPU, then move tensor by tensor in __init__.
        weights = ft_checkpoint.load_weights(shard_dir, device="cpu", dtype=compute)
        return cls(weights, config, device=device, dtype=compute)

    # ------------------------------------------------------------------ forward pieces
    def _embed(self, ids, pos):
        # ids, pos [B, S] -> [B, S, h]
        x = F.embedding(ids, self.wte)
        if self.wpe is not None:
            x = x + F.embedding(pos, self.wpe)
        if self.pre_ln is not None:
            x = F.layer_norm(x, (self.hidden,), self.pre_ln[0], self.pre_ln[1], self.eps)
        return x

    def _blocks(self, x, cache, start, mask):
        """Run all layers on x [B, S, h] whose tokens go to cache slots start..start+S-1.

        cache: (k, v) each [layers, B, heads, Smax, d]; mask [B, 1, S|1, start+S] bool,
        True = may attend. Returns the final hidden states [B, S, h].
        """
        bsz, seq, h = x.shape
        end = start + seq
        k_cache, v_cache = cache
        for i, lw in enumerate(self.layers):
            y = F.layer_norm(x, (h,), lw["ln1_w"], lw["ln1_b"], self.eps)
            qkv = torch.addmm(lw["qkv_b"], y.reshape(-1, h), lw["qkv_w"])
            # [B*S, 3h] -> [3, B, heads, S, d]
            qkv = qkv.view(bsz, seq, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            k_cache[i, :, :, start:end] = qkv[1]
            v_cache[i, :, :, start:end] = qkv[2]
            attn = F.scaled_dot_product_attention(
                qkv[0], k_cache[i, :, :, :end], v_cache[i, :, :, :end], attn_mask=mask)
            attn = attn.transpose(1, 2).reshape(-1, h)                      # [B*S, h]
            x = x + torch.addmm(lw["o_b"], attn, lw["o_w"]).view(bsz, seq, h)
            y = F.layer_norm(x, (h,), lw["ln2_w"], lw["ln2_b"], self.eps)
            y = torch.addmm(lw["fc1_b"], y.reshape(-1, h), lw["fc1_w"])
            y = F.gelu(y, approximate="tanh") if self.act == "gelu" else F.relu(y)
            x = x + torch.addmm(lw["fc2_b"], y, lw["fc2_w"]).view(bsz, seq, h)
        if self.final_ln is not None:
            x = F.layer_norm(x, (h,), self.final_ln[0], self.final_ln[1], self.eps)
        return x

    def logits(self, hidden):
        # [..., h] -> [..., V] in fp32 (sampling and log-probs are done in fp32)
        return (hidden @ self.lm_head.t()).float()

    def new_cache(self, batch, slots):
        """Empty KV cache for `batch` rows and `slots` positions."""
        shape = (self.num_layers, batch, self.num_heads, slots, self.head_dim)
        return (torch.empty(shape, device=self.device, dtype=self.dtype),
                torch.empty(shape, device=self.device, dtype=self.dtype))

    @staticmethod
    def reorder_cache(cache, rows):
        """The cache with batch rows taken in the order of `rows` (a LongTensor), e.g. beams."""
        return tuple(part.index_select(1, rows) for part in cache)

    def hidden_states(self, ids, pos, cache, start, mask):
        """Final hidden states [B, S, h] for ids/pos [B, S] written to cache slots start..

        mask [B, 1, S|1, start+S] bool, True = may attend.
        """
        return self._blocks(self._embed(ids, pos), cache, start, mask)

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
        hidden = self._blocks(self._embed(ids, pos), self.new_cache(bsz, seq), 0, mask)
        return self.logits(hidden).cpu()

    # ------------------------------------------------------------------ decoding
    def generate(self, *args, **kwargs):
        """See ft_generate.generate."""
        return ft_generate.generate(self, *args, **kwargs)

    def check_inputs(self, *args, **kwargs):
        """See ft_generate.check_inputs."""
        return ft_generate.check_inputs(self, *args, **kwargs)
