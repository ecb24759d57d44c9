"""Decoding options of the python runtime (templates/ft_python/ft_generate.py) against HF transformers.

The tiny seeded GPT-2 of conftest (real GPT-2 vocabulary) is converted to fp32 FT shards and run by
ft_gpt.FTGPT in process. References come from HF transformers: its generate() for greedy, beam search,
repetition penalty, temperature, bad words and stopping; its logits for the decaying nucleus, recomputed
step by step in this file from the documented sampling rule. Beam-search parity holds with
HF generate(num_beams=W, length_penalty=len_penalty, early_stopping=True, do_sample=False).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from exporter.ft.convert import convert_checkpoint  # noqa: E402
from exporter.parallel import ParallelLayout  # noqa: E402
from conftest import check_inputs, generate, right_padded  # noqa: E402
from templates.ft_python import ft_gpt  # noqa: E402

END = 50256
PROMPTS = [[464, 2068, 7586, 21831, 18045], [40], [1212, 318, 257, 1332, 286, 262, 6801], [15496, 11]]


def _padded(prompts, pad=END):
    return right_padded(prompts, pad)


def _word_list(rows):
    """FT's [B, 2, L] word-list format from per-row lists of words (ids + cumulative ends, -1 padded)."""
    flat = [[t for word in words for t in word] for words in rows]
    width = max(1, max(len(f) for f in flat), max(len(words) for words in rows))
    out = np.zeros((len(rows), 2, width), dtype=np.int32)
    out[:, 1, :] = -1
    for row, words in enumerate(rows):
        out[row, 0, : len(flat[row])] = flat[row]
        out[row, 1, : len(words)] = np.cumsum([len(w) for w in words])
    return out


@pytest.fixture(scope="module")
def model(tiny_gpt2, tmp_path_factory):
    shard_dir = convert_checkpoint(tiny_gpt2, tmp_path_factory.mktemp("ft_generate"), ParallelLayout(1), "fp32")
    return ft_gpt.FTGPT.from_shards(shard_dir, device="cpu")


def _hf(hf_model, prompt, new, **kwargs):
    with torch.no_grad():
        return hf_model.generate(torch.tensor([prompt]), max_new_tokens=new, pad_token_id=END,
                                 return_dict_in_generate=True, **{"eos_token_id": END, **kwargs})


def _hf_greedy_tokens(hf_model, prompt, new, **kwargs):
    out = _hf(hf_model, prompt, new, do_sample=False, **kwargs)
    return out.sequences[0, len(prompt):].tolist()


def _until(tokens, end):
    """FT keeps the end token; HF pads after it."""
    return tokens[: tokens.index(end) + 1] if end in tokens else tokens


def _row(out, row, beam=0):
    length = int(out.sequence_length[row, beam])
    return out.output_ids[row, beam, :length].tolist()


# ------------------------------------------------------------------------------------------- greedy family


def test_greedy_temperature_top_k1_and_repetition_penalty_match_hf(model, hf_model):
    ids, lengths = _padded(PROMPTS)
    new = [9, 14, 6, 11]
    temperature = [1.0, 0.7, 1.0, 1.6]
    top_k = [0, 1, 0, 1]
    penalty = [1.0, 1.0, 1.8, 1.3]
    out = generate(model, ids, lengths, new, top_k=top_k, temperature=temperature, repetition_penalty=penalty,
                   random_seed=[5, 6, 7, 8])
    for row, prompt in enumerate(PROMPTS):
        kwargs = {"repetition_penalty": penalty[row], "output_logits": True, "output_scores": True}
        if top_k[row] == 1:
            kwargs.update(do_sample=True, top_k=1, temperature=temperature[row])
        else:
            kwargs.update(do_sample=False)
        ref = _hf(hf_model, prompt, new[row], **kwargs)
        tokens = _until(ref.sequences[0, len(prompt):].tolist(), END)
        assert _row(out, row) == prompt + tokens
        # Reference log-prob: HF's processed scores (repetition penalty) / temperature, log-softmaxed.
        # With top_k=1 HF's scores are truncated, so take its raw logits and apply the penalty here.
        expected = []
        for step, token in enumerate(tokens):
            if top_k[row] == 1:
                logits = ref.logits[step][0].double()
                seen = torch.tensor(prompt + tokens[:step])
                picked = logits[seen]
                logits[seen] = torch.where(picked > 0, picked / penalty[row], picked * penalty[row])
            else:
                logits = ref.scores[step][0].double()
            expected.append(torch.log_softmax(logits / temperature[row], -1)[token].item())
        torch.testing.assert_close(out.output_log_probs[row, 0, : len(tokens)].double(),
                                   torch.tensor(expected, dtype=torch.float64), atol=1e-4, rtol=0)


