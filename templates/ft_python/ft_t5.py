"""A PyTorch encoder-decoder that runs FasterTransformer T5 shards (T5, T5 v1.1, Flan-T5, UL2).

Copied into generated Triton model repositories next to ft_t5_checkpoint.py (the shard layout FT's
huggingface_t5_ckpt_convert.py writes, its config.ini schema and the TP merge), ft_checkpoint.py and
ft_generate.py; needs only torch and numpy.

The math (HF T5): RMS layer norm without mean subtraction or bias, no 1/sqrt(d_kv) attention scaling (T5 folds
it into its weights), relative position bias from layer 0's table shared by every layer (bidirectional buckets
in the encoder, causal ones in the decoder's self-attention, none in cross-attention), ReLU (T5) or gated-GELU
(v1.1, Flan-T5, UL2: gelu_new(x wi_0) * x wi_1) MLPs, logits = (h * d_model**-0.5 if config.ini
tie_word_embeddings, i.e. scale_decoder_output, else h) @ lm_head^T. Buckets and max distance come from
config.ini (FT's own kernel always uses max distance 128, HF's default).

Use: model = FTT5.from_shards(dir); decoder = model.bind(encoder_ids, encoder_lengths) runs the encoder once and
is a decoder over that batch with ft_generate's interface (its cache holds the self-attention keys/values, the
per-row cross-attention keys/values and the encoder padding, reordered together for beams); generate_t5() runs
ft_generate.generate on it with [start_id] as each row's decoder prompt and returns FT's T5 output layout.
"""

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F

try:  # imported as templates.ft_python.ft_t5 inside the project
    from . import ft_checkpoint, ft_generate, ft_t5_checkpoint
except ImportError:  # imported as a top-level module inside a Triton model directory
    import ft_checkpoint
    import ft_generate
    import ft_t5_checkpoint


def relative_position_bucket(relative, bidirectional, num_buckets, max_distance):
    """T5's bucket of each relative position (key position - query position), as HF / Mesh TensorFlow:
    half the buckets exact small distances, half logarithmic up to max_distance; bidirectional halves the buckets
    between keys before and after the query, causal maps keys after the query to bucket 0."""
    buckets = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative > 0).long() * num_buckets
        distance = relative.abs()
    else:
        distance = (-relative).clamp(min=0)
    exact = num_buckets // 2
    # float32 as HF, so the truncation to a bucket agrees; distances below `exact` never take this branch
    scaled = (torch.log(distance.clamp(min=exact).float() / exact) / math.log(max_distance / exact)
              * (num_buckets - exact)).long()
    large = torch.clamp(exact + scaled, max=num_buckets - 1)
    return buckets + torch.where(distance < exact, distance, large)


