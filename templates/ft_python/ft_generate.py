"""Decoding for FTGPT: greedy, sampling, per-row options and the FT output layout.

Copied into generated Triton model repositories next to ft_gpt.py; needs only torch and numpy.
It drives a decoder through this interface only (see ft_gpt.FTGPT):

  model.new_cache(batch, slots) -> cache         model.reorder_cache(cache, rows) -> cache
  model.hidden_states(ids, pos, cache, start, mask) -> [B, S, h]
  model.logits(hidden [..., h]) -> [..., V] fp32
  model.device, model.vocab_size, model.end_id, model.max_positions, model.learned_positions

Batching: prompts arrive right-padded ([B, Lmax] + real lengths). Internally they are
left-aligned (padding moved to the front) with per-row position ids and a key-padding mask,
so every row sees exactly what it would see alone and all rows write the KV cache at the same
index during decoding.
"""

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class GenerationOutput:
    """Results in the contract's layout (beam dimension = 1), all CPU tensors.

    output_ids [B, 1, T] int64: prompt tokens, then generated tokens, then end_id padding;
      T = max(input_lengths) + max(max_new_tokens).
    sequence_length [B, 1] int64: prompt length + generated tokens (a final end_id counts).
    cum_log_probs [B, 1] float32: sum of output_log_probs over the generated tokens.
    output_log_probs [B, 1, max(max_new_tokens)] float32: log-softmax of each chosen token
      (after repetition penalty and temperature, before top-k/top-p truncation); 0 after a
      row stops.
    """
    output_ids: torch.Tensor
    sequence_length: torch.Tensor
    cum_log_probs: torch.Tensor
    output_log_probs: torch.Tensor


def _per_row(value, batch, default, dtype, name):
    """Broadcast None / scalar / sequence / array / tensor to a CPU tensor [batch]."""
    if value is None:
        return torch.full((batch,), default, dtype=dtype)
    if not torch.is_tensor(value):
        value = np.asarray(value)
        if value.dtype.kind == "u":  # torch has limited unsigned support: widen first
            value = value.astype(np.int64)
    t = torch.as_tensor(value)
    t = t.reshape(-1).to(dtype=dtype, device="cpu")
    if t.numel() == 1:
        return t.expand(batch).clone()
    if t.numel() != batch:
        raise ValueError(f"{name} has {t.numel()} values for a batch of {batch}")
    return t