def test_repetition_penalty_changes_the_output(model):
    """Guards the test above: the penalties in it are strong enough to change greedy tokens."""
    ids, lengths = _padded(PROMPTS[2:3])
    plain = generate(model, ids, lengths, [6])
    penalised = generate(model, ids, lengths, [6], repetition_penalty=1.8)
    assert plain.output_ids.tolist() != penalised.output_ids.tolist()


# ------------------------------------------------------------------------------------------- beam search


def _end_for(hf_model, prompt, step=2):
    """A token the greedy continuation produces at `step`: as end_id it makes hypotheses finish early,
    at different lengths, so the length penalty decides the ranking."""
    return _hf_greedy_tokens(hf_model, prompt, step + 1)[step]


@pytest.mark.parametrize("width, len_penalty", [(2, 0.0), (3, 1.0), (4, 2.0), (4, -0.5)])
def test_beam_search_matches_hf(model, hf_model, width, len_penalty):
    new = [8, 10, 7, 9]
    ends = [_end_for(hf_model, p) if row % 2 == 0 else END for row, p in enumerate(PROMPTS)]
    ids, lengths = _padded(PROMPTS)
    out = generate(model, ids, lengths, new, beam_width=width, len_penalty=len_penalty, end_id=ends)
    assert out.output_ids.shape == (len(PROMPTS), width, lengths.max() + max(new))
    assert out.cum_log_probs.shape == (len(PROMPTS), width)
    assert out.output_log_probs.shape == (len(PROMPTS), width, max(new))
    finished_early = 0
    for row, prompt in enumerate(PROMPTS):
        ref = _hf(hf_model, prompt, new[row], do_sample=False, num_beams=width, num_return_sequences=width,
                  length_penalty=len_penalty, early_stopping=True, eos_token_id=ends[row],
                  output_scores=True)
        steps = hf_model.compute_transition_scores(ref.sequences, ref.scores, ref.beam_indices,
                                                   normalize_logits=False)
        for beam in range(width):
            tokens = _until(ref.sequences[beam, len(prompt):].tolist(), ends[row])
            finished_early += len(tokens) < new[row]
            assert _row(out, row, beam) == prompt + tokens, (row, beam)
            assert set(out.output_ids[row, beam, len(prompt) + len(tokens):].tolist()) <= {ends[row]}
            ours = out.output_log_probs[row, beam]
            torch.testing.assert_close(ours[: len(tokens)], steps[beam, : len(tokens)].float(), atol=1e-4, rtol=0)
            assert torch.all(ours[len(tokens):] == 0)
            score = float(out.cum_log_probs[row, beam]) / len(tokens) ** len_penalty
            assert score == pytest.approx(float(ref.sequences_scores[beam]), abs=1e-4)
    assert finished_early >= 2  # hypotheses of different lengths were ranked


def test_beam_width_one_is_greedy_and_start_id_is_accepted(model):
    ids, lengths = _padded(PROMPTS)
    greedy = generate(model, ids, lengths, [7, 7, 7, 7])
    beam1 = generate(model, ids, lengths, [7, 7, 7, 7], beam_width=1, len_penalty=2.0, start_id=END)
    assert beam1.output_ids.tolist() == greedy.output_ids.tolist()
    torch.testing.assert_close(beam1.output_log_probs, greedy.output_log_probs)


def test_diversity_rate_makes_each_beam_follow_its_own_best_token(model, hf_model):
    """With a rate far below any log-prob gap, after the first step each beam is extended by its own best
    token: the beams are the W best first tokens, each continued greedily (computed with HF)."""
    prompt, width, new = PROMPTS[0], 3, 6
    out = generate(model, [prompt], [len(prompt)], [new], beam_width=width, beam_search_diversity_rate=-1e4)
    plain = generate(model, [prompt], [len(prompt)], [new], beam_width=width)
    with torch.no_grad():
        first = torch.log_softmax(hf_model(torch.tensor([prompt])).logits[0, -1], -1)
    expected = []
    for token in first.topk(width).indices.tolist():
        rest = _hf(hf_model, prompt + [token], new - 1, do_sample=False, output_logits=True)
        continuation = rest.sequences[0, len(prompt) + 1:].tolist()
        assert END not in continuation
        logprob = float(first[token]) + sum(torch.log_softmax(step[0], -1)[t].item()
                                            for step, t in zip(rest.logits, continuation))
        expected.append((logprob, prompt + [token] + continuation))
    expected.sort(reverse=True)
    for beam, (logprob, tokens) in enumerate(expected):
        assert _row(out, 0, beam) == tokens
        assert float(out.cum_log_probs[0, beam]) == pytest.approx(logprob, abs=1e-3)
    assert out.output_ids.tolist() != plain.output_ids.tolist()  # the rate changed the search here


