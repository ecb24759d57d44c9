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


MAX_BEAM_WIDTH = 8  # default cap on beam_width (the KV cache grows with it)


@dataclass
class GenerationOutput:
    """Results in the FT layout, all CPU tensors; W = max beam_width of the batch (1 without beams).

    output_ids [B, W, T] int64: prompt tokens, then generated tokens, then end_id padding;
      T = max(input_lengths) + max(max_new_tokens) (while streaming: + steps so far).
    sequence_length [B, W] int64: prompt length + generated tokens (a final end_id or stop
      word counts); 0 for padding beams of rows with a smaller beam_width.
    cum_log_probs [B, W] float32: sum of output_log_probs over the generated tokens (not
      length-normalised; beams are sorted by the normalised score, best first).
    output_log_probs [B, W, max(max_new_tokens)] float32: log-softmax of each chosen token
      (after repetition penalty, temperature and bad-word bans, before top-k/top-p
      truncation); 0 after a sequence stops and for rows with is_return_log_probs False.
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
             beam_width=None, len_penalty=None, beam_search_diversity_rate=None,
             bad_words_list=None, stop_words_list=None, top_p_decay=None, top_p_min=None,
             top_p_reset_ids=None, is_return_log_probs=None, start_id=None,
             max_beam_width=MAX_BEAM_WIDTH, stream=None):
    """Generate for a batch of right-padded prompts; every option is per row.

    Rows never influence each other: a row gives the same result alone or in any batch,
    whatever the other rows' options. Each option takes None (default), a scalar (all rows)
    or B values; every dict check_inputs returns can be concatenated row-wise with other
    requests' dicts (tensors with torch.cat, lists with +) and passed back under the same
    keyword names.

    input_ids [B, Lmax] (right-padded), input_lengths [B], max_new_tokens [B] (>= 1).
    end_id (default config.ini end_id): a row/beam stops after generating it (it counts).
    start_id: accepted and checked (>= 0), unused (GPT prompts carry their own start).

    Per-token processing, in this order, on fp32 logits [V]:
      repetition_penalty (default 1): divides positive / multiplies negative logits of
        tokens already in the sequence (prompt included);
      temperature (default 1): divides the logits;
      bad_words_list: the last token of a bad word gets -inf when the sequence ends with the
        word's other tokens (single-token words: always), as FT's ban kernel;
      log_softmax -> the log-prob reported for the chosen token.
    Token choice (beam_width 1): top_k 0/1 with top_p 0 (the defaults) = greedy; top_k > 1
      samples from the k best; 0 < top_p <= 1 nucleus (after top-k when both). random_seed
      (default 0, as FT) seeds numpy PCG64 for the row; step t uses its t-th uniform u_t in
      inverse-CDF sampling over the kept tokens sorted by probability, so a seed gives the
      same sample whatever the other rows are.
    top_p_decay (default 1), top_p_min (default 1e-6), top_p_reset_ids (default -1 = none),
      FT's decaying nucleus: step 0 uses top_p; after each step
      top_p <- top_p_initial if the token == reset id else max(top_p * decay, top_p_min).
    stop_words_list: a row/beam stops when its sequence (prompt included) ends with a stop
      word; the word stays in the output and counts in sequence_length (as FT).
    Word lists use FT's format [B, 2, L] (or [2, L] for all rows): row 0 the words' ids
      concatenated, row 1 cumulative end offsets, padded with -1 (ids padding is ignored).
      check_inputs returns them as a list of B tuples of words (tuples of ints), which
      generate also accepts.

    Beam search (beam_width W > 1, at most max_beam_width; rows may have different W):
      FT/HF beam search with early stopping. Each step every live beam's top 2W next tokens
      are candidates with score cum_log_prob + log_prob; beam_search_diversity_rate d
      (default 0) ranks candidates by score + d * (rank of the token among its beam's
      candidates, 0-based), so d < 0 favours children of different beams (Li et al. 2016;
      the log-probs themselves are not changed). In ranked order over the row's 2W best
      candidates: a candidate ending in end_id / a stop word / the row's last step is a
      finished hypothesis if it is among the first W, with normalised score
      cum_log_prob / generated_length ** len_penalty (len_penalty default 0 = no
      normalisation; generated_length counts the final token); the first W unfinished ones
      are the next beams. The row keeps its W best finished hypotheses and stops as soon as
      it has W of them. This is HF generate(num_beams=W, length_penalty=len_penalty,
      early_stopping=True, do_sample=False) exactly. top_k, top_p and random_seed are
      ignored for such rows (FT runs beam search then); temperature, repetition_penalty and
      bad words apply to the logits before log_softmax.

    is_return_log_probs (default True): False gives zeros in that row's cum_log_probs and
      output_log_probs (the FT backend omits both outputs then).
    stream: None, or a callable called after every decoding step with a GenerationOutput
      of the sequences so far (same layout, T = max(input_lengths) + steps so far; beam
      rows show their live beams, best running score first, or their final hypotheses once
      done). The return value is always the complete output.

    Returns a GenerationOutput (CPU tensors); beam dimension = max beam_width in the batch,
    beams past a row's own beam_width are padding (end_id, sequence_length 0, zero scores).
    Raises ValueError (from check_inputs) naming the bad input.
    """
    if any(v is not None for v in (len_penalty, beam_search_diversity_rate, bad_words_list,
                                   stop_words_list, top_p_decay, top_p_min, top_p_reset_ids,
                                   is_return_log_probs, start_id, stream)):
        raise NotImplementedError("being implemented (issue 4): see the docstring")
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
                 beam_width=None, len_penalty=None, beam_search_diversity_rate=None,
                 bad_words_list=None, stop_words_list=None, top_p_decay=None, top_p_min=None,
                 top_p_reset_ids=None, is_return_log_probs=None, start_id=None,
                 max_beam_width=MAX_BEAM_WIDTH):
    """Normalise generate()'s arguments to per-row CPU values; ValueError naming the bad input.

    Returns a dict keyed by generate()'s keyword names: input_ids [B, L] int64;
    input_lengths, max_new_tokens, end_id, top_k, beam_width, top_p_reset_ids, start_id
    (int64 [B]); top_p, temperature, repetition_penalty, len_penalty,
    beam_search_diversity_rate, top_p_decay, top_p_min (float32 [B]); is_return_log_probs
    (bool [B]); random_seed (list of B python ints); bad_words_list, stop_words_list (list
    of B tuples of words, a word = tuple of token ids). Requests' dicts concatenate row-wise.
    Checks: beam_width in [1, max_beam_width], top_p in [0, 1], top_p_decay in (0, 1],
    top_p_min in (0, 1], temperature / repetition_penalty > 0, word lists shaped
    [B|1, 2, L] with increasing offsets and ids inside the vocabulary, lengths in range.
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