class FTT5:
    """T5 encoder-decoder over TP-merged FT weights; compute in `dtype` (fp32 on CPU)."""

    def __init__(self, weights, config, device="cpu", dtype=torch.float32):
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        self.heads, self.head_dim, self.hidden = config.num_heads, config.d_kv, config.d_model

        def w(name):
            return weights[name].to(device=self.device, dtype=dtype)

        self.embedding = w("shared.weight_T")                                     # [V, d]
        self.lm_head = w("lm_head.weight")                                        # [V, d] (tied: shared's copy)
        self.encoder_bias = w("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")  # [H, buckets]
        self.decoder_bias = w("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
        self.encoder_final = w("encoder.final_layer_norm.weight")
        self.decoder_final = w("decoder.final_layer_norm.weight")

        def mlp(prefix):
            return {"ln": w(f"{prefix}.layer_norm.weight"), "wi": w(f"{prefix}.DenseReluDense.wi.weight"),
                    "wi2": w(f"{prefix}.DenseReluDense.wi2.weight") if config.gated else None,
                    "wo": w(f"{prefix}.DenseReluDense.wo.weight")}

        self.encoder_layers = []
        for i in range(config.encoder_num_layers):
            p = f"encoder.block.{i}.layer."
            qkv = torch.stack([w(f"{p}0.SelfAttention.{n}.weight") for n in "qkv"], dim=1)   # [d, 3, inner]
            self.encoder_layers.append({"ln": w(f"{p}0.layer_norm.weight"), "qkv": qkv.reshape(self.hidden, -1),
                                        "o": w(f"{p}0.SelfAttention.o.weight"), "mlp": mlp(f"{p}1")})
        self.decoder_layers = []
        for i in range(config.decoder_num_layers):
            p = f"decoder.block.{i}.layer."
            self.decoder_layers.append({
                "ln": w(f"{p}0.layer_norm.weight"),
                "qkv": w(f"{p}0.SelfAttention.qkv.weight").reshape(self.hidden, -1),     # [d, 3 inner]: q | k | v
                "o": w(f"{p}0.SelfAttention.o.weight"),
                "cross_ln": w(f"{p}1.layer_norm.weight"), "cross_q": w(f"{p}1.EncDecAttention.q.weight"),
                "cross_kv": torch.cat([w(f"{p}1.EncDecAttention.k.weight"),
                                       w(f"{p}1.EncDecAttention.v.weight")], dim=1),      # [d, 2 inner]
                "cross_o": w(f"{p}1.EncDecAttention.o.weight"), "mlp": mlp(f"{p}2")})

    @classmethod
    def from_shards(cls, shard_dir, device="cpu", dtype=None):
        """Verify and load a `<tp>-gpu/` T5 directory (TP pieces merged); dtype None: fp32 on CPU, the weights'
        type on CUDA."""
        if str(device) == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        config = ft_t5_checkpoint.verify(shard_dir)
        if dtype is None:
            dtype = torch.float32 if device.type == "cpu" else ft_checkpoint.TORCH_DTYPES[config.weight_data_type]
        weights = ft_t5_checkpoint.load_weights(shard_dir, device="cpu", dtype=torch.float32)
        return cls(weights, config, device=device, dtype=dtype)

    # ------------------------------------------------------------------ pieces
    def _norm(self, x, weight):
        # T5 layer norm: x / sqrt(mean(x^2) + eps) * weight, no mean subtraction, no bias; fp32 inside
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.config.layer_norm_epsilon)
        return weight * xf.to(x.dtype)

    def _mlp(self, x, lw):
        h = x @ lw["wi"]
        # relu: original T5; gated-gelu: gelu_new (tanh approximation), as HF and FT's GeGLU kernel
        h = F.gelu(h, approximate="tanh") if self.config.gated else F.relu(h)
        if lw["wi2"] is not None:  # gated: act(x wi_0) * (x wi_1)
            h = h * (x @ lw["wi2"])
        return h @ lw["wo"]

    @staticmethod
    def _clamp(x):
        # as HF's T5 in fp16: keep the residual stream finite (T5 v1.1 activations overflow fp16)
        if x.dtype != torch.float16:
            return x
        limit = torch.finfo(x.dtype).max
        limit = torch.where(torch.isinf(x).any(), limit - 1000, limit)
        return torch.clamp(x, min=-limit, max=limit)

    def _heads(self, x):
        # [B, S, H*dk] -> [B, H, S, dk]
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def _attend(self, q, k, v, bias):
        # q [B, H, S, dk], k/v [B, H, T, dk], bias [B|1, H, S, T] (position bias + mask) -> [B, S, H*dk];
        # T5 folds 1/sqrt(dk) into its weights: no scaling
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) + bias
        out = torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)
        return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)

    def _position_bias(self, table, relative, bidirectional):
        # relative [..., S, T] -> [..., H, S, T] fp32
        buckets = relative_position_bucket(relative, bidirectional, self.config.relative_attention_num_buckets,
                                           self.config.relative_attention_max_distance)
        return F.embedding(buckets, table.float().t()).movedim(-1, -3)  # table [H, buckets]

    # ------------------------------------------------------------------ encoder
    @torch.inference_mode()
    def encode(self, input_ids, input_lengths):
        """Encoder output [B, L, d] for right-padded input_ids [B, L] and input_lengths [B] (positions past a
        row's length are padding: never attended; their outputs are meaningless)."""
        ids, lengths = encoder_inputs(input_ids, input_lengths, self.vocab_size)
        ids, lengths = ids.to(self.device), lengths.to(self.device)
        bsz, seq = ids.shape
        valid = torch.arange(seq, device=self.device)[None, :] < lengths[:, None]          # [B, L]
        positions = torch.arange(seq, device=self.device)
        bias = self._position_bias(self.encoder_bias, positions[None, :] - positions[:, None], True)[None]
        bias = bias.masked_fill(~valid[:, None, None, :], torch.finfo(torch.float32).min)  # [B, H, L, L]
        x = F.embedding(ids, self.embedding)
        for lw in self.encoder_layers:
            y = self._norm(x, lw["ln"])
            q, k, v = (self._heads(t) for t in (y @ lw["qkv"]).chunk(3, dim=-1))
            x = self._clamp(x + self._attend(q, k, v, bias) @ lw["o"])
            x = self._clamp(x + self._mlp(self._norm(x, lw["mlp"]["ln"]), lw["mlp"]))
        return self._norm(x, self.encoder_final)

    # check_inputs reads these (the bound decoder has the same)
    @property
    def vocab_size(self):
        return self.config.vocab_size

    @property
    def end_id(self):
        return self.config.eos_token_id

    learned_positions = False
    max_positions = 0

    def bind(self, input_ids, input_lengths):
        """Run the encoder once; a T5Decoder over its output for ft_generate (row b of the decoder batch is
        row b of these inputs)."""
        ids, lengths = encoder_inputs(input_ids, input_lengths, self.vocab_size)
        return T5Decoder(self, self.encode(ids, lengths), lengths)


