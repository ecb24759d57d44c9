"""Decoding for FTGPT: greedy, sampling, per-row options and the FT output layout.

Copied into generated Triton model repositories next to ft_gpt.py and ft_interface.py (the
request interface's table: defaults and bounds of the options); needs only torch and numpy.
Use: batch = check_inputs(model, ids, lengths, max_new_tokens, SamplingParams(...), defaults), then
generate(model, batch), or Engine(model) to decode requests that come and go (in-flight batching); defaults = GenerationDefaults.read(shard_dir), the model's generation_config.json.
It drives a decoder through this interface only (see ft_gpt.FTGPT):

  model.new_cache(batch, slots) -> cache         model.reorder_cache(cache, rows) -> cache
  model.hidden_states(ids, pos, cache, start, mask[, prompt_tasks][, valid]) -> [B, S, h]
  (optional) model.grow_cache(cache, slots) -> cache: caches grow as decoding goes (else allocated whole);
    model.hidden_states_grouped(ids, pos, [(cache, start, mask), ...]) -> [B, S, h]: Engine's joint forward
    (else a forward per cohort); model.cache_bytes(cache) -> int
  (optional) model.ROW_SLOTS: hidden_states takes a LongTensor start [B] (each row's own slot, S = 1): Engine keeps
    every cohort's cache in one pool (rows x slots, cache layout) and attends for all cohorts in one call
  (optional) model.SKIPS_PADDING: hidden_states(_grouped) take valid [B, S] bool, a padded prefill's real tokens,
    and compute the pads as nothing; model.trim_heap(): called when the Engine's last request has left
  model.logits(hidden [..., h]) -> [..., V] fp32
  model.device, model.vocab_size, model.end_id, model.max_positions, model.learned_positions
  (p/prompt tuning, optional) model.prompt_lengths, model.prompt_task_names, model.prompt_start_id

Batching: prompts arrive right-padded ([B, Lmax] + real lengths). Internally they are
left-aligned (padding moved to the front) with per-row position ids and a key-padding mask,
so every row sees exactly what it would see alone and all rows write the KV cache at the same
index during decoding.
Row b owns W_b consecutive decoder slots (1 for greedy / sampling, beam_width for beam
search); every per-row option is expanded to the row's slots, so rows never see each other.
"""

import contextlib
import json
import os
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

try:  # imported as templates.ft_python.ft_generate inside the project
    from . import ft_interface
except ImportError:  # imported as a top-level module inside a Triton model directory
    import ft_interface


MAX_BEAM_WIDTH = 8  # default cap on beam_width (the KV cache grows with it)
# Triton dtype of an option -> the per-row CPU tensor decoding uses (unsigned ids widened: -1 means none).
_TORCH_DTYPES = {"UINT32": torch.long, "UINT64": torch.long, "INT32": torch.long, "FP32": torch.float32,
                 "BOOL": torch.bool}


@dataclass
class SamplingParams:
    """A request's per-row decoding options (generate() says what each does).

    Each is None (the default of ft_interface's table), one value for every row, or B values (a sequence, numpy
    array or tensor). The word lists take FT's format [B|1, 2, L] / [2, L], or Batch's list of B tuples of words.
    The fields are those of ft_interface.SAMPLING_INPUTS, in the same order.
    """

    top_k: object = None
    top_p: object = None
    beam_search_diversity_rate: object = None
    temperature: object = None
    len_penalty: object = None
    repetition_penalty: object = None
    random_seed: object = None
    is_return_log_probs: object = None
    beam_width: object = None
    start_id: object = None
    end_id: object = None
    bad_words_list: object = None
    stop_words_list: object = None
    top_p_decay: object = None
    top_p_min: object = None
    top_p_reset_ids: object = None
    prompt_task_id: object = None


GENERATION_CONFIG = "generation_config.json"  # beside the shards: the exporter's normalised copy of the source's


@dataclass(frozen=True)
class GenerationDefaults:
    """The model's own generation settings (HF generation_config.json), applied to rows that leave an option unset.

    eos_token_ids: every id that ends a row (HF stops a row at any of them); () = config.ini's end_id only. A request
      that sends end_id replaces the whole set for its rows, as HF's generate(eos_token_id=...) does.
    repetition_penalty: HF applies it whether or not it samples, so it is the default of every row.
    do_sample True: top_k (HF's default 50), top_p (default 1.0, no nucleus) and temperature (default 1.0) are the
      defaults of a row that leaves them unset. do_sample False (HF's default): those rows keep the interface's
      greedy defaults (top_k 0, top_p 0, temperature 1), as HF ignores its sampling settings when greedy.
    max_new_tokens, max_length: not applied here (FT's interface requires request_output_len); the export passes
      them to preprocessing, which sizes an ensemble request that leaves its output length out.
    """

    eos_token_ids: tuple = ()
    do_sample: bool = False
    top_k: int | None = None
    top_p: float | None = None
    temperature: float | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int | None = None
    max_length: int | None = None

    @classmethod
    def read(cls, shard_dir):
        """From `<shard_dir>/generation_config.json` (HF keys); no file: no defaults beyond config.ini's end_id."""
        path = os.path.join(os.fspath(shard_dir), GENERATION_CONFIG)
        if not os.path.isfile(path):
            return cls()
        with open(path, encoding="utf-8") as handle:
            values = json.load(handle)
        eos = values.get("eos_token_id")
        eos = () if eos is None else tuple(int(i) for i in (eos if isinstance(eos, list) else [eos]))
        return cls(eos_token_ids=eos, **{field.name: values.get(field.name) for field in fields(cls)
                                         if field.name != "eos_token_ids" and values.get(field.name) is not None})

    def option_defaults(self):
        """SamplingParams field -> default value for rows that leave it unset (fields absent: the table's)."""
        options = {}
        if self.repetition_penalty is not None:
            options["repetition_penalty"] = float(self.repetition_penalty)
        if self.do_sample:
            # HF's defaults when generation_config.json does not say (GenerationConfig._get_default_generation_params).
            options["top_k"] = 50 if self.top_k is None else int(self.top_k)
            options["top_p"] = 1.0 if self.top_p is None else float(self.top_p)
            options["temperature"] = 1.0 if self.temperature is None else float(self.temperature)
        return options