# ------------------------------------------------------------------------------------------- word lists


def test_bad_words_match_hf_and_never_appear(model, hf_model):
    prompt, new = PROMPTS[2], 12
    free = _hf_greedy_tokens(hf_model, prompt, new)
    single, pair = [free[1]], free[3:5]  # greedy would produce both
    assert single[0] in free and any(free[i: i + 2] == pair for i in range(len(free) - 1))
    words = _word_list([[single, pair]])
    out = generate(model, [prompt], [len(prompt)], [new], bad_words_list=words)
    ref = _hf(hf_model, prompt, new, do_sample=False, bad_words_ids=[single, pair], output_scores=True)
    tokens = _until(ref.sequences[0, len(prompt):].tolist(), END)
    generated = _row(out, 0)[len(prompt):]
    assert generated == tokens
    assert single[0] not in generated and all(generated[i: i + 2] != pair for i in range(len(generated) - 1))
    expected = [torch.log_softmax(s[0], -1)[t].item() for s, t in zip(ref.scores, tokens)]
    torch.testing.assert_close(out.output_log_probs[0, 0, : len(tokens)], torch.tensor(expected), atol=1e-4, rtol=0)
    # Beam search and sampling never produce them either.
    for kwargs in ({"beam_width": 4}, {"top_k": 0, "top_p": 1.0, "random_seed": 3}):
        other = generate(model, [prompt], [len(prompt)], [new], bad_words_list=words, **kwargs)
        for beam in range(other.output_ids.shape[1]):
            generated = _row(other, 0, beam)[len(prompt):]
            assert single[0] not in generated
            assert all(generated[i: i + 2] != pair for i in range(len(generated) - 1))


def test_stop_words_end_generation_and_are_kept(model, hf_model):
    ids, lengths = _padded(PROMPTS)
    new = [12, 12, 12, 12]
    free = [_hf_greedy_tokens(hf_model, p, n) for p, n in zip(PROMPTS, new)]
    stops = [[[free[0][4]]], [free[1][5:7], [7]], [], [[free[3][2]], [free[3][1], 99]]]
    out = generate(model, ids, lengths, new, stop_words_list=_word_list(stops))
    for row, prompt in enumerate(PROMPTS):
        expected = free[row]
        ends = [i + len(w) for w in stops[row] for i in range(len(expected))
                if expected[i: i + len(w)] == list(w)]
        if ends:
            expected = expected[: min(ends)]
        assert _row(out, row) == prompt + expected
    assert [int(x) for x in out.sequence_length[:, 0] - torch.as_tensor(lengths)] != new  # some rows stopped


class _EndsWith(transformers.StoppingCriteria):
    """HF stopping criterion: the sequence ends with `word` (an independent stop-word reference)."""

    def __init__(self, word):
        self.word = torch.tensor(word)

    def __call__(self, input_ids, scores, **kwargs):
        return (input_ids[:, -len(self.word):] == self.word).all(dim=-1)


def test_stop_words_in_beam_search_match_hf(model, hf_model):
    prompt, width, new = PROMPTS[0], 3, 10
    free = _hf_greedy_tokens(hf_model, prompt, new)
    word = free[2:4]
    out = generate(model, [prompt], [len(prompt)], [new], beam_width=width, len_penalty=1.0,
                   stop_words_list=_word_list([[word]]))
    ref = _hf(hf_model, prompt, new, do_sample=False, num_beams=width, num_return_sequences=width,
              length_penalty=1.0, early_stopping=True, output_scores=True,
              stopping_criteria=transformers.StoppingCriteriaList([_EndsWith(word)]))
    stopped = 0
    for beam in range(width):
        tokens = ref.sequences[beam, len(prompt):].tolist()
        ends = [i + 2 for i in range(len(tokens) - 1) if tokens[i: i + 2] == word]
        tokens = tokens[: min(ends)] if ends else _until(tokens, END)
        stopped += bool(ends)
        assert _row(out, 0, beam) == prompt + tokens
        score = float(out.cum_log_probs[0, beam]) / len(tokens)
        assert score == pytest.approx(float(ref.sequences_scores[beam]), abs=1e-4)
    assert stopped >= 1