class T5Decoder:
    """The decoder of an FTT5 bound to one batch's encoder output, with ft_generate's decoder interface.

    cache: {"self": per layer (k, v) [N, H, slots, dk], "positions": [N, slots] position of each cached key,
    "cross": per layer (k, v) [N, H, L, dk] of the row's encoder output, "encoder_valid": [N, L] bool};
    reorder_cache takes every part in the order of `rows`, so beams carry their row's encoder output.
    """

    learned_positions = False  # relative positions: no bound on prompt + output length

    def __init__(self, model, encoder_output, encoder_lengths):
        self.model = model
        self.device = model.device
        config = model.config
        self.vocab_size, self.end_id = config.vocab_size, config.eos_token_id
        self.start_id = config.decoder_start_token_id
        self.max_positions = 0  # unused: learned_positions is False
        bsz, seq, _ = encoder_output.shape
        lengths = encoder_lengths.to(self.device)                                   # [B] checked by bind
        self.batch = bsz
        self.encoder_valid = torch.arange(seq, device=self.device)[None, :] < lengths[:, None]   # [B, L]
        self.cross = []  # per layer (k, v) [B, H, L, dk], computed once per request as FT's decoder does
        with torch.inference_mode():
            for lw in model.decoder_layers:
                k, v = (encoder_output @ lw["cross_kv"]).chunk(2, dim=-1)
                self.cross.append((model._heads(k), model._heads(v)))

    def new_cache(self, batch, slots):
        """Cache for the `batch` bound rows (in order) and `slots` decoder positions."""
        if batch != self.batch:
            raise ValueError(f"the decoder is bound to {self.batch} encoder rows, asked for a cache of {batch}")
        m = self.model
        shape = (batch, m.heads, slots, m.head_dim)
        return {"self": [(torch.zeros(shape, device=self.device, dtype=m.dtype),
                          torch.zeros(shape, device=self.device, dtype=m.dtype)) for _ in m.decoder_layers],
                "positions": torch.zeros(batch, slots, dtype=torch.long, device=self.device),
                "cross": list(self.cross), "encoder_valid": self.encoder_valid}

    @staticmethod
    def reorder_cache(cache, rows):
        """The cache with its rows taken in the order of `rows` (a LongTensor), e.g. beams."""
        def take(t):
            return t.index_select(0, rows.to(t.device))
        return {"self": [(take(k), take(v)) for k, v in cache["self"]], "positions": take(cache["positions"]),
                "cross": [(take(k), take(v)) for k, v in cache["cross"]],
                "encoder_valid": take(cache["encoder_valid"])}

    @torch.inference_mode()
    def hidden_states(self, ids, pos, cache, start, mask, prompt_tasks=None):
        """Decoder output [N, S, d] (after the final layer norm) for ids/pos [N, S] written to cache slots
        start..start+S-1; mask [N, 1, S|1, start+S] bool, True = may attend."""
        if prompt_tasks is not None and bool((prompt_tasks >= 0).any()):
            raise ValueError("prompt learning is not supported for T5 by this runtime")
        m = self.model
        end = start + ids.shape[1]
        cache["positions"][:, start:end] = pos
        # self-attention bias [N, H, S, end]: causal buckets of key position - query position, then the mask
        relative = cache["positions"][:, None, :end] - pos[:, :, None]
        self_bias = m._position_bias(m.decoder_bias, relative, False)
        self_bias = self_bias.masked_fill(~mask, torch.finfo(torch.float32).min)
        cross_bias = torch.zeros(cache["encoder_valid"].shape, dtype=torch.float32, device=self.device)
        cross_bias = cross_bias.masked_fill(~cache["encoder_valid"], torch.finfo(torch.float32).min)[:, None, None]
        x = F.embedding(ids, m.embedding)
        for lw, (k_cache, v_cache), (cross_k, cross_v) in zip(m.decoder_layers, cache["self"], cache["cross"]):
            y = m._norm(x, lw["ln"])
            q, k, v = (m._heads(t) for t in (y @ lw["qkv"]).chunk(3, dim=-1))
            k_cache[:, :, start:end], v_cache[:, :, start:end] = k, v
            x = m._clamp(x + m._attend(q, k_cache[:, :, :end], v_cache[:, :, :end], self_bias) @ lw["o"])
            q = m._heads(m._norm(x, lw["cross_ln"]) @ lw["cross_q"])
            x = m._clamp(x + m._attend(q, cross_k, cross_v, cross_bias) @ lw["cross_o"])
            x = m._clamp(x + m._mlp(m._norm(x, lw["mlp"]["ln"]), lw["mlp"]))
        return m._norm(x, m.decoder_final)

    def logits(self, hidden):
        """[..., d] -> [..., V] fp32; original T5 (tied embeddings) scales the decoder output by d_model**-0.5."""
        m = self.model
        if m.config.scale_decoder_output:
            hidden = hidden * (m.hidden ** -0.5)
        return (hidden @ m.lm_head.t()).float()

    @torch.inference_mode()
    def forward_logits(self, decoder_input_ids):
        """Teacher-forced logits [B, S, V] (fp32, CPU) for decoder_input_ids [B, S] (no padding)."""
        ids = torch.as_tensor(np.asarray(decoder_input_ids), dtype=torch.long).to(self.device)
        bsz, seq = ids.shape
        pos = torch.arange(seq, device=self.device).expand(bsz, seq)
        mask = torch.ones(seq, seq, dtype=torch.bool, device=self.device).tril()[None, None].expand(bsz, 1, -1, -1)
        return self.logits(self.hidden_states(ids, pos, self.new_cache(bsz, seq), 0, mask)).cpu()