@dataclass
class Batch:
    """Checked per-row CPU values of one or more requests (check_inputs' result, generate()'s input).

    input_ids [B, L] int64; input_lengths, max_new_tokens, end_id, top_k, beam_width, top_p_reset_ids, start_id
    int64 [B]; end_ids int64 [B, E]: every id that ends row b (end_id first, -1 padding); top_p, temperature,
    repetition_penalty, len_penalty, beam_search_diversity_rate, top_p_decay, top_p_min float32 [B];
    is_return_log_probs bool [B]; random_seed a list of B python ints; bad_words_list, stop_words_list lists of B
    tuples of words (a word = tuple of token ids); prompt_task_id int64 [B] (-1: none).
    """

    input_ids: torch.Tensor
    input_lengths: torch.Tensor
    max_new_tokens: torch.Tensor
    end_id: torch.Tensor
    end_ids: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    temperature: torch.Tensor
    repetition_penalty: torch.Tensor
    random_seed: list
    beam_width: torch.Tensor
    len_penalty: torch.Tensor
    beam_search_diversity_rate: torch.Tensor
    top_p_decay: torch.Tensor
    top_p_min: torch.Tensor
    top_p_reset_ids: torch.Tensor
    is_return_log_probs: torch.Tensor
    start_id: torch.Tensor
    bad_words_list: list
    stop_words_list: list
    prompt_task_id: torch.Tensor = None  # [B] int64, -1 = no prompt-learning task

    @classmethod
    def concatenate(cls, batches):
        """Row-wise concatenation: input_ids cut or right-padded (with 0) to the longest prompt, lists joined."""
        width = max(int(batch.input_lengths.max()) for batch in batches)
        merged = {}
        for field in fields(cls):
            values = [getattr(batch, field.name) for batch in batches]
            if field.name == "input_ids":
                merged[field.name] = torch.cat([torch.nn.functional.pad(v[:, :width], (0, max(0, width - v.shape[1])))
                                                for v in values])
            elif field.name == "end_ids":  # [B, E] padded with -1 (never generated) to the widest set
                ends = max(v.shape[1] for v in values)
                merged[field.name] = torch.cat([torch.nn.functional.pad(v, (0, ends - v.shape[1]), value=-1)
                                                for v in values])
            elif torch.is_tensor(values[0]):
                merged[field.name] = torch.cat(values)
            else:  # python lists (seeds, word lists)
                merged[field.name] = [x for v in values for x in v]
        return cls(**merged)


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
def generate(model, batch, stream=None):
    """Generate for a checked batch (check_inputs, or Batch.concatenate of several); every option is per row.

    Rows never influence each other: a row gives the same result alone or in any batch,
    whatever the other rows' options. Each option (SamplingParams) takes None (default), a
    scalar (all rows) or B values.

    input_ids [B, Lmax] (right-padded), input_lengths [B], max_new_tokens [B] (>= 1).
    end_id (default config.ini end_id): a row/beam stops after generating it (it counts); a row that leaves it
      unset stops at any of the model's eos ids (Batch.end_ids: GenerationDefaults.eos_token_ids, as HF's generate
      stops at any id of generation_config.json's eos_token_id); outputs are padded with end_id.
    start_id: accepted and checked (in [0, V)), unused (GPT prompts carry their own start).

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
      FT's decaying nucleus for rows with top_p > 0: step 0 uses top_p; after each step
      top_p <- top_p_initial if the token == reset id else max(top_p * decay, top_p_min).
    stop_words_list: a row/beam stops when its sequence (prompt included) ends with a stop
      word; the word stays in the output and counts in sequence_length (as FT).
    prompt_task_id (prompt_learning_task_name_ids, default -1 = none): FT's p/prompt tuning; the row's ids
      >= model.prompt_start_id are virtual tokens embedded from that task's table, counted in lengths and
      positions like any token, returned in output_ids as sent (check_inputs refuses unknown tasks and ids
      outside the task's table).
    Word lists use FT's format [B, 2, L] (or [2, L] for all rows): row 0 the words' ids
      concatenated, row 1 cumulative end offsets, padded with -1 (ids padding is ignored).
      Batch holds them as a list of B tuples of words (tuples of ints), which
      SamplingParams also accepts.

    Beam search (beam_width W > 1, at most check_inputs' max_beam_width; rows may have different W):
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
      early_stopping=True, do_sample=False) token for token (tests/test_generate.py; with
      stop words: a StoppingCriteria ending the sequence at the word). As FT's finalize
      step, beams are ranked by cum_log_prob / generated_tokens ** len_penalty and the
      reported cum_log_probs are not normalised. top_k, top_p and random_seed are ignored
      for such rows (FT runs beam search then); temperature, repetition_penalty and bad
      words apply to the logits before log_softmax (HF's beam search applies its
      processors after log_softmax, so parity holds without them).
      Rows with different beam widths share one batch: each row owns its own W decoder
      slots, the output's beam dimension is the largest W.

    is_return_log_probs (default True): False gives zeros in that row's cum_log_probs and
      output_log_probs (the FT backend omits both outputs then).
    stream: None, or a callable called after every decoding step with a GenerationOutput
      of the sequences so far (same layout, T = max(input_lengths) + steps so far; beam
      rows show their live beams, best running score first, or their final hypotheses once
      done). Decoding stops once every row has finished, so there are at most
      max(max_new_tokens) calls. The return value is always the complete output.

    Returns a GenerationOutput (CPU tensors); beam dimension = max beam_width in the batch,
    beams past a row's own beam_width are padding (end_id, sequence_length 0, zero scores).
    """
    return _Decoding(model, batch, stream).run()


CACHE_BLOCK = 64  # a decoding's KV cache grows by this many positions at a time


