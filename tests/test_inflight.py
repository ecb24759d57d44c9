"""In-flight batching in the python runtime (templates/ft_python/ft_generate.py Engine, model.py's scheduler).

In process: requests (cohorts) admitted at different steps, with different lengths and options, decode together;
each gives exactly what generate() gives for it alone, and greedy / beam rows what HF transformers' generate gives.
A cancelled cohort stops and its cache is freed; caches grow in blocks with the work.
Through the shared tritonserver (tests/serving_fixtures.py): a short request sent while a long one decodes finishes
first (it joined the running batch instead of waiting for it), plain and decoupled; a cancelled stream stops early.
"""

from __future__ import annotations

import gc
import queue
import threading
import time
import weakref

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from exporter.ft.convert import convert_checkpoint  # noqa: E402
from exporter.parallel import ParallelLayout  # noqa: E402
from conftest import check_inputs, right_padded  # noqa: E402
from templates.ft_python import ft_generate, ft_gpt  # noqa: E402

END = 50256
PROMPTS = [[464, 2068, 7586, 21831, 18045], [40], [1212, 318, 257, 1332, 286, 262, 6801], [15496, 11]]


@pytest.fixture(scope="module")
def model(tiny_gpt2, tmp_path_factory):
    shard_dir = convert_checkpoint(tiny_gpt2, tmp_path_factory.mktemp("inflight"), ParallelLayout(1), "fp32")
    return ft_gpt.FTGPT.from_shards(shard_dir, device="cpu")


def _hf_greedy(hf_model, prompt, new):
    """HF generate's greedy tokens after the prompt, cut after the end token (FT keeps it, HF pads after it)."""
    with torch.no_grad():
        tokens = hf_model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, pad_token_id=END,
                                   eos_token_id=END)[0, len(prompt):].tolist()
    return tokens[: tokens.index(END) + 1] if END in tokens else tokens


def _hf_beams(hf_model, prompt, new, width, len_penalty):
    with torch.no_grad():
        sequences = hf_model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, num_beams=width,
                                      num_return_sequences=width, length_penalty=len_penalty, early_stopping=True,
                                      pad_token_id=END, eos_token_id=END)
    beams = []
    for row in sequences[:, len(prompt):].tolist():
        beams.append(row[: row.index(END) + 1] if END in row else row)
    return beams


def _tokens(out, row, beam=0):
    length = int(out.sequence_length[row, beam])
    return out.output_ids[row, beam, :length].tolist()


def _word_list(words):
    """FT's [1, 2, L] word list of one row."""
    flat = [t for word in words for t in word]
    return np.array([[flat, list(np.cumsum([len(w) for w in words])) + [-1] * (len(flat) - len(words))]],
                    dtype=np.int32)


def _assert_same(ours, alone):
    """The same tokens, lengths and scores as the request decoded alone."""
    assert torch.equal(ours.output_ids, alone.output_ids)
    assert torch.equal(ours.sequence_length, alone.sequence_length)
    torch.testing.assert_close(ours.cum_log_probs, alone.cum_log_probs, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.output_log_probs, alone.output_log_probs, atol=1e-4, rtol=0)