@torch.inference_mode()
def generate(model, input_ids, input_lengths, max_new_tokens, end_id=None, top_k=None,
             top_p=None, temperature=None, repetition_penalty=None, random_seed=None,
             beam_width=1):
    """Generate for a batch of right-padded prompts; every option may be per row.

    input_ids [B, Lmax] (right-padded), input_lengths [B], max_new_tokens [B] (>= 1).
    end_id default: config.ini end_id. top_k 0/1 with top_p 0 (the defaults) = greedy;
    top_k > 1 samples from the k best; 0 < top_p <= 1 nucleus (after top-k when both).
    temperature (default 1) divides the logits; repetition_penalty (default 1) divides
    positive / multiplies negative logits of tokens already in the row (prompt included).
    random_seed (default 0, as in FT) seeds a per-row generator that draws the row's
    uniforms up front, so a seed gives the same sample whatever the other rows are.
    Returns a GenerationOutput (CPU tensors).
    """
    args = check_inputs(model, input_ids, input_lengths, max_new_tokens, end_id=end_id,
                             top_k=top_k, top_p=top_p, temperature=temperature,
                             repetition_penalty=repetition_penalty,
                             random_seed=random_seed, beam_width=beam_width)
    ids, lengths, new = args["input_ids"], args["input_lengths"], args["max_new_tokens"]
    end, top_k, top_p = args["end_id"], args["top_k"], args["top_p"]
    temp, rep, seed_list = args["temperature"], args["repetition_penalty"], args["random_seed"]
    lmax = int(lengths.max())
    ids = ids[:, :lmax]  # columns past every row's length are padding only
    bsz = ids.shape[0]

    steps = int(new.max())
    total = lmax + steps
    # Per-row uniforms for every step, drawn up front from the row's own generator
    # (numpy PCG64: its stream is sequential, so the first n draws never depend on how
    # many are drawn, i.e. on the other rows' lengths; identical on CPU and CUDA).
    uniforms = torch.from_numpy(np.stack([
        np.random.Generator(np.random.PCG64(s % (1 << 64))).random(steps)
        for s in seed_list]))                                             # [B, steps] f64

    # Left-align: row b's real tokens occupy columns offset_b .. Lmax-1.
    offset = lmax - lengths                                               # [B]
    col = torch.arange(lmax)
    src = (col[None, :] - offset[:, None]).clamp(min=0)                   # [B, Lmax]
    left_ids = ids.gather(1, src)
    valid = col[None, :] >= offset[:, None]                               # [B, Lmax]
    pos = src  # position id = index inside the real prompt (pads get 0, never attended)

    dev = model.device
    key_valid = torch.ones(bsz, total, dtype=torch.bool, device=dev)
    key_valid[:, :lmax] = valid.to(dev)
    # Prefill mask [B, 1, Lmax, Lmax]: causal and no pad keys; a pad query may see
    # itself so no softmax row is empty (its output is never used).
    causal = torch.ones(lmax, lmax, dtype=torch.bool, device=dev).tril()
    eye = torch.eye(lmax, dtype=torch.bool, device=dev)
    mask = ((causal[None] & key_valid[:, None, :lmax]) | eye[None])[:, None]

    cache = model.new_cache(bsz, total)
    hidden = model.hidden_states(left_ids.to(dev), pos.to(dev), cache, 0, mask)
    logits = model.logits(hidden[:, -1])                                  # [B, V]

    # Sampling state on the compute device.
    lengths_d, end_d, new_d = lengths.to(dev), end.to(dev), new.to(dev)
    top_k_d, top_p_d = top_k.to(dev), top_p.to(dev)
    temp_d, rep_d, uniforms = temp.to(dev), rep.to(dev), uniforms.to(dev)
    use_rep = bool((rep != 1.0).any())
    seen = None
    if use_rep:  # [B, V] bool: tokens present in the row so far
        seen = torch.zeros(bsz, model.vocab_size, dtype=torch.bool, device=dev)
        rows, cols = valid.nonzero(as_tuple=True)
        seen[rows.to(dev), left_ids[rows, cols].to(dev)] = True
    greedy = ((top_k <= 1) & (top_p <= 0)) | (top_k == 1)
    sample_rows = (~greedy).nonzero().reshape(-1).to(dev)

    gen = torch.full((bsz, max(steps, 1)), 0, dtype=torch.long, device=dev)
    gen_lp = torch.zeros(bsz, max(steps, 1), dtype=torch.float32, device=dev)
    done = torch.zeros(bsz, dtype=torch.bool, device=dev)
    count = torch.zeros(bsz, dtype=torch.long, device=dev)
    for step in range(steps):
        if use_rep:
            logits = torch.where(seen, torch.where(logits > 0, logits / rep_d[:, None],
                                                   logits * rep_d[:, None]), logits)
        logits = logits / temp_d[:, None]
        logprobs = torch.log_softmax(logits, dim=-1)
        token = logits.argmax(dim=-1)
        if sample_rows.numel():
            token[sample_rows] = _sample(logits[sample_rows], top_k_d[sample_rows],
                                              top_p_d[sample_rows],
                                              uniforms[sample_rows, step])
        active = ~done
        gen[:, step] = torch.where(active, token, end_d)
        gen_lp[:, step] = torch.where(active, logprobs.gather(1, token[:, None])[:, 0], 0.0)
        count += active.long()
        done |= active & ((token == end_d) | (count >= new_d))
        if step + 1 == steps or bool(done.all()):
            break
        if use_rep:
            seen[torch.arange(bsz, device=dev), token] = True
        # Decode one token per row: cache slot lmax+step, position length+step.
        step_pos = (lengths_d + step).clamp(max=model.max_positions - 1)[:, None]
        step_mask = key_valid[:, None, None, :lmax + step + 1]
        hidden = model.hidden_states(token[:, None], step_pos, cache, lmax + step,
                              step_mask)
        logits = model.logits(hidden[:, 0])

    # Assemble [B, T] = prompt | generated | end_id padding.
    gen, gen_lp, count = gen.cpu(), gen_lp.cpu(), count.cpu()
    out = end[:, None].expand(bsz, total).clone()
    out[:, :lmax] = torch.where(col[None, :] < lengths[:, None], ids, end[:, None])
    s = torch.arange(steps)
    gen = gen[:, :steps]
    out.scatter_(1, lengths[:, None] + s[None, :],
                 torch.where(s[None, :] < count[:, None], gen, end[:, None]))
    gen_lp = gen_lp[:, :steps]
    return GenerationOutput(
        output_ids=out[:, None, :],
        sequence_length=(lengths + count)[:, None],
        cum_log_probs=gen_lp.sum(dim=1, keepdim=True),
        output_log_probs=gen_lp[:, None, :].contiguous())