class Engine:
    """In-flight batching: many decodings advanced together, one joint forward per step.

    admit(batch) prefills a request's batch (alone, or inside joint_prefill() together with the others admitted there)
    and returns its Cohort (the state generate() keeps for one call);
    step() chooses the next token of every cohort, then runs ONE forward for all cohorts still decoding: their rows
    go through every projection together (the weights are read once per step) and attend to their own caches. A
    cohort leaves as soon as it finishes (its result in cohort.output) or is cancelled, and its cache is freed at
    once; a cohort admitted between two steps joins at the next. Each cohort's output is that of generate() on its
    batch alone. Caches grow by CACHE_BLOCK positions as the cohort decodes, never to max_new_tokens up front.

    With a decoder that takes each row's own cache slot (model.ROW_SLOTS, FTGPT), the decoding cohorts' caches
    live in one pool, a cache of (their slots) rows x (the largest cohort capacity) positions, cohort after cohort
    in self.cohorts' order: a step's forward then attends for every row in one call per layer (a key mask per row
    for the rows at other lengths) instead of one call per cohort. A cohort's own prefill cache moves into the pool
    at its first step; a cohort that leaves or is cancelled gives its rows back at once (the pool is re-laid out
    without them, and dropped with the last one); beam reorders are applied to the cohort's rows in place.
    cache_bytes() = 2 x layers x kv_heads x head_dim x element size x rows x positions, the positions rounded up
    to CACHE_BLOCK and, in the pool, to the longest running cohort's.
    Not thread-safe: one thread drives an Engine.
    """

    def __init__(self, model):
        self.model = model
        self.cohorts = []
        self._pending = None  # cohorts admitted inside joint_prefill(), not prefilled yet
        self.pool = None      # the pooled cohorts' cache (model.ROW_SLOTS): rows of self._pooled, in its order
        self._pooled = []
        self._pooling = bool(getattr(model, "ROW_SLOTS", False))

    @torch.inference_mode()
    def admit(self, batch, stream=None, model=None):
        """Prefill `batch` (check_inputs' Batch) and add it; its first token is chosen at the next step(). model: the
        cohort's own decoder (an encoder-decoder's, bound to the cohort's encoder output; default the Engine's), which
        has no grouped forward: the Engine then runs a forward per cohort. Inside joint_prefill() the prefill of a
        cohort of the Engine's model waits for the block's end."""
        if model is not None and self._pooling:
            raise ValueError("a cohort with its own decoder cannot join an engine that pools its model's caches")
        defer = self._pending is not None and model is None
        cohort = _Decoding(self.model if model is None else model, batch, stream, prefill=not defer)
        if defer:
            self._pending.append(cohort)
        self.cohorts.append(cohort)
        return cohort

    @contextlib.contextmanager
    def joint_prefill(self):
        """The cohorts admitted in this block are prefilled together when it ends: prompts of similar lengths in one
        forward (grouped_prefill), every projection over all their rows at once, instead of one forward each. Each
        cohort's output is still that of generate() on its batch alone. A cohort whose prefill fails gets `error`
        and leaves at the next step(); the others are unaffected."""
        self._pending = []
        try:
            yield self
        finally:
            pending, self._pending = self._pending, None
            self._prefill(pending)

    @torch.inference_mode()
    def _prefill(self, cohorts):
        grouped = callable(getattr(self.model, "hidden_states_grouped", None))
        for group in (_prefill_groups(cohorts) if grouped else []):
            if len(group) > 1:
                try:
                    grouped_prefill(self.model, group)
                except Exception:  # noqa: BLE001 - e.g. out of memory together: each is tried alone below
                    continue
        for cohort in cohorts:
            if cohort.cache is None:  # alone, or its group's forward failed
                try:
                    cohort.prefill_alone()
                except Exception as exc:  # noqa: BLE001 - this request fails alone
                    cohort.error = exc

    def cancel(self, cohort):
        """Drop a cohort now (its cache with it: pooled, its rows leave the pool now); it gets no output."""
        if cohort in self.cohorts:
            self.cohorts.remove(cohort)
        cohort.release()
        if any(pooled is cohort for pooled in self._pooled):
            self._arrange([pooled for pooled in self._pooled if pooled is not cohort])

    def cache_bytes(self):
        """Bytes of KV cache held now: the pool and the caches of cohorts not in it yet (model.cache_bytes)."""
        caches = [self.pool] + [cohort.cache for cohort in self.cohorts]
        return sum(self.model.cache_bytes(cache) for cache in caches if cache is not None)

    @property
    def rows(self):
        """Decoder slots (rows x beams) of the cohorts still decoding."""
        return sum(cohort.slots for cohort in self.cohorts)

    @torch.inference_mode()
    def step(self):
        """One decoding step of every cohort; returns the cohorts that left in it, each with `output` (its
        GenerationOutput) or `error` (the exception that ended it: its stream callback, or the joint forward, which
        ends every cohort in it)."""
        going, left = [], []
        for cohort in self.cohorts:
            if cohort.error is not None:  # its prefill failed (joint_prefill)
                left.append(cohort)
                continue
            try:
                more = cohort.advance()
            except Exception as exc:  # noqa: BLE001 - one cohort's failure ends that cohort only
                cohort.error = exc
                more = False
            (going if more else left).append(cohort)
        try:
            if going:
                self._forward(going)
        except Exception as exc:  # noqa: BLE001 - reported on every cohort of the forward
            for cohort in going:
                cohort.error = exc
            left += going
            going = []
        self.cohorts = going
        for cohort in left:
            if cohort.error is None:
                cohort.output = cohort.result()
            cohort.release()
        if self._pooled and not going:  # the last cohorts left (a forward re-lays the pool out otherwise)
            self._arrange([])
        if left and not going and callable(getattr(self.model, "trim_heap", None)):
            self.model.trim_heap()  # idle: the freed caches' memory back to the system
        return left

    def _arrange(self, cohorts):
        """Lay the pool out for `cohorts` (each pooled already or holding its own prefill cache), in this order:
        beam reorders (cohort.cache_order) applied in place, then, when the cohorts or the longest capacity
        changed, a new pool of exactly their rows x that capacity with every cohort's filled positions copied in
        (its own cache then freed)."""
        model = self.model
        rows = {}  # id(cohort) -> its first row in the current pool
        first = 0
        for cohort in self._pooled:
            rows[id(cohort)] = first
            first += cohort.slots
        for cohort in self._pooled:
            if cohort.cache_order is not None:  # beams follow their parents (advance())
                take = slice(rows[id(cohort)], rows[id(cohort)] + cohort.slots)
                for layer in self.pool:
                    for part in layer:
                        part[take] = part[take].index_select(0, cohort.cache_order.to(part.device))
                cohort.cache_order = None
        positions = max((cohort.capacity for cohort in cohorts), default=0)
        if (self.pool is not None and positions == self.pool[0][0].shape[2]
                and [id(c) for c in cohorts] == [id(c) for c in self._pooled]):
            return
        pool = model.new_cache(sum(cohort.slots for cohort in cohorts), positions) if cohorts else None
        for layer in pool or ():
            # A row's slots past its own length are masked, but still read: zeros, never new_cache's garbage (an inf
            # key plus the mask's -inf is NaN, and a NaN value times its zero weight is NaN).
            for part in layer:
                part.zero_()
        first = 0
        for cohort in cohorts:
            take = slice(first, first + cohort.slots)
            if cohort.pooled:
                source = [tuple(part[rows[id(cohort)]:rows[id(cohort)] + cohort.slots] for part in layer)
                          for layer in self.pool]
            else:
                source, cohort.cache, cohort.pooled = cohort.cache, None, True
            # positions written so far (at most one more, not written yet: harmless), within both caches
            filled = min(cohort.lmax + cohort.step, positions, source[0][0].shape[2])
            for old, new in zip(source, pool):
                for old_part, new_part in zip(old, new):
                    new_part[take, :, :filled] = old_part[:, :, :filled]
            first = take.stop
        self.pool, self._pooled = pool, list(cohorts)

    def _pooled_forward(self, cohorts, inputs):
        """hidden states [N, 1, h] of every cohort's rows from one forward over the pool (self.cohorts' order)."""
        self._arrange(cohorts)
        starts = [start for _, _, (_, start, _) in inputs]
        width = max(starts) + 1
        dev = self.model.device
        mask = torch.zeros(sum(cohort.slots for cohort in cohorts), 1, 1, width, dtype=torch.bool, device=dev)
        first = 0
        for cohort, (_, _, (_, start, row_mask)) in zip(cohorts, inputs):
            mask[first:first + cohort.slots, :, :, :start + 1] = row_mask
            first += cohort.slots
        if len(set(starts)) == 1:  # every row writes the same slot: an int start (an unmasked step when no padding)
            start = starts[0]
        else:
            start = torch.cat([torch.full((cohort.slots,), s, dtype=torch.long, device=dev)
                               for cohort, s in zip(cohorts, starts)])
        ids = torch.cat([ids for ids, _, _ in inputs])
        pos = torch.cat([pos for _, pos, _ in inputs])
        return self.model.hidden_states(ids, pos, self.pool, start, mask)

    def _forward(self, cohorts):
        """The next logits of every cohort from one forward over all their slots."""
        model = self.model
        inputs = [cohort.decode_inputs() for cohort in cohorts]
        if self._pooling:
            logits = model.logits(self._pooled_forward(cohorts, inputs)[:, 0])
            for cohort, part in zip(cohorts, torch.split(logits, [cohort.slots for cohort in cohorts])):
                cohort.logits = part
            return
        if any(cohort.model is not model for cohort in cohorts):  # cohorts with their own decoders (admit's model)
            for cohort, (ids, pos, group) in zip(cohorts, inputs):
                cohort.logits = cohort.model.logits(cohort.model.hidden_states(ids, pos, *group)[:, 0])
            return
        if len(inputs) == 1 or not callable(getattr(model, "hidden_states_grouped", None)):
            # one cohort, or a decoder without the grouped forward: a forward per cohort
            hidden = torch.cat([model.hidden_states(ids, pos, *group) for ids, pos, group in inputs])
        else:
            ids = torch.cat([ids for ids, _, _ in inputs])
            pos = torch.cat([pos for _, pos, _ in inputs])
            hidden = model.hidden_states_grouped(ids, pos, [group for _, _, group in inputs])
        logits = model.logits(hidden[:, 0])
        for cohort, part in zip(cohorts, torch.split(logits, [cohort.slots for cohort in cohorts])):
            cohort.logits = part