def test_staggered_cohorts_each_equal_to_alone_and_to_hf(model, hf_model):
    stop_free = _hf_greedy(hf_model, PROMPTS[3], 14)
    # (step it is admitted at, prompts, max_new_tokens, options)
    plan = [
        (0, PROMPTS[:2], [20, 12], {}),                                            # greedy, two rows
        (1, [PROMPTS[3]], [14], {"stop_words_list": _word_list([stop_free[5:7]])}),  # a stop word
        (2, [PROMPTS[2]], [15], {"top_k": 20, "top_p": 0.9, "random_seed": 7}),    # seeded sampling
        (3, [PROMPTS[0]], [10], {"beam_width": 2}),
        (5, [PROMPTS[2], PROMPTS[1]], [8, 6], {"beam_width": 3, "len_penalty": 1.0}),
        (9, [PROMPTS[1]], [4], {}),                                                # a late, short one
    ]
    batches = []
    for _, prompts, new, options in plan:
        ids, lengths = right_padded(prompts, END)
        batches.append(check_inputs(model, ids, lengths, new, **options))
    engine = ft_generate.Engine(model)
    cohorts, left_at, most, step = {}, {}, 0, 0
    while len(left_at) < len(plan):
        for index, (admit_at, *_) in enumerate(plan):
            if admit_at == step:
                cohorts[index] = engine.admit(batches[index])
        most = max(most, len(engine.cohorts))
        for cohort in engine.step():
            assert cohort.error is None and cohort.cache is None  # its cache is freed as it leaves
            left_at[next(i for i, c in cohorts.items() if c is cohort)] = step
        step += 1
    assert most >= 4 and not engine.cohorts  # several cohorts really decoded together

    for index, (admit_at, prompts, new, options) in enumerate(plan):
        ours, alone = cohorts[index].output, ft_generate.generate(model, batches[index])
        _assert_same(ours, alone)
        if options.get("beam_width", 1) == 1:  # a single-row cohort leaves at the step of its last token
            generated = int((ours.sequence_length[:, 0] - batches[index].input_lengths).max())
            assert left_at[index] == admit_at + generated - 1, index
        if "top_k" in options:
            continue
        for row, prompt in enumerate(prompts):
            if "beam_width" in options:
                width = options["beam_width"]
                for beam, tokens in enumerate(_hf_beams(hf_model, prompt, new[row], width,
                                                        options.get("len_penalty", 0.0))):
                    assert _tokens(ours, row, beam) == prompt + tokens, (index, row, beam)
            else:
                tokens = _hf_greedy(hf_model, prompt, new[row])
                if "stop_words_list" in options:  # ends with the stop word's first occurrence, which is kept
                    word = stop_free[5:7]
                    tokens = stop_free[: next(i + 2 for i in range(len(stop_free)) if stop_free[i:i + 2] == word)]
                assert _tokens(ours, row) == prompt + tokens, (index, row)


JOINT = [  # (prompts, max_new_tokens, options): lengths 5, 1 + 7, 2 + 5, 7 + 2, greedy, sampling and beams
    ([PROMPTS[0]], [9], {}),
    ([PROMPTS[1], PROMPTS[2]], [6, 8], {"top_k": 20, "top_p": 0.9, "random_seed": 3}),
    ([PROMPTS[3], PROMPTS[0]], [7, 5], {"beam_width": 2}),
    ([PROMPTS[2], PROMPTS[3]], [4, 10], {}),
]


def _joint_batches(model):
    batches = []
    for prompts, new, options in JOINT:
        ids, lengths = right_padded(prompts, END)
        batches.append(check_inputs(model, ids, lengths, new, **options))
    return batches


def _run(engine, cohorts):
    while engine.cohorts:
        engine.step()
    return [cohort.output for cohort in cohorts]


@pytest.mark.parametrize("padding", [1.25, 100.0], ids=["similar-lengths", "every-length"])
def test_requests_admitted_together_prefill_in_one_forward_and_each_equals_alone(model, monkeypatch, padding):
    """Engine.joint_prefill: the cohorts admitted in the block share prefill forwards (prompts padded on the left to
    the group's longest, their caches moved back after), and each decodes exactly as generate() alone."""
    monkeypatch.setattr(ft_generate, "PREFILL_PADDING", padding)
    groups = []
    real = ft_generate.grouped_prefill
    monkeypatch.setattr(ft_generate, "grouped_prefill",
                        lambda m, cohorts: (groups.append([c.lmax for c in cohorts]), real(m, cohorts))[1])
    batches = _joint_batches(model)
    engine = ft_generate.Engine(model)
    with engine.joint_prefill():
        cohorts = [engine.admit(batch) for batch in batches]
        assert all(cohort.cache is None for cohort in cohorts)  # prefilled when the block ends
    assert all(cohort.cache is not None and cohort.error is None for cohort in cohorts)
    # lmax 5, 7, 5, 7: similar lengths go together; at any padding, all four in one forward, two of them padded
    assert groups == [[5, 7, 5, 7]]
    for ours, batch in zip(_run(engine, cohorts), batches):
        _assert_same(ours, ft_generate.generate(model, batch))