# ------------------------------------------------------------------------------------------- sampling


def _nucleus_reference(hf_model, prompt, new, seed, top_p, decay, p_min, reset):
    """FT's decaying nucleus recomputed from HF logits: the sampler's documented rule (sorted probabilities,
    keep while the mass before a token < top_p, inverse CDF with the seed's PCG64 uniforms)."""
    uniforms = np.random.Generator(np.random.PCG64(seed)).random(new)
    tokens, p, ps = [], top_p, []
    for step in range(new):
        with torch.no_grad():
            logits = hf_model(torch.tensor([prompt + tokens])).logits[0, -1].double()
        probs, order = torch.softmax(logits, -1).sort(descending=True)
        keep = (torch.cumsum(probs, 0) - probs) < p
        cdf = torch.cumsum(probs * keep, 0)
        choice = int(torch.searchsorted(cdf, torch.tensor([uniforms[step] * float(cdf[-1])]), right=True))
        token = int(order[min(choice, int(keep.sum()) - 1)])
        tokens.append(token)
        ps.append(p)
        p = top_p if token == reset else max(p * decay, p_min)
        if token == END:
            break
    return tokens, ps


def test_top_p_decay_min_and_reset_follow_ft_rule(model, hf_model):
    prompt, new, seed = PROMPTS[1], 14, 1234
    top_p, decay, p_min = 0.97, 0.6, 0.3
    # Pick a reset id the decayed run generates after the nucleus has shrunk, so the reset path is taken.
    probe, probe_ps = _nucleus_reference(hf_model, prompt, new, seed, top_p, decay, p_min, reset=-1)
    reset = probe[5]
    expected, ps = _nucleus_reference(hf_model, prompt, new, seed, top_p, decay, p_min, reset)
    assert min(ps) == pytest.approx(p_min) and reset in expected[:-1]
    out = generate(model, [prompt], [len(prompt)], [new], top_k=0, top_p=top_p, top_p_decay=decay,
                   top_p_min=p_min, top_p_reset_ids=reset, random_seed=seed)
    assert _row(out, 0)[len(prompt):] == expected
    undecayed, _ = _nucleus_reference(hf_model, prompt, new, seed, top_p, 1.0, p_min, -1)
    assert undecayed != expected  # the decay matters for this seed
    plain = generate(model, [prompt], [len(prompt)], [new], top_k=0, top_p=top_p, random_seed=seed)
    assert _row(plain, 0)[len(prompt):] == undecayed