# A joint prefill pads every prompt of its group to the longest on the left: a group takes cohorts while its padded
# positions stay within PREFILL_PADDING x their own and its rows x columns within PREFILL_TOKENS (one request alone
# may be larger).
PREFILL_PADDING = 1.25
PREFILL_TOKENS = 4096


def _prefill_groups(cohorts):
    """Consecutive runs of cohorts (arrival order) that grouped_prefill may run in one forward."""
    groups, group = [], []
    for cohort in cohorts:
        trial = group + [cohort]
        width = max(c.lmax for c in trial)
        padded = sum(c.bsz for c in trial) * width
        if group and (padded > PREFILL_PADDING * sum(c.bsz * c.lmax for c in trial) or padded > PREFILL_TOKENS):
            groups.append(group)
            trial = [cohort]
        group = trial
    return groups + ([group] if group else [])


def grouped_prefill(model, cohorts):
    """Prefill cohorts (made with prefill=False) in one forward of model.hidden_states_grouped: each cohort's prompts
    are padded on the left to the group's longest L (pad columns: pad ids at position 0, attended by no real query)
    and fill a cache of their own; a shorter cohort's cache is then moved back by its padding (model.move_cache),
    so every cohort continues exactly as if prefilled alone."""
    width = max(cohort.lmax for cohort in cohorts)
    ids, pos, groups, tasks, caches, valid = [], [], [], [], [], []
    skips = getattr(model, "SKIPS_PADDING", False)
    for cohort in cohorts:
        c_ids, c_pos, c_mask, prompt = cohort.prefill_inputs()
        pad, bsz, dev = width - cohort.lmax, cohort.bsz, c_ids.device
        if pad:
            c_ids, c_pos = F.pad(c_ids, (pad, 0)), F.pad(c_pos, (pad, 0))
            mask = torch.eye(width, dtype=torch.bool, device=dev).expand(bsz, 1, width, width).clone()
            mask[:, :, pad:, pad:] = c_mask
            c_mask = mask
        cache = model.new_cache(bsz, max(cohort.capacity, width))
        ids.append(c_ids), pos.append(c_pos), caches.append(cache), groups.append((cache, 0, c_mask))
        tasks.append(prompt.get("prompt_tasks", torch.full((bsz,), -1, dtype=torch.long, device=dev)))
        if skips:  # the group's pads (the cohort's own and the group's left padding) computed as nothing
            c_valid = prompt.get("valid", torch.ones(bsz, cohort.lmax, dtype=torch.bool, device=dev))
            valid.append(F.pad(c_valid, (pad, 0), value=False))
    prompt = {"prompt_tasks": torch.cat(tasks)} if any(bool((t >= 0).any()) for t in tasks) else {}
    if skips:
        prompt["valid"] = torch.cat(valid)
    hidden = model.hidden_states_grouped(torch.cat(ids), torch.cat(pos), groups, **prompt)[:, -1]
    for cohort, last, cache in zip(cohorts, torch.split(hidden, [c.bsz for c in cohorts]), caches):
        pad = width - cohort.lmax
        if pad:
            cache = model.move_cache(cache, pad, cohort.lmax, cohort.capacity)
        cohort.finish_prefill(last, cache)