def test_a_joint_prefill_that_fails_falls_back_to_one_forward_each(model, monkeypatch):
    """The joint forward failing (e.g. out of memory together) prefills each cohort alone; a cohort whose own prefill
    fails leaves at the next step with its error, the others decode as alone."""
    batches = _joint_batches(model)
    engine = ft_generate.Engine(model)
    monkeypatch.setattr(model, "hidden_states_grouped", lambda *a, **k: (_ for _ in ()).throw(MemoryError("joint")))
    real, calls = model.hidden_states, []

    def alone(ids, *args, **kwargs):
        calls.append(ids.shape[0])
        if len(calls) == 2:
            raise MemoryError("alone")
        return real(ids, *args, **kwargs)

    monkeypatch.setattr(model, "hidden_states", alone)
    with engine.joint_prefill():
        cohorts = [engine.admit(batch) for batch in batches]
    monkeypatch.undo()  # the model's own forwards again
    assert calls == [1, 2, 2, 2]  # one prefill each, in arrival order
    failed = cohorts[1]
    assert isinstance(failed.error, MemoryError) and failed.cache is None
    assert engine.step() == [failed] and failed.output is None  # it leaves at the first step, with its error
    outputs = _run(engine, cohorts)
    for index in (0, 2, 3):
        _assert_same(outputs[index], ft_generate.generate(model, batches[index]))


def test_cancelled_cohort_stops_and_frees_its_cache(model):
    ids, lengths = right_padded([PROMPTS[0]], END)
    long = check_inputs(model, ids, lengths, [100])
    other = check_inputs(model, *right_padded([PROMPTS[2]], END), [12], top_k=5, random_seed=3)
    streamed = []
    engine = ft_generate.Engine(model)
    cancelled = engine.admit(long, stream=lambda partial: streamed.append(partial.output_ids.shape[-1]))
    kept = engine.admit(other)
    for _ in range(3):
        assert engine.step() == []
    pool = weakref.ref(engine.pool[0][0])
    per_position = 2 * model.num_layers * model.kv_heads * model.head_dim * 4
    assert engine.cache_bytes() == per_position * 2 * cancelled.capacity  # one row each, the longer's capacity
    engine.cancel(cancelled)
    gc.collect()
    # its row is gone at once (the pool re-laid out without it, to the kept one's capacity), the other goes on
    assert pool() is None and engine.cohorts == [kept] and engine.cache_bytes() == per_position * kept.capacity
    assert kept.capacity < cancelled.capacity
    while engine.cohorts:
        engine.step()
    assert streamed == [len(PROMPTS[0]) + step for step in (1, 2, 3)]  # no step after the cancel
    assert cancelled.output is None
    _assert_same(kept.output, ft_generate.generate(model, other))


def test_an_idle_engine_gives_freed_memory_back_once_its_last_request_leaves(model, monkeypatch):
    """FTGPT.trim_heap (glibc's malloc_trim) runs when the engine's last request has left, not while any decodes."""
    trims = []
    monkeypatch.setattr(model, "trim_heap", lambda: trims.append(len(engine.cohorts)), raising=False)
    engine = ft_generate.Engine(model)
    short = engine.admit(check_inputs(model, *right_padded([PROMPTS[1]], END), [2]))
    engine.admit(check_inputs(model, *right_padded([PROMPTS[0]], END), [6]))
    while short in engine.cohorts:
        engine.step()
    assert trims == [] and engine.cohorts  # the short one left, the long one still decodes
    while engine.cohorts:
        engine.step()
    assert trims == [0] and engine.pool is None