def encoder_inputs(input_ids, input_lengths, vocab_size):
    """Right-padded encoder input_ids [B, L] and input_lengths [B] (sequences, arrays or tensors) -> CPU int64
    tensors; ValueError naming the input when an id is outside the vocabulary or a length outside [1, L]."""
    ids = np.asarray(input_ids)
    ids = torch.as_tensor(ids.astype(np.int64) if ids.dtype.kind == "u" else ids).to("cpu", torch.long)
    if ids.dim() != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, length >= 1], got shape {list(ids.shape)}")
    bsz, seq = ids.shape
    lengths = np.asarray(input_lengths).reshape(-1)
    lengths = torch.as_tensor(lengths.astype(np.int64)).to("cpu", torch.long)
    if lengths.numel() == 1:
        lengths = lengths.expand(bsz).clone()
    if lengths.numel() != bsz or bool((lengths < 1).any()) or bool((lengths > seq).any()):
        raise ValueError(f"sequence_length (encoder input lengths) must be {bsz} values in [1, {seq}], "
                         f"got {lengths.tolist()}")
    real = torch.arange(seq)[None, :] < lengths[:, None]
    if bool(((ids < 0) | (ids >= vocab_size))[real].any()):
        raise ValueError(f"input_ids contain token ids outside [0, {vocab_size})")
    return torch.where(real, ids, 0), lengths