class _Decoding:
    """The state of one generate() call (an Engine's cohort): prefilled when made, then advance() chooses a step's
    tokens from `logits`, decode_inputs() gives the forward that makes the next `logits`, result() the output.

    Row b owns W_b consecutive slots (decoder batch rows): one for a greedy / sampling row,
    beam_width for a beam row. Slots never change rows; beam search only permutes the slots
    inside a row (cache, history and penalties follow the permutation).
    """

    def __init__(self, model, batch, stream, prefill=True):
        """prefill=False: the prompts are not run yet; prefill_inputs() then finish_prefill() (Engine.joint_prefill)
        do it, possibly in one forward with other cohorts."""
        self.model, self.stream = model, stream
        self.step, self.output, self.error = 0, None, None
        self.cache = self.logits = None  # the prefill's
        # pooled: the cache lives in an Engine's pool (self.cache None), which applies beam reorders (cache_order)
        self.pooled, self.cache_order = False, None
        dev = self.dev = model.device
        ids, lengths, new = batch.input_ids, batch.input_lengths, batch.max_new_tokens
        self.lengths, self.end = lengths, batch.end_id
        lmax = self.lmax = int(lengths.max())
        self.ids = ids = ids[:, :lmax]  # columns past every row's length are padding only
        bsz = self.bsz = ids.shape[0]
        self.steps = int(new.max())
        self.want_log_probs = batch.is_return_log_probs

        width = self.width = batch.beam_width                             # [B]
        base = torch.cumsum(width, 0) - width                             # first slot per row
        self.slot_row = torch.repeat_interleave(torch.arange(bsz), width)  # [N]
        self.slots = int(width.sum())
        self.row_d = row_d = self.slot_row.to(dev)
        self._prefill_state(batch, row_d)
        self._init_single(batch, base)
        self._init_beams(batch, base)
        if prefill:
            self.prefill_alone()

    def prefill_alone(self):
        """Run the prompts in a forward of their own (the cohort's cache: `capacity` positions)."""
        ids, pos, mask, prompt = self.prefill_inputs()
        cache = self.model.new_cache(self.bsz, self.capacity)
        self.finish_prefill(self.model.hidden_states(ids, pos, cache, 0, mask, **prompt)[:, -1], cache)

    def prefill_inputs(self):
        """(ids [B, Lmax], pos [B, Lmax], mask [B, 1, Lmax, Lmax], keywords) of the prefill forward, which writes
        cache positions 0 .. Lmax-1; keywords: "prompt_tasks" [B] (rows with a prompt-learning task) and, for a
        model.SKIPS_PADDING model and padded rows, "valid" [B, Lmax] (the real tokens)."""
        return self._prefill_ids, self._prefill_pos, self._prefill_mask, self._prefill_prompt

    def finish_prefill(self, last_hidden, cache):
        """Take the prefill's final hidden states at the last column [B, h] and its cache (positions 0 .. Lmax-1
        filled, `capacity` positions): the first logits, every slot's cache."""
        model, row_d = self.model, self.row_d
        self.logits = model.logits(last_hidden)                           # [B, V]
        if self.slots != self.bsz:
            cache = model.reorder_cache(cache, row_d)
            self.logits = self.logits[row_d]                              # [N, V]
        self.cache = cache
        self._prefill_ids = self._prefill_pos = self._prefill_mask = self._prefill_prompt = None

    def _prefill_state(self, batch, row_d):
        """The prefill's inputs (prefill_inputs); the per-slot history, masks and penalties."""
        model, dev, lmax, bsz, slots = self.model, self.dev, self.lmax, self.bsz, self.slots
        ids, lengths = self.ids, self.lengths
        total = lmax + self.steps
        # Left-align: row b's real tokens occupy columns offset_b .. Lmax-1.
        offset = lmax - lengths                                           # [B]
        col = torch.arange(lmax)
        src = (col[None, :] - offset[:, None]).clamp(min=0)               # [B, Lmax]
        left_ids = ids.gather(1, src)
        valid = col[None, :] >= offset[:, None]                           # [B, Lmax]
        # Token history per slot [N, Lmax + steps], left-aligned, -1 = no token (never
        # matches a word): bad / stop words look at its tail, outputs come from it.
        self.hist = torch.full((slots, total), -1, dtype=torch.long, device=dev)
        self.hist[:, :lmax] = torch.where(valid, left_ids, -1).to(dev)[row_d]
        self.gen_lp = torch.zeros(slots, max(self.steps, 1), dtype=torch.float32, device=dev)

        # Prefill the B prompts once, then copy the cache to every slot of the row.
        key_valid = torch.ones(bsz, total, dtype=torch.bool, device=dev)
        key_valid[:, :lmax] = valid.to(dev)
        # Prefill mask [B, 1, Lmax, Lmax]: causal and no pad keys; a pad query may see
        # itself so no softmax row is empty (its output is never used).
        causal = torch.ones(lmax, lmax, dtype=torch.bool, device=dev).tril()
        eye = torch.eye(lmax, dtype=torch.bool, device=dev)
        mask = ((causal[None] & key_valid[:, None, :lmax]) | eye[None])[:, None]
        self.total = total
        self.capacity = self._capacity(lmax + 1)  # cache positions (the cache's layout is the model's)
        # position id = index inside the real prompt (pads get 0, never attended); virtual prompt tokens are
        # ordinary positions, as in FT
        tasks = batch.prompt_task_id
        self._prefill_prompt = {} if tasks is None or not bool((tasks >= 0).any()) else {"prompt_tasks": tasks.to(dev)}
        if getattr(model, "SKIPS_PADDING", False) and not bool(valid.all()):  # the pads are computed as nothing
            self._prefill_prompt["valid"] = valid.to(dev)
        self._prefill_ids, self._prefill_pos, self._prefill_mask = left_ids.to(dev), src.to(dev), mask
        self.key_valid = key_valid[row_d]                                 # [N, total]
        self.slot_lengths = lengths.to(dev)[row_d]

        # Per-slot logit processing.
        self.rep = batch.repetition_penalty.to(dev)[row_d]
        self.temp = batch.temperature.to(dev)[row_d]
        self.scaled = bool((batch.temperature != 1.0).any())  # (dividing by 1 is a pass over [N, V] for nothing)
        self.seen = None
        if bool((batch.repetition_penalty != 1.0).any()):  # [N, V] tokens in the sequence
            seen = torch.zeros(bsz, model.vocab_size, dtype=torch.bool, device=dev)
            rows, cols = (valid & (left_ids < model.vocab_size)).nonzero(as_tuple=True)  # not virtual prompt ids
            seen[rows.to(dev), left_ids[rows, cols].to(dev)] = True
            self.seen = seen[row_d]
        self.bad = _word_table(batch.bad_words_list, row_d, dev)
        self.stop = _word_table(batch.stop_words_list, row_d, dev)

    def _init_single(self, batch, base):
        """Greedy / sampling rows: one slot each."""
        dev, width, new = self.dev, self.width, batch.max_new_tokens
        single = (width == 1).nonzero().reshape(-1)
        self.single_rows = single
        self.single_slots = base[single].to(dev)
        # every slot a single row, in order (no beams): the step reads the logits as they are, no gathered copy
        self.all_single = single.numel() == self.slots
        self.single_end = self.end[single].to(dev)
        self.single_ends = batch.end_ids[single].to(dev)                  # [S, E], -1 = none
        self.single_new = new[single].to(dev)
        self.count = torch.zeros(single.numel(), dtype=torch.long, device=dev)
        self.done = torch.zeros(single.numel(), dtype=torch.bool, device=dev)
        top_k, top_p = batch.top_k[single], batch.top_p[single]
        greedy = ((top_k <= 1) & (top_p <= 0)) | (top_k == 1)
        sample = (~greedy).nonzero().reshape(-1)
        self.sample = sample.to(dev)                        # indices into the single rows
        self.sample_top_k = top_k[sample].to(dev)
        self.top_p_initial = top_p[sample].to(dev)
        self.top_p = self.top_p_initial.clone()             # decays per step (FT top_p_decay)
        self.top_p_decay = batch.top_p_decay[single][sample].to(dev)
        self.top_p_min = batch.top_p_min[single][sample].to(dev)
        self.top_p_reset = batch.top_p_reset_ids[single][sample].to(dev)
        self.decays = bool((self.top_p_decay != 1.0).any()) or bool((self.top_p_reset >= 0).any())
        # Per-row uniforms for every step, drawn up front from the row's own generator
        # (numpy PCG64: its stream is sequential, so the first n draws never depend on how
        # many are drawn, i.e. on the other rows' lengths; identical on CPU and CUDA).
        seeds = [batch.random_seed[int(single[i])] for i in sample]
        self.uniforms = torch.from_numpy(np.stack([
            np.random.Generator(np.random.PCG64(s % (1 << 64))).random(max(self.steps, 1))
            for s in seeds]) if seeds else np.zeros((0, 1))).to(dev)  # [R, steps] f64

    def _init_beams(self, batch, base):
        """Beam rows: slots base .. base + W - 1, padded to the widest beam row."""
        dev, width, new, slots = self.dev, self.width, batch.max_new_tokens, self.slots
        beam = (width > 1).nonzero().reshape(-1)
        self.beam_rows = beam
        wide = int(width[beam].max()) if beam.numel() else 1
        self.beam_width = width[beam].to(dev)                                # [Rb]
        lane = torch.arange(wide)
        self.beam_ok = (lane[None, :] < width[beam][:, None]).to(dev)        # [Rb, Wm]
        self.beam_slots = (base[beam][:, None]
                           + torch.minimum(lane[None, :], width[beam][:, None] - 1)).to(dev)
        self.beam_ends = batch.end_ids[beam].to(dev)                       # [Rb, E], -1 = none
        self.beam_new = new[beam].to(dev)
        self.len_penalty = batch.len_penalty[beam].to(dev)
        self.diversity = batch.beam_search_diversity_rate[beam].to(dev)
        # Running scores per slot: only the first beam is live at the start (HF: -1e9).
        self.beam_cum = torch.zeros(slots, dtype=torch.float32, device=dev)
        if beam.numel():
            self.beam_cum[self.beam_slots[:, 1:].reshape(-1)] = -1e9
        # Finished hypotheses per beam row, best first: normalised score (-inf = empty),
        # generated tokens, their log-probs, generated length.
        steps = max(self.steps, 1)
        self.hyp_score = torch.full((beam.numel(), wide), float("-inf"), device=dev)
        self.hyp_tokens = torch.full((beam.numel(), wide, steps), -1, dtype=torch.long,
                                     device=dev)
        self.hyp_lp = torch.zeros(beam.numel(), wide, steps, device=dev)
        self.hyp_len = torch.zeros(beam.numel(), wide, dtype=torch.long, device=dev)
        self.beam_done = torch.zeros(beam.numel(), dtype=torch.bool, device=dev)

    # ---------------------------------------------------------------- one step
    def _tail(self, cur, k, slots=None):
        """The last k tokens [N|len(slots), k] before column `cur` (-1 before the sequence)."""
        hist = self.hist if slots is None else self.hist[slots]
        part = hist[:, max(0, cur - k):cur]
        if part.shape[1] < k:
            part = torch.cat([part.new_full((part.shape[0], k - part.shape[1]), -1), part], 1)
        return part

    def _process(self, logits, step):
        """Logits [N, V] -> log-probs [N, V]: repetition penalty, temperature, bad words."""
        if self.seen is not None:
            rep = self.rep[:, None]
            logits = torch.where(self.seen, torch.where(logits > 0, logits / rep, logits * rep),
                                 logits)
        if self.scaled:
            logits = logits / self.temp[:, None]
        if self.bad is not None:
            tokens, valid = self.bad                                          # [N, n, K]
            prefix = self._tail(self.lmax + step, tokens.shape[-1] - 1)       # [N, K-1]
            match = ((prefix[:, None, :] == tokens[..., :-1]) | ~valid[..., :-1]).all(-1)
            slot, word = (match & valid[..., -1]).nonzero(as_tuple=True)
            logits = logits.index_put((slot, tokens[slot, word, -1]),
                                      torch.tensor(float("-inf"), device=logits.device))
        return logits, torch.log_softmax(logits, dim=-1)

    def _stops(self, slots, token, step):
        """[M] bool: the sequence of slot `slots` followed by `token` ends with a stop word."""
        tokens, valid = self.stop
        tail = torch.cat([self._tail(self.lmax + step, tokens.shape[-1] - 1, slots),
                          token[:, None]], 1)                                   # [M, K]
        match = ((tail[:, None, :] == tokens[slots]) | ~valid[slots]).all(-1)
        return (match & valid[slots][..., -1]).any(-1)

    def _choose_single(self, logits, logprobs, step):
        """Greedy / sampled token and its log-prob for each single row."""
        slots = self.single_slots
        rows_logits = logits if self.all_single else logits[slots]
        token = rows_logits.argmax(dim=-1)
        if self.sample.numel():
            token[self.sample] = _sample(rows_logits[self.sample], self.sample_top_k,
                                         self.top_p, self.uniforms[:, step])
            if self.decays:  # FT: reset to the initial top_p on the reset id, else decay
                chosen = token[self.sample]
                decayed = torch.where(chosen == self.top_p_reset, self.top_p_initial,
                                      torch.maximum(self.top_p * self.top_p_decay, self.top_p_min))
                # Rows without a nucleus (top_p 0: top-k only) keep it off.
                self.top_p = torch.where(self.top_p_initial > 0, decayed, self.top_p)
        logprob = logprobs[slots, token]
        stop = (token[:, None] == self.single_ends).any(-1)
        if self.stop is not None:
            stop |= self._stops(slots, token, step)
        active = ~self.done
        self.count += active.long()
        self.done |= active & (stop | (self.count >= self.single_new))
        return torch.where(active, token, self.single_end), torch.where(active, logprob, 0.0)

    def _choose_beams(self, logprobs, step):
        """One beam-search step for every beam row -> per (row, lane): parent slot, token,
        running score, log-prob of the token (lanes past a row's width are ignored)."""
        slots, width = self.beam_slots, self.beam_width                   # [Rb, Wm], [Rb]
        rows, wide = slots.shape
        cands = 2 * wide
        # Each live beam's 2W best tokens; score = running cum_log_prob + log-prob.
        lp, token = logprobs[slots].topk(cands, dim=-1)                   # [Rb, Wm, C]
        score = self.beam_cum[slots][..., None] + lp
        rank = torch.arange(cands, device=self.dev)
        key = score + self.diversity[:, None, None] * rank                # diversity ranking
        key = key.masked_fill(~self.beam_ok[..., None] | (rank >= 2 * width[:, None, None]),
                              float("-inf"))
        key, flat = key.reshape(rows, -1).topk(cands, dim=-1)             # [Rb, C] ranked
        parent = slots.gather(1, flat // cands)
        token = token.reshape(rows, -1).gather(1, flat)
        score = score.reshape(rows, -1).gather(1, flat)
        lp = lp.reshape(rows, -1).gather(1, flat)
        real = rank[None, :] < 2 * width[:, None]                          # [Rb, C]
        last = step + 1 >= self.beam_new                                  # [Rb]
        finished = (token[..., None] == self.beam_ends[:, None, :]).any(-1) | last[:, None]
        if self.stop is not None:
            finished |= self._stops(parent.reshape(-1), token.reshape(-1), step).view(rows, -1)
        # Finished candidates among the first W become hypotheses (rows still open only).
        enter = finished & real & (rank[None, :] < width[:, None]) & ~self.beam_done[:, None]
        if bool(enter.any()):
            self._add_hypotheses(enter, parent, token, score, lp, step)
        # Next beams: the first W unfinished candidates (finished ones sink by 1e9, as HF).
        sink = finished.float() * 1e9
        pick = torch.where(real, key - sink, float("-inf")).topk(wide, dim=-1).indices
        full = (self.hyp_score > float("-inf")).sum(dim=1) >= width
        self.beam_done |= full | last
        return (parent.gather(1, pick), token.gather(1, pick),
                (score - sink).gather(1, pick), lp.gather(1, pick))

    def _add_hypotheses(self, enter, parent, token, score, lp, step):
        """Merge the entering candidates [Rb, C] into each row's W best hypotheses."""
        generated = step + 1  # the final token counts (HF: cur_len + 1 - prompt_len)
        norm = score / torch.pow(torch.tensor(float(generated), device=self.dev),
                                 self.len_penalty)[:, None]
        norm = torch.where(enter, norm, float("-inf"))
        lmax = self.lmax
        tokens = self.hist[parent, lmax:lmax + self.hyp_tokens.shape[-1]].clone()  # [Rb, C, S]
        tokens[..., step] = token
        logprobs = self.gen_lp[parent].clone()
        logprobs[..., step] = lp
        wide = self.hyp_score.shape[1]
        merged = torch.cat([self.hyp_score, norm], dim=1)
        keep = merged.topk(wide, dim=1).indices                           # best first
        score = merged.gather(1, keep)
        self.hyp_score = score.masked_fill(~self.beam_ok, float("-inf"))
        idx = keep[..., None].expand(-1, -1, tokens.shape[-1])
        self.hyp_tokens = torch.cat([self.hyp_tokens, tokens], 1).gather(1, idx)
        self.hyp_lp = torch.cat([self.hyp_lp, logprobs], 1).gather(1, idx)
        lengths = torch.cat([self.hyp_len, torch.full_like(norm, generated, dtype=torch.long)], 1)
        self.hyp_len = lengths.gather(1, keep)

    def _all_done(self):
        return bool(self.done.all()) and bool(self.beam_done.all())

    def _capacity(self, needed):
        """Cache positions to hold `needed`: whole CACHE_BLOCKs, at most prompt + max_new_tokens; all of them at
        once for a decoder without grow_cache (e.g. ft_t5's)."""
        if not callable(getattr(self.model, "grow_cache", None)):
            return self.total
        return min(self.total, -(-needed // CACHE_BLOCK) * CACHE_BLOCK)

    def run(self):
        while self.advance():
            ids, pos, group = self.decode_inputs()
            hidden = self.model.hidden_states(ids, pos, *group)
            self.logits = self.model.logits(hidden[:, 0])
        return self.result()

    def result(self):
        """The complete output (T = Lmax + max(max_new_tokens))."""
        return self._output(self.steps)

    def release(self):
        """Free the cache and logits (the cohort left its engine)."""
        self.cache = self.logits = None

    def decode_inputs(self):
        """(ids [N, 1], pos [N, 1], (cache, start, mask)) of the forward after advance(), the cache grown to hold
        the step's token: cache slot lmax+step, position length+step.

        (learned positions never pass max_positions: such requests are refused up front;
        rotary positions run on past the context length, as in transformers)
        """
        step = self.step - 1
        start = self.lmax + step
        if self.capacity <= start:
            self.capacity = self._capacity(start + 1)
            if not self.pooled:  # (a pool grows to its longest cohort's capacity: Engine._arrange)
                self.cache = self.model.grow_cache(self.cache, self.capacity)
        pos = (self.slot_lengths + step)[:, None]
        mask = self.key_valid[:, None, None, :start + 1]
        return self.token[:, None], pos, (self.cache, start, mask)

    def advance(self):
        """Choose every slot's token of the next step from `logits` (streamed); False once the decoding is over."""
        dev, model, slots, step = self.dev, self.model, self.slots, self.step
        every = torch.arange(slots, device=dev)
        logits = self.logits
        logits, logprobs = self._process(logits, step)
        token = torch.empty(slots, dtype=torch.long, device=dev)
        logprob = torch.empty(slots, dtype=torch.float32, device=dev)
        if self.single_slots.numel():
            token[self.single_slots], logprob[self.single_slots] = self._choose_single(
                logits, logprobs, step)
        if self.beam_rows.numel():
            parent, beam_token, cum, beam_lp = self._choose_beams(logprobs, step)
            lanes = self.beam_slots[self.beam_ok]
            order = every.clone()
            order[lanes] = parent[self.beam_ok]
            token[lanes], logprob[lanes] = beam_token[self.beam_ok], beam_lp[self.beam_ok]
            self.beam_cum[lanes] = cum[self.beam_ok]
            if not torch.equal(order, every):  # slots follow their parents
                self.hist, self.gen_lp = self.hist[order], self.gen_lp[order]
                if self.seen is not None:
                    self.seen = self.seen[order]
                if self.pooled:
                    self.cache_order = order
                else:
                    self.cache = model.reorder_cache(self.cache, order)
        self.hist[:, self.lmax + step] = token
        self.gen_lp[:, step] = logprob
        self.step = step + 1
        if self.stream is not None:
            self.stream(self._output(step + 1))
        if step + 1 == self.steps or self._all_done():
            return False
        if self.seen is not None:
            self.seen[every, token] = True
        self.token = token
        return True

    # ---------------------------------------------------------------- outputs
    def _output(self, steps):
        """GenerationOutput with T = Lmax + steps: single rows and finished beam rows as they
        are, open beam rows as their live beams."""
        bsz, lmax = self.bsz, self.lmax
        wide = max(1, int(self.width.max()))
        gen = torch.full((bsz, wide, steps), -1, dtype=torch.long)
        gen_len = torch.zeros(bsz, wide, dtype=torch.long)
        gen_lp = torch.zeros(bsz, wide, steps, dtype=torch.float32)
        hist = self.hist[:, lmax:lmax + steps].cpu()
        lp = self.gen_lp[:, :steps].cpu()
        if self.single_rows.numel():
            slots = self.single_slots.cpu()
            gen[self.single_rows, 0] = hist[slots]
            gen_len[self.single_rows, 0] = self.count.cpu()
            gen_lp[self.single_rows, 0] = lp[slots]
        if self.beam_rows.numel():
            slots, ok = self.beam_slots.cpu(), self.beam_ok.cpu()
            final = self.beam_done.cpu()[:, None, None]
            rows_wide = slots.shape[1]
            tokens = torch.where(final, self.hyp_tokens[..., :steps].cpu(), hist[slots])
            logprobs = torch.where(final, self.hyp_lp[..., :steps].cpu(), lp[slots])
            lengths = torch.where(final[..., 0], self.hyp_len.cpu(), steps) * ok
            gen[self.beam_rows, :rows_wide] = tokens
            gen_lp[self.beam_rows, :rows_wide] = logprobs
            gen_len[self.beam_rows, :rows_wide] = lengths
        inside = torch.arange(steps)[None, None, :] < gen_len[..., None]
        end = self.end[:, None, None]
        gen_lp = torch.where(inside & self.want_log_probs[:, None, None], gen_lp, 0.0)
        lane_ok = torch.arange(wide)[None, :] < self.width[:, None]         # [B, W]
        # [B, W, T] = prompt | generated | end_id padding (all end_id for padding lanes).
        col = torch.arange(lmax)
        prompt = torch.where(col[None, :] < self.lengths[:, None], self.ids, self.end[:, None])
        out = end.expand(bsz, wide, lmax + steps).clone()
        out[:, :, :lmax] = torch.where(lane_ok[..., None], prompt[:, None, :], end)
        position = self.lengths[:, None, None] + torch.arange(steps)[None, None, :]
        out.scatter_(2, position.expand(bsz, wide, steps), torch.where(inside, gen, end))
        return GenerationOutput(
            output_ids=out,
            sequence_length=torch.where(lane_ok, self.lengths[:, None] + gen_len, 0),
            cum_log_probs=gen_lp.sum(dim=-1),
            output_log_probs=gen_lp)


def _word_table(rows, slot_row, device):
    """Per-row word lists -> (tokens, valid) [N, words, K] per slot, words right-aligned
    (a word's last token in column K-1), or None when no row has a word."""
    count = max(len(words) for words in rows)
    if count == 0:
        return None
    longest = max(len(word) for words in rows for word in words)
    tokens = torch.zeros(len(rows), count, longest, dtype=torch.long)
    valid = torch.zeros(len(rows), count, longest, dtype=torch.bool)
    for row, words in enumerate(rows):
        for index, word in enumerate(words):
            tokens[row, index, longest - len(word):] = torch.tensor(word, dtype=torch.long)
            valid[row, index, longest - len(word):] = True
    return tokens.to(device)[slot_row], valid.to(device)[slot_row]


def _word_lists(value, batch, vocab, name):
    """FT word list [B|1, 2, L] / [2, L], or check_inputs' list of B tuples of words ->
    list of B tuples of words (tuples of token ids)."""
    if value is None:
        return [()] * batch
    if isinstance(value, list) and all(isinstance(row, tuple) for row in value):
        if len(value) != batch:
            raise ValueError(f"{name} has {len(value)} rows for a batch of {batch}")
        rows = [tuple(tuple(int(t) for t in word) for word in words) for words in value]
        for row, words in enumerate(rows):
            _check_words(words, vocab, f"{name} row {row}")
        return rows
    array = value.detach().cpu().numpy() if torch.is_tensor(value) else np.asarray(value)
    if array.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integer token ids and offsets, got dtype {array.dtype}")
    array = array.astype(np.int64)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[1] != 2:
        raise ValueError(f"{name} must be [batch, 2, length] (FT word list: ids, offsets), "
                         f"got shape {list(array.shape)}")
    if array.shape[0] not in (1, batch):
        raise ValueError(f"{name} has {array.shape[0]} rows for a batch of {batch}")
    rows = []
    for row, (ids, offsets) in enumerate(array):
        where = f"{name} row {row}"
        used = int(np.argmax(offsets < 0)) if (offsets < 0).any() else offsets.size
        ends = offsets[:used]
        if (offsets[used:] != -1).any():
            raise ValueError(f"{where}: offsets must be increasing ends padded with -1, "
                             f"got {offsets.tolist()}")
        starts = np.concatenate([[0], ends[:-1]])
        if used and ((ends <= starts).any() or ends[-1] > ids.size):
            raise ValueError(f"{where}: offsets {ends.tolist()} must be strictly increasing "
                             f"word ends within the {ids.size} ids")
        words = tuple(tuple(ids[s:e].tolist()) for s, e in zip(starts, ends))
        _check_words(words, vocab, where)
        rows.append(words)
    return rows * batch if len(rows) == 1 else rows


def _check_words(words, vocab, where):
    for word in words:
        if not word:
            raise ValueError(f"{where}: empty word")
        outside = [t for t in word if not 0 <= t < vocab]
        if outside:
            raise ValueError(f"{where}: token ids {outside[:5]} outside [0, {vocab})")


def check_inputs(model, input_ids, input_lengths, max_new_tokens, params=None, max_beam_width=MAX_BEAM_WIDTH,
                 defaults=None):
    """One request (prompts + SamplingParams) -> a Batch of per-row CPU values; ValueError naming the bad input.

    input_ids [B, L] right-padded, input_lengths [B], max_new_tokens [B] (each a sequence, array or tensor);
    params None = every option's default. Defaults and simple bounds come from ft_interface's table, overridden by
    the model's GenerationDefaults (`defaults`, None = none) for the options it sets and the eos ids.
    Checks: beam_width in [1, max_beam_width], top_p in [0, 1], top_p_decay in (0, 1],
    top_p_min in (0, 1], temperature / repetition_penalty > 0, word lists shaped
    [B|1, 2, L] with increasing offsets and ids inside the vocabulary, lengths in range.
    """
    params = SamplingParams() if params is None else params
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
    vocab = model.vocab_size
    lengths = _per_row(input_lengths, bsz, 0, torch.long, "input_lengths")
    new = _per_row(max_new_tokens, bsz, 0, torch.long, "max_new_tokens")
    defaults = GenerationDefaults() if defaults is None else defaults
    model_defaults = defaults.option_defaults()
    rows = {}  # field -> [B] tensor, for every per-row scalar option but random_seed
    for spec in ft_interface.SAMPLING_INPUTS:
        if spec.scalar and spec.field != "random_seed":
            default = model.end_id if spec.default is None else spec.default  # start_id, end_id: config.ini's
            rows[spec.field] = _per_row(getattr(params, spec.field), bsz, model_defaults.get(spec.field, default),
                                        _TORCH_DTYPES[spec.triton_dtype], spec.field)
    end, start, width, reset = rows["end_id"], rows["start_id"], rows["beam_width"], rows["top_p_reset_ids"]
    # [B, E]: the ids that end each row: the request's end_id alone, else config.ini's end_id and the model's eos ids.
    eos = [model.end_id] + [i for i in defaults.eos_token_ids if i != model.end_id]
    if params.end_id is None:
        end_ids = torch.tensor([eos] * bsz, dtype=torch.long)
    else:
        end_ids = torch.nn.functional.pad(end[:, None], (0, len(eos) - 1), value=-1)
    seeds = [ft_interface.BY_FIELD["random_seed"].default] * bsz
    random_seed = params.random_seed
    if random_seed is not None:
        # Keep seeds as exact python ints: a numpy array built from a list mixing values
        # above 2^63 with small ones would silently become float64.
        if torch.is_tensor(random_seed) or isinstance(random_seed, np.ndarray):
            flat = random_seed.reshape(-1).tolist()
        elif isinstance(random_seed, list) and all(isinstance(s, int) for s in random_seed):
            flat = random_seed
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
    if bool((end < 0).any()) or bool((end >= vocab).any()):
        problems.append(f"end_id must be in [0, {vocab}), got {end.tolist()}")
    if bool((start < 0).any()) or bool((start >= vocab).any()):
        problems.append(f"start_id must be in [0, {vocab}), got {start.tolist()}")
    real = torch.arange(lmax)[None, :] < lengths[:, None]
    tasks = rows["prompt_task_id"]
    tasks[tasks == 2**32 - 1] = -1  # UINT32 -1 on the wire
    virtual = real & (ids >= vocab) & (tasks[:, None] >= 0)
    problems += _prompt_problems(model, ids, virtual, tasks)
    if bool(((ids < 0) | (ids >= vocab))[real & ~virtual].any()):
        problems.append(f"input_ids contain token ids outside [0, {vocab})"
                        + (" (virtual prompt ids need the row's prompt_learning_task_name_ids)"
                           if getattr(model, "prompt_lengths", ()) else ""))
    # The table's bounds and the model-dependent ones, in this order (a message lists every problem in it).
    problems += _outside_bounds(rows, ("top_k", "top_p", "top_p_decay", "top_p_min"))
    if bool(((reset < -1) | (reset >= vocab)).any()):
        problems.append(f"top_p_reset_ids must be -1 (none) or in [0, {vocab}), "
                        f"got {reset.tolist()}")
    problems += _outside_bounds(rows, ("temperature", "repetition_penalty"))
    cap = min(int(max_beam_width), vocab // 2)  # 2W candidates per beam must exist
    if bool(((width < 1) | (width > cap)).any()):
        problems.append(f"beam_width must be in [1, {cap}] (max_beam_width), got {width.tolist()}")
    problems += _outside_bounds(rows, ("len_penalty", "beam_search_diversity_rate"))
    words = {}
    for spec in ft_interface.WORD_LIST_INPUTS:
        try:
            words[spec.field] = _word_lists(getattr(params, spec.field), bsz, vocab, spec.name)
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        raise ValueError("; ".join(problems))
    return Batch(input_ids=ids, input_lengths=lengths, max_new_tokens=new, end_ids=end_ids, random_seed=seeds, **rows,
                 **words)


def _prompt_problems(model, ids, virtual, tasks):
    """FT's p/prompt tuning rules: a row's task id names a task of the model, and its virtual ids
    (prompt_learning_start_id + j) stay inside that task's table. FT itself logs and returns invalid outputs for an
    unknown task, and reads past a table for an id beyond it; both are refused here."""
    lengths = getattr(model, "prompt_lengths", ())  # prompt_length of task 0, 1, ...
    named = tasks >= 0
    if not bool(named.any()):
        return []
    if not lengths:
        return [f"prompt_learning_task_name_ids {tasks.tolist()}: the model has no prompt-learning tasks "
                "(config.ini prompt_learning_type=0)"]
    unknown = named & (tasks >= len(lengths))
    if bool(unknown.any()):
        names = ", ".join(f"{i}={name}" for i, name in enumerate(model.prompt_task_names))
        return [f"prompt_learning_task_name_ids {tasks[unknown].tolist()} name no task of the model ({names})"]
    start = model.prompt_start_id
    limit = torch.tensor(lengths, dtype=torch.long)[tasks.clamp(min=0)]           # [B] each row's prompt_length
    if bool(((ids - start >= limit[:, None]) & virtual).any()) or bool(((ids < start) & (ids >= model.vocab_size)
                                                                         & virtual).any()):
        return [f"input_ids hold virtual prompt ids outside [{start}, {start} + prompt_length) of the row's task "
                f"(prompt lengths {list(lengths)})"]
    return []


def _outside_bounds(rows, names):
    """Messages for the options among `names` (fields) with a row outside its bounds in ft_interface's table."""
    problems = []
    for name in names:
        spec = ft_interface.BY_FIELD[name]
        problem = spec.bounds.problem(spec.name, rows[name])
        if problem is not None:
            problems.append(problem)
    return problems


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