def test_cache_grows_in_blocks_with_the_work(model):
    """The KV cache follows the positions decoded so far (whole blocks), not prompt + max_new_tokens."""
    prompt, new = PROMPTS[0], 120  # 125 positions in all (the tiny model has 128)
    batch = check_inputs(model, *right_padded([prompt], END), [new], beam_width=2)
    engine = ft_generate.Engine(model)
    cohort = engine.admit(batch)
    per_position = 2 * model.num_layers * model.kv_heads * model.head_dim * 4 * 2  # k and v, fp32, 2 beams
    capacities = []
    while engine.cohorts:
        capacities.append(engine.cache_bytes() // per_position)
        decoded = len(prompt) + cohort.step  # positions in the cache before this step's forward
        assert capacities[-1] >= decoded
        engine.step()
    assert capacities[0] == ft_generate.CACHE_BLOCK  # not 125: the prompt and the first steps only
    assert sorted(set(capacities)) == [ft_generate.CACHE_BLOCK, len(prompt) + new]  # grown once, to the cap
    assert cohort.output is not None and cohort.cache is None and engine.pool is None and engine.cache_bytes() == 0


def test_one_attention_call_per_layer_for_every_cohort_each_equal_to_alone(model, monkeypatch):
    """Cohorts at different lengths (and beams, reordered every step) share one KV pool: a step attends for all
    of them in one call per layer, and each still gives what it gives alone. The pool holds their rows x the
    longest capacity and shrinks as they leave."""
    plan = [([PROMPTS[0]], [12], {}), ([PROMPTS[1], PROMPTS[3]], [6, 9], {"top_k": 8, "random_seed": 5}),
            ([PROMPTS[2]], [7], {"beam_width": 3}), ([PROMPTS[3]], [10], {"repetition_penalty": 1.3})]
    batches = [check_inputs(model, *right_padded(prompts, END), new, **options) for prompts, new, options in plan]
    calls = []
    attend = ft_gpt.F.scaled_dot_product_attention

    def counted(*args, **kwargs):
        calls.append(args[0].shape[0])  # the rows of the call
        return attend(*args, **kwargs)

    monkeypatch.setattr(ft_gpt.F, "scaled_dot_product_attention", counted)
    engine = ft_generate.Engine(model)
    cohorts = [engine.admit(batch) for batch in batches]
    per_slot = 2 * model.num_layers * model.kv_heads * model.head_dim * 4
    rows_seen = []
    while engine.cohorts:
        del calls[:]
        engine.step()
        if engine.cohorts:  # a step with a forward: one call per layer over every running slot
            rows = sum(cohort.slots for cohort in engine.cohorts)
            assert calls == [rows] * model.num_layers
            assert engine.cache_bytes() == per_slot * rows * max(cohort.capacity for cohort in engine.cohorts)
            rows_seen.append(rows)
    assert rows_seen[0] == 7 and rows_seen[-1] < rows_seen[0] and engine.pool is None
    monkeypatch.undo()
    for cohort, batch in zip(cohorts, batches):
        _assert_same(cohort.output, ft_generate.generate(model, batch))


def test_pooled_cohorts_at_different_lengths_keep_their_sliding_windows(tmp_path):
    """Mistral's window (5) per row of the pool: rows at other lengths mask their own window's keys."""
    from family_fixtures import build_mistral

    shard = convert_checkpoint(build_mistral(tmp_path / "hf"), tmp_path / "ft", ParallelLayout(1), "fp32")
    mistral = ft_gpt.FTGPT.from_shards(shard, device="cpu")
    prompts = [[5, 9, 3], [7, 2, 8, 1, 4, 6, 3, 2], [11, 4]]
    batches = [check_inputs(mistral, *right_padded([prompt], 0), [9]) for prompt in prompts]
    engine = ft_generate.Engine(mistral)
    cohorts = [engine.admit(batches[0])]
    engine.step()
    cohorts += [engine.admit(batch) for batch in batches[1:]]  # joins at other lengths
    while engine.cohorts:
        engine.step()
    for cohort, batch in zip(cohorts, batches):
        _assert_same(cohort.output, ft_generate.generate(mistral, batch))


# ------------------------------------------------------------------------------------ through tritonserver


def _arrays(prompts, output_len, **options):
    from exporter.clients import common

    ids, lengths = right_padded(prompts, END)
    return {"input_ids": ids.astype(np.uint32), "input_lengths": lengths.astype(np.uint32)[:, None],
            "request_output_len": common.per_row(output_len, len(prompts), np.uint32),
            **common.sampling_arrays(options, len(prompts))}


LONG_PROMPTS, LONG_NEW = [PROMPTS[0], PROMPTS[2]], 100
SHORT_PROMPT, SHORT_NEW = PROMPTS[1], 3
NEVER = 50255  # an end_id the tiny model does not generate in these requests (HF runs without an end to compare)


@pytest.mark.triton
@pytest.mark.parametrize("decoupled", [False, True], ids=["plain", "decoupled"])
def test_short_request_joins_a_running_one_and_finishes_first(served, hf_model, decoupled):
    from exporter.clients import common
    from serving_fixtures import MODEL, STREAM_MODEL

    model = STREAM_MODEL if decoupled else MODEL
    long_arrays = _arrays(LONG_PROMPTS, LONG_NEW, end_id=NEVER)  # every row runs all 100 steps
    done, results = {}, {}

    def send(name, arrays, started=None):
        if decoupled:
            results[name] = common.stream(served.grpc_url, model, arrays,
                                          on_response=lambda _: started and started.set())[-1]
        else:
            results[name] = common.infer(served.grpc_url, "grpc", model, arrays)
        done[name] = time.monotonic()

    started = threading.Event()
    long = threading.Thread(target=send, args=("long", long_arrays, started))
    long.start()
    if decoupled:
        assert started.wait(60)  # the long request is decoding
    else:
        time.sleep(0.15)  # past the 20 ms batching delay: the long request is in the model
    send("short", _arrays([SHORT_PROMPT], SHORT_NEW))
    long.join(120)
    assert "long" in done, "the long request got no answer"
    assert done["short"] < done["long"]  # it joined the running batch instead of waiting for all of it
    short = results["short"]
    assert short["output_ids"][0, 0, : int(short["sequence_length"][0, 0])].tolist() == \
        SHORT_PROMPT + _hf_greedy(hf_model, SHORT_PROMPT, SHORT_NEW)
    for row, prompt in enumerate(LONG_PROMPTS):
        with torch.no_grad():
            reference = hf_model.generate(torch.tensor([prompt]), max_new_tokens=LONG_NEW, do_sample=False,
                                          pad_token_id=END, eos_token_id=None)[0].tolist()
        assert results["long"]["output_ids"][row, 0, : len(prompt) + LONG_NEW].tolist() == reference


@pytest.mark.triton
def test_cancelled_stream_stops_early_and_the_server_goes_on(served, hf_model):
    """A stream cancelled by its client (stop_stream(cancel_requests=True)) is stopped at the next step: the model
    has no request in flight right after, long before the request would have ended; the server serves others."""
    import tritonclient.grpc as grpc

    from exporter.clients import common
    from serving_fixtures import MODEL, STREAM_MODEL
    from test_metrics import scrape

    # Long enough to run for seconds: 4 rows x 2 beams x 120 steps.
    arrays = _arrays([PROMPTS[0]] * 4, 120, end_id=NEVER, beam_width=2)
    started = time.monotonic()
    common.stream(served.grpc_url, STREAM_MODEL, arrays, output_names=["sequence_length"])
    whole = time.monotonic() - started

    responses = queue.Queue()
    client = grpc.InferenceServerClient(served.grpc_url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    client.async_stream_infer(STREAM_MODEL, [common.tensor("grpc", name, array) for name, array in arrays.items()],
                              outputs=[grpc.InferRequestedOutput("sequence_length")])
    for _ in range(2):
        result, error = responses.get(timeout=60)
        assert error is None
    cancelled = time.monotonic()
    client.stop_stream(cancel_requests=True)
    client.close()
    while scrape(served.server.metrics_url).get(("ft_python_requests_in_flight", STREAM_MODEL), 0) > 0:
        assert time.monotonic() - cancelled < whole / 2, f"still running {whole / 2:.1f}s after the cancel"
        time.sleep(0.02)
    result = common.infer(served.grpc_url, "grpc", MODEL, _arrays([SHORT_PROMPT], SHORT_NEW))
    assert result["output_ids"][0, 0, : int(result["sequence_length"][0, 0])].tolist() == \
        SHORT_PROMPT + _hf_greedy(hf_model, SHORT_PROMPT, SHORT_NEW)


# ------------------------------------------------------------------------------------ model.py's scheduler


def _model_py(tiny_gpt2, tmp_path, monkeypatch, **parameters):
    """model.py laid out as the exporter lays it out (1-gpu shards), initialised with the stand-in pb_utils and
    these config.pbtxt parameters besides the shards' path and the CPU."""
    from exporter.runtimes import python as python_runtime
    from exporter.triton.repo import copy_templates
    from test_runtime_inprocess import _load_model_py

    root = tmp_path / "gpt" / "1"
    root.mkdir(parents=True)
    copy_templates(python_runtime.FILES, root)
    convert_checkpoint(tiny_gpt2, root, ParallelLayout(1), "fp32")
    return _load_model_py(root, monkeypatch, {"model_checkpoint_path": "1-gpu", "device": "cpu", **parameters})


@pytest.fixture
def served_in_process(tiny_gpt2, tmp_path, monkeypatch):
    instance = _model_py(tiny_gpt2, tmp_path, monkeypatch)
    yield instance
    instance.finalize()


def test_engine_failure_answers_its_requests_with_an_error_and_serving_goes_on(served_in_process, hf_model):
    """An exception inside the decoding step (here: the logits of a joint forward) must answer every request of
    that step with an error instead of leaving its client waiting; the next request is served normally."""
    from test_runtime_inprocess import _execute, _request

    model = served_in_process
    logits = model.model.logits
    calls = {"count": 0}

    def failing(hidden):
        calls["count"] += 1
        if calls["count"] == 4:  # two prefills, then the second joint step
            raise RuntimeError("injected failure")
        return logits(hidden)

    model.model.logits = failing
    first = _execute(model, [_request([PROMPTS[0]], [6]), _request([PROMPTS[2]], [6], beam_width=[2])])
    assert all(r.error is not None and "injected failure" in r.error.message() for r in first)
    (again,) = _execute(model, [_request([PROMPTS[1]], [5])])
    assert again.error is None
    assert again.output("output_ids")[0, 0, : int(again.output("sequence_length")[0, 0])].tolist() == \
        PROMPTS[1] + _hf_greedy(hf_model, PROMPTS[1], 5)


@pytest.mark.parametrize("window_us, prefills", [(1_000_000, [2]), (0, [1, 1])], ids=["window", "no-window"])
def test_an_idle_model_waits_its_admission_window_so_requests_sent_together_share_a_prefill(
        tiny_gpt2, tmp_path, monkeypatch, hf_model, window_us, prefills):
    """Two requests sent 300 ms apart to an idle model: within its admission window they are prefilled in one joint
    forward and decode in step; with the window off the first is prefilled alone at once. Either way each gets HF's
    greedy tokens."""
    from test_runtime_inprocess import _request

    instance = _model_py(tiny_gpt2, tmp_path, monkeypatch, admission_window_microseconds=str(window_us))
    try:
        engine = instance._scheduler.engine
        seen, prefill = [], engine._prefill
        engine._prefill = lambda cohorts: (cohorts and seen.append(len(cohorts)), prefill(cohorts))[1]
        first, second = _request([PROMPTS[0]], [6]), _request([PROMPTS[2]], [5])
        instance.execute([first])
        time.sleep(0.3)
        instance.execute([second])
        for request in (first, second):
            assert request.sender.closed.wait(120), "no final response"
    finally:
        instance.finalize()
    assert seen == prefills
    for request, prompt, new in ((first, PROMPTS[0], 6), (second, PROMPTS[2], 5)):
        response = request.sender.sent[-1]
        assert response.error is None
        length = int(response.output("sequence_length")[0, 0])
        assert response.output("output_ids")[0, 0, :length].tolist() == prompt + _hf_greedy(hf_model, prompt, new)
