"""Triton's Prometheus endpoint carries the python runtime's own metrics (templates/ft_python/ft_metrics.py), and
they move by exactly what the requests asked and got: prompt tokens are what we sent, generated tokens what the
responses' sequence_length say, one time-to-first-token sample per request.

Scraped from the shared server (tests/serving_fixtures.py) before and after a few requests; only the deltas count.
"""

from __future__ import annotations

import re
import urllib.request

import numpy as np
import pytest

from exporter.clients import common
from serving_fixtures import MAX_BATCH_SIZE, MODEL, STREAM_MODEL

pytestmark = pytest.mark.triton

SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][\w:]*)\{(?P<labels>[^}]*)\} (?P<value>\S+)$')


def scrape(url: str) -> dict[tuple[str, str], float]:
    """{(metric name, model label): value} of the ft_python_* samples (histogram buckets left out)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if not match or not match["name"].startswith("ft_python_") or 'le="' in match["labels"]:
            continue
        model = re.search(r'model="([^"]*)"', match["labels"])
        samples[(match["name"], model[1] if model else "")] = float(match["value"])
    return samples


def delta(before, after, name, model):
    return after.get((name, model), 0.0) - before.get((name, model), 0.0)


def model_arrays(ids, lengths, output_len, **options):
    return {"input_ids": np.array(ids, dtype=np.uint32),
            "input_lengths": np.array([[n] for n in lengths], dtype=np.uint32),
            "request_output_len": common.per_row(output_len, len(ids), np.uint32),
            **common.sampling_arrays(options, len(ids))}


def generated(arrays, result, beams):
    """Tokens the response says were generated: sequence_length - input_length over rows and returned beams."""
    return int((result["sequence_length"][:, :beams] - arrays["input_lengths"]).sum())


def test_metrics_count_tokens_requests_and_first_responses(served):
    url = served.server.metrics_url
    before = scrape(url)
    greedy = model_arrays([[464, 2068, 7586, 0, 0], [15496, 11, 616, 1438, 318]], [3, 5], 6)
    beams = model_arrays([[40, 588, 257, 3797]], [4], 3, beam_width=2)
    bad = model_arrays([[464, 2068]], [7], 3)  # input_lengths past the row: refused by the model
    first = common.infer(served.http_url, "http", MODEL, greedy)
    second = common.infer(served.http_url, "http", MODEL, beams)
    with pytest.raises(common.ClientError):
        common.infer(served.http_url, "http", MODEL, bad)
    streamed = common.stream(served.grpc_url, STREAM_MODEL, model_arrays([[464, 2068, 7586]], [3], 5))
    after = scrape(url)

    assert delta(before, after, "ft_python_requests_total", MODEL) == 3
    assert delta(before, after, "ft_python_request_failures_total", MODEL) == 1
    assert delta(before, after, "ft_python_prompt_tokens_total", MODEL) == 3 + 5 + 4
    expected = generated(greedy, first, 1) + generated(beams, second, 2)
    assert expected > 0
    assert delta(before, after, "ft_python_generated_tokens_total", MODEL) == expected
    assert after[("ft_python_requests_in_flight", MODEL)] == 0
    assert 0 < after[("ft_python_batch_occupancy", MODEL)] <= 1
    assert after[("ft_python_batch_occupancy", MODEL)] * MAX_BATCH_SIZE in (1, 2)  # the latest batch: 1 or 2 rows
    assert delta(before, after, "ft_python_time_to_first_token_seconds_count", MODEL) == 3
    assert delta(before, after, "ft_python_time_to_first_token_seconds_sum", MODEL) > 0

    final = streamed[-1]
    assert delta(before, after, "ft_python_requests_total", STREAM_MODEL) == 1
    assert delta(before, after, "ft_python_prompt_tokens_total", STREAM_MODEL) == 3
    assert delta(before, after, "ft_python_generated_tokens_total", STREAM_MODEL) == int(
        final["sequence_length"][0, 0]) - 3
    # One sample per request: the first streamed token, not every partial response.
    assert delta(before, after, "ft_python_time_to_first_token_seconds_count", STREAM_MODEL) == 1


def test_triton_metrics_endpoint_is_on(served):
    """Triton's own per-model counters are on the same port (nv_inference_request_success)."""
    common.infer(served.http_url, "http", MODEL, model_arrays([[464, 2068]], [2], 2))
    with urllib.request.urlopen(served.server.metrics_url, timeout=10) as response:
        text = response.read().decode()
    assert re.search(r'^nv_inference_request_success\{model="%s",version="1"\} [1-9]' % MODEL, text, re.M), \
        text[:2000]