def check_inputs(model, input_ids, input_lengths, max_new_tokens, end_id=None, top_k=None,
                 top_p=None, temperature=None, repetition_penalty=None, random_seed=None,
                 beam_width=None):
    """Normalise generate()'s arguments to per-row CPU tensors; ValueError if any is bad.

    Returns a dict with input_ids [B, L] int64, input_lengths, max_new_tokens, end_id,
    top_k (int64 [B]), top_p, temperature, repetition_penalty (float32 [B]) and
    random_seed (list of B python ints).
    """
    if beam_width is not None and int(np.max(np.asarray(beam_width))) > 1:
        raise ValueError("beam_width > 1 is not supported by the python runtime yet")
    if not torch.is_tensor(input_ids):
        input_ids = np.asarray(input_ids)
        if input_ids.dtype.kind == "u":
            input_ids = input_ids.astype(np.int64)
    ids = torch.as_tensor(input_ids).to(dtype=torch.long, device="cpu")
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, max_len], got shape {tuple(ids.shape)}")
    bsz, lmax = ids.shape
    if bsz == 0:
        raise ValueError("empty batch")
    lengths = _per_row(input_lengths, bsz, 0, torch.long, "input_lengths")
    new = _per_row(max_new_tokens, bsz, 0, torch.long, "max_new_tokens")
    end = _per_row(end_id, bsz, model.end_id, torch.long, "end_id")
    top_k = _per_row(top_k, bsz, 0, torch.long, "top_k")
    top_p = _per_row(top_p, bsz, 0.0, torch.float32, "top_p")
    temp = _per_row(temperature, bsz, 1.0, torch.float32, "temperature")
    rep = _per_row(repetition_penalty, bsz, 1.0, torch.float32, "repetition_penalty")
    seeds = [0] * bsz  # FT seeds its samplers with 0 when no random_seed is given
    if random_seed is not None:
        # Keep seeds as exact python ints: a numpy array built from a list mixing values
        # above 2^63 with small ones would silently become float64.
        if torch.is_tensor(random_seed) or isinstance(random_seed, np.ndarray):
            flat = random_seed.reshape(-1).tolist()
        else:
            flat = np.asarray(random_seed, dtype=object).reshape(-1).tolist()
        if len(flat) not in (1, bsz):
            raise ValueError(f"random_seed has {len(flat)} values for a batch of {bsz}")
        seeds = [int(v) for v in flat] * (bsz if len(flat) == 1 else 1)
    problems = []
    if bool((lengths < 1).any()) or bool((lengths > lmax).any()):
        problems.append(f"input_lengths must be in [1, {lmax}] (the input_ids width), "
                        f"got {lengths.tolist()}")
    if bool((new < 1).any()):
        problems.append(f"request_output_len must be >= 1, got {new.tolist()}")
    if model.learned_positions and bool((lengths + new > model.max_positions).any()):
        problems.append(f"input length + request_output_len exceeds max_pos_seq_len="
                        f"{model.max_positions}: {(lengths + new).tolist()}")
    if bool((end < 0).any()):
        problems.append("end_id must be >= 0")
    real = torch.arange(lmax)[None, :] < lengths[:, None]
    if bool(((ids < 0) | (ids >= model.vocab_size))[real].any()):
        problems.append(f"input_ids contain token ids outside [0, {model.vocab_size})")
    if bool((top_k < 0).any()):
        problems.append("runtime_top_k must be >= 0")
    if bool(((top_p < 0) | (top_p > 1)).any()) or bool(top_p.isnan().any()):
        problems.append("runtime_top_p must be in [0, 1]")
    if not bool((temp > 0).all()):
        problems.append("temperature must be > 0")
    if not bool((rep > 0).all()):
        problems.append("repetition_penalty must be > 0")
    if problems:
        raise ValueError("; ".join(problems))
    return {"input_ids": ids, "input_lengths": lengths, "max_new_tokens": new,
            "end_id": end, "top_k": top_k, "top_p": top_p, "temperature": temp,
            "repetition_penalty": rep, "random_seed": seeds}

def _sample(logits, top_k, top_p, u):
    """Sample one token per row of logits [R, V] (temperature already applied).

    top_k [R] (0 = no limit), top_p [R] (0 = no limit), u [R] uniforms in [0, 1).
    Inverse-CDF sampling over the kept tokens sorted by probability.
    """
    vocab = logits.shape[-1]
    k_row = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    kmax = int(k_row.max())
    vals, idx = torch.topk(logits, kmax, dim=-1)                          # sorted desc
    rank = torch.arange(kmax, device=logits.device)
    vals = vals.masked_fill(rank[None, :] >= k_row[:, None], float("-inf"))
    probs = torch.softmax(vals, dim=-1)
    # Nucleus: keep the smallest prefix whose mass reaches top_p (the first always kept).
    before = torch.cumsum(probs, dim=-1) - probs
    keep = (before < top_p[:, None]) | (top_p[:, None] <= 0) | (top_p[:, None] >= 1)
    keep &= rank[None, :] < k_row[:, None]
    probs = probs * keep
    cdf = torch.cumsum(probs, dim=-1)
    target = (u.to(cdf.dtype) * cdf[:, -1])[:, None]
    choice = torch.searchsorted(cdf, target, right=True)
    choice = torch.minimum(choice, keep.sum(dim=-1, keepdim=True) - 1)
    return idx.gather(1, choice)[:, 0]