def test_mixed_batch_rows_equal_each_row_alone(model):
    """Rows of different requests (greedy, beams of different widths, sampling with decay, word lists,
    penalties) in one batch give exactly what each gives alone."""
    rows = [
        {"top_k": 1},
        {"beam_width": 3, "len_penalty": 1.0, "repetition_penalty": 1.2},
        {"top_k": 0, "top_p": 0.9, "top_p_decay": 0.8, "random_seed": 2**64 - 1, "temperature": 1.3},
        {"beam_width": 2, "beam_search_diversity_rate": -0.5, "bad_words_list": [(PROMPTS[3][:1],)],
         "is_return_log_probs": False},
        {"top_k": 20, "random_seed": 9, "stop_words_list": [((262,), (13, 198))]},
    ]
    prompts = PROMPTS + [PROMPTS[0][:3]]
    new = [5, 9, 7, 6, 8]
    defaults = {"top_k": 0, "top_p": 0.0, "temperature": 1.0, "repetition_penalty": 1.0, "random_seed": 0,
                "beam_width": 1, "len_penalty": 0.0, "beam_search_diversity_rate": 0.0, "top_p_decay": 1.0,
                "is_return_log_probs": True}
    batch_kwargs = {key: [r.get(key, value) for r in rows] for key, value in defaults.items()}
    for key in ("bad_words_list", "stop_words_list"):
        batch_kwargs[key] = [r[key][0] if key in r else () for r in rows]
    ids, lengths = _padded(prompts)
    batch = generate(model, ids, lengths, new, **batch_kwargs)
    assert batch.output_ids.shape[:2] == (len(rows), 3)
    for row, (prompt, options) in enumerate(zip(prompts, rows)):
        alone = generate(model, [prompt], [len(prompt)], [new[row]], **options)
        width = options.get("beam_width", 1)
        total = alone.output_ids.shape[-1]
        assert batch.output_ids[row, :width, len(prompt): len(prompt) + new[row]].tolist() == \
            alone.output_ids[0, :, len(prompt): total].tolist()
        assert batch.sequence_length[row, :width].tolist() == alone.sequence_length[0].tolist()
        torch.testing.assert_close(batch.output_log_probs[row, :width, : new[row]], alone.output_log_probs[0],
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(batch.cum_log_probs[row, :width], alone.cum_log_probs[0], atol=1e-4, rtol=0)
        assert batch.sequence_length[row, width:].tolist() == [0] * (3 - width)  # padding beams
    assert torch.all(batch.output_log_probs[3] == 0) and torch.all(batch.cum_log_probs[3] == 0)
    assert torch.any(batch.output_log_probs[1] != 0)


def test_ragged_prefill_computes_the_real_tokens_only_and_matches_hf(model, hf_model, monkeypatch):
    """A right-padded batch's prefill runs every projection over its real tokens only (FT's remove-padding), and each
    row still generates what HF gives for its prompt alone."""
    rows_seen = []
    linear = ft_gpt._linear

    def counting(x, weight, bias=None):
        rows_seen.append(x.shape[0])
        return linear(x, weight, bias)

    monkeypatch.setattr(ft_gpt, "_linear", counting)
    ids, lengths = _padded(PROMPTS)
    out = generate(model, ids, lengths, [6] * len(PROMPTS), top_k=1)
    real, padded = sum(len(p) for p in PROMPTS), len(PROMPTS) * max(len(p) for p in PROMPTS)
    layers = len(model.layers)
    # The prefill: the qkv, output, fc1 and fc2 products of every layer over the real tokens; then the logits of
    # each row's last token and each decoding step's products over the rows.
    assert rows_seen[: 4 * layers] == [real] * (4 * layers) and real < padded
    assert set(rows_seen[4 * layers:]) == {len(PROMPTS)}
    for row, prompt in enumerate(PROMPTS):
        assert _row(out, row) == prompt + _until(_hf_greedy_tokens(hf_model, prompt, 6), END)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")
def test_cpu_fp32_products_use_blas_and_onednn_unless_switched_off(tiny_gpt2, tmp_path, hf_model, monkeypatch):
    """On the CPU in fp32 every weight matrix is held once as [out, in] for numpy's BLAS (one row) and oneDNN (more
    rows); FT_PYTHON_ONEDNN=0 keeps torch.mm. Each way, one row alone and a ragged batch give HF's greedy tokens."""
    shard_dir = convert_checkpoint(tiny_gpt2, tmp_path, ParallelLayout(1), "fp32")
    ids, lengths = _padded(PROMPTS)
    expected = [prompt + _until(_hf_greedy_tokens(hf_model, prompt, 8), END) for prompt in PROMPTS]
    for switch, kind in (("1", ft_gpt._CpuMatrix), ("0", torch.Tensor)):
        monkeypatch.setenv("FT_PYTHON_ONEDNN", switch)
        monkeypatch.setattr(ft_gpt, "_CPU_KERNELS", None)  # decided again at the next load
        loaded = ft_gpt.FTGPT.from_shards(shard_dir, device="cpu")
        matrices = [layer[name] for layer in loaded.layers for name in ("qkv_w", "o_w", "fc1_w", "fc2_w")]
        assert all(isinstance(matrix, kind) for matrix in matrices + [loaded.lm_head]), switch
        out = generate(loaded, ids, lengths, [8] * len(PROMPTS), top_k=1)
        assert [_row(out, row) for row in range(len(PROMPTS))] == expected, switch
        for prompt, tokens in zip(PROMPTS, expected):  # one row: the matrix-vector path
            alone = generate(loaded, [prompt], [len(prompt)], [8], top_k=1)
            assert _row(alone, 0) == tokens, switch


def test_seed_gives_the_same_sample_twice_whatever_the_other_rows(model):
    prompt = PROMPTS[0]
    options = {"top_k": 50, "temperature": 1.2}
    alone = [generate(model, [prompt], [len(prompt)], [10], random_seed=seed, **options) for seed in (7, 7, 8)]
    assert alone[0].output_ids.tolist() == alone[1].output_ids.tolist()
    assert alone[0].output_ids.tolist() != alone[2].output_ids.tolist()
    ids, lengths = _padded([PROMPTS[2], prompt, PROMPTS[1]])
    batch = generate(model, ids, lengths, [4, 10, 12], random_seed=[1, 7, 2], top_k=[0, 50, 3],
                     temperature=[1.0, 1.2, 0.5], beam_width=[2, 1, 1])
    assert _row(batch, 1) == _row(alone[0], 0)


# ------------------------------------------------------------------------------------------- streaming


def test_stream_reports_every_step_and_ends_with_the_result(model):
    ids, lengths = _padded(PROMPTS)
    new = [6, 9, 4, 7]
    kwargs = {"beam_width": [1, 3, 1, 2], "top_k": [1, 0, 5, 0], "random_seed": [0, 0, 4, 0]}
    seen = []
    final = generate(model, ids, lengths, new, stream=seen.append, **kwargs)
    plain = generate(model, ids, lengths, new, **kwargs)
    assert final.output_ids.tolist() == plain.output_ids.tolist()
    assert len(seen) == max(new)
    for step, partial in enumerate(seen, start=1):
        assert partial.output_ids.shape == (4, 3, lengths.max() + step)
        assert partial.output_log_probs.shape == (4, 3, step)
        for row in (0, 2):  # single rows grow token by token into the final sequence
            got = _row(partial, row)
            assert len(got) == min(lengths[row] + step, int(final.sequence_length[row, 0]))
            assert got == _row(final, row)[: len(got)]
    last = seen[-1]
    assert last.output_ids.tolist() == final.output_ids[..., : last.output_ids.shape[-1]].tolist()
    assert last.sequence_length.tolist() == final.sequence_length.tolist()


# ------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("kwargs, name", [
    ({"beam_width": 0}, "beam_width"),
    ({"beam_width": 9}, "beam_width"),
    ({"beam_width": 3, "max_beam_width": 2}, "beam_width"),
    ({"top_p": 1.5}, "runtime_top_p"),
    ({"top_p": -0.1}, "runtime_top_p"),
    ({"top_p_decay": 0.0}, "top_p_decay"),
    ({"top_p_decay": 1.5}, "top_p_decay"),
    ({"top_p_min": 0.0}, "top_p_min"),
    ({"top_p_reset_ids": 60000}, "top_p_reset_ids"),
    ({"len_penalty": float("nan")}, "len_penalty"),
    ({"bad_words_list": np.zeros((1, 3, 4), np.int32)}, "bad_words_list"),
    ({"bad_words_list": np.array([[[5, 6, 7], [2, 1, -1]]], np.int32)}, "bad_words_list"),
    ({"bad_words_list": np.array([[[5, 6, 7], [2, 4, -1]]], np.int32)}, "bad_words_list"),
    ({"stop_words_list": np.array([[[5, 60000], [1, 2]]], np.int32)}, "stop_words_list"),
    ({"stop_words_list": np.array([[[5, 6], [1, -1]], [[1, 2], [2, -1]]], np.int32)}, "stop_words_list"),
    ({"stop_words_list": np.array([[[5, 6], [-1, 2]]], np.int32)}, "stop_words_list"),
    ({"stop_words_list": np.array([[[5.0, 6.0], [1.0, 2.0]]])}, "stop_words_list"),
])
def test_invalid_options_name_the_input(model, kwargs, name):
    with pytest.raises(ValueError, match=name):
        generate(model, [[1, 2, 3]], [3], [4], **kwargs)


def test_beam_width_cap_and_word_list_forms(model):
    """beam_width > 1 is served (the runtime used to refuse it) up to max_beam_width (default 8)."""
    out = generate(model, [[1, 2, 3]], [3], [3], beam_width=8)
    assert out.output_ids.shape == (1, 8, 6)
    with pytest.raises(ValueError, match=r"beam_width must be in \[1, 8\]"):
        generate(model, [[1, 2, 3]], [3], [3], beam_width=9)
    # check_inputs' parsed word lists, [2, L] for every row and None are accepted.
    args = check_inputs(model, [[1, 2, 3], [4, 5, 6]], [3, 3], [3, 3],
                        bad_words_list=np.array([[11, 12, 13], [1, 3, -1]]))
    assert args.bad_words_list == [((11,), (12, 13))] * 2 and args.stop_words_list == [(), ()]
    again = check_inputs(model, [[1, 2, 3], [4, 5, 6]], [3, 3], [3, 3], bad_words_list=args.bad_words_list)
    assert again.bad_words_list == args.bad_words_list