@dataclasses.dataclass
class T5Batch:
    """One or more checked T5 requests: encoder inputs and the decoder's ft_generate.Batch (prompt = [start_id])."""

    encoder_ids: torch.Tensor      # [B, L] int64, right-padded with 0
    encoder_lengths: torch.Tensor  # [B] int64
    decoder: ft_generate.Batch

    @classmethod
    def concatenate(cls, batches):
        """Row-wise: encoder inputs right-padded to the longest, decoder batches by ft_generate's rule."""
        width = max(b.encoder_ids.shape[1] for b in batches)
        ids = torch.cat([F.pad(b.encoder_ids, (0, width - b.encoder_ids.shape[1])) for b in batches])
        return cls(ids, torch.cat([b.encoder_lengths for b in batches]),
                   ft_generate.Batch.concatenate([b.decoder for b in batches]))


def check_t5_inputs(model, input_ids, input_lengths, max_new_tokens, params=None,
                    max_beam_width=ft_generate.MAX_BEAM_WIDTH, defaults=None):
    """One request -> a T5Batch (ValueError naming the bad input). input_ids [B, L] right-padded encoder inputs,
    input_lengths [B] (FT's sequence_length), max_new_tokens [B] (FT's max_output_len), params an
    ft_generate.SamplingParams (start_id: the row's first decoder token, default config.ini decoder_start_token_id),
    defaults an ft_generate.GenerationDefaults."""
    params = ft_generate.SamplingParams() if params is None else params
    ids, lengths = encoder_inputs(input_ids, input_lengths, model.vocab_size)
    bsz = ids.shape[0]
    start = model.config.decoder_start_token_id if params.start_id is None else params.start_id
    start = np.asarray(start).reshape(-1).astype(np.int64)
    if start.size not in (1, bsz):
        raise ValueError(f"start_id has {start.size} values for a batch of {bsz}")
    prompt = torch.as_tensor(np.broadcast_to(start, (bsz,)).copy())[:, None]            # [B, 1]
    if bool((prompt < 0).any()) or bool((prompt >= model.vocab_size).any()):
        raise ValueError(f"start_id must be in [0, {model.vocab_size}), got {prompt[:, 0].tolist()}")
    decoder = ft_generate.check_inputs(model, prompt, torch.ones(bsz, dtype=torch.long), max_new_tokens, params,
                                       max_beam_width=max_beam_width, defaults=defaults)
    return T5Batch(ids, lengths, decoder)


def generate_batch(model, batch, stream=None):
    """Encode a T5Batch once and decode it with ft_generate.generate; returns t5_output's layout (stream(output)
    gets the same layout after each step)."""
    decoder = model.bind(batch.encoder_ids, batch.encoder_lengths)
    wrapped = None if stream is None else (lambda output: stream(t5_output(output)))
    return t5_output(ft_generate.generate(decoder, batch.decoder, wrapped))


def generate_t5(model, input_ids, input_lengths, max_new_tokens, params=None, defaults=None, stream=None,
                max_beam_width=ft_generate.MAX_BEAM_WIDTH):
    """check_t5_inputs + generate_batch for one request: FT's T5 output layout (t5_output)."""
    batch = check_t5_inputs(model, input_ids, input_lengths, max_new_tokens, params, max_beam_width, defaults)
    return generate_batch(model, batch, stream)


def t5_output(output):
    """ft_generate's output for one-token decoder prompts -> FT's T5 layout (T5Decoding::forward):
    output_ids [B, W, max_output_len] the generated tokens only (the start token dropped), end_id padded;
    sequence_length [B, W] generated tokens (a final end_id counts), not counting the start token (0 for padding
    beams); cum_log_probs [B, W] and output_log_probs [B, W, max_output_len] as they are."""
    return ft_generate.GenerationOutput(
        output_ids=output.output_ids[:, :, 1:],
        sequence_length=(output.sequence_length - 1).clamp(min=0),
        cum_log_probs=output.cum_log_probs,
        output_log_probs=output.output_log_probs)
