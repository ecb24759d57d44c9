"""The request interface's one table (templates/ft_python/ft_interface.py) agrees with every place that reads it."""

from __future__ import annotations

import argparse
import dataclasses
from types import SimpleNamespace

import pytest

from exporter.clients import common
from exporter.triton import render
from templates.ft_python import ft_generate, ft_interface

# What check_inputs reads of a decoder: enough to check requests without weights.
DECODER = SimpleNamespace(vocab_size=100, end_id=7, learned_positions=True, max_positions=64)


def test_sampling_params_are_the_tables_options_in_order():
    fields = [field.name for field in dataclasses.fields(ft_generate.SamplingParams)]
    assert fields == [tensor.field for tensor in ft_interface.SAMPLING_INPUTS]
    assert set(fields) < {field.name for field in dataclasses.fields(ft_generate.Batch)}


def test_render_and_clients_use_the_table():
    rendered = render.MODEL_INPUTS + render.SAMPLING_INPUTS + render.MODEL_OUTPUTS + render.STREAMING_OUTPUTS
    table = ft_interface.INPUTS + ft_interface.OUTPUTS
    assert [tensor.name for tensor in rendered] == [tensor.name for tensor in table]
    assert render.WORD_LIST_INPUTS == ("bad_words_list", "stop_words_list")
    parser = argparse.ArgumentParser()
    common.add_sampling_args(parser)
    flags = {action.dest for action in parser._actions} - {"help"}
    assert flags == {option for _, option in common.SAMPLING_OPTIONS.values()}


def test_defaults_come_from_the_table():
    batch = ft_generate.check_inputs(DECODER, [[1, 2, 3]], [3], [4])
    for tensor in ft_interface.SAMPLING_INPUTS:
        value = getattr(batch, tensor.field)
        if not tensor.scalar:
            assert value == [()], tensor.name
        elif tensor.default is None:  # start_id, end_id
            assert value.tolist() == [DECODER.end_id], tensor.name
        elif tensor.field == "random_seed":  # python ints
            assert value == [tensor.default]
        else:
            assert value.tolist() == pytest.approx([tensor.default]), tensor.name  # float32 1e-6 != 1e-6


@pytest.mark.parametrize("options", [
    {"top_k": -1}, {"top_p": 1.5}, {"top_p_decay": 0.0}, {"top_p_min": 2.0}, {"temperature": 0.0},
    {"repetition_penalty": -1.0}, {"len_penalty": float("inf")}, {"beam_search_diversity_rate": float("nan")},
])
def test_table_bounds_refuse_and_name_the_input(options):
    (field, value), = options.items()
    name = ft_interface.BY_FIELD[field].name
    with pytest.raises(ValueError, match=name):
        ft_generate.check_inputs(DECODER, [[1, 2, 3]], [3], [4], ft_generate.SamplingParams(**options))


def test_concatenated_batches_keep_each_requests_rows():
    first = ft_generate.check_inputs(DECODER, [[1, 2, 3, 4]], [2], [4], ft_generate.SamplingParams(top_k=5))
    second = ft_generate.check_inputs(DECODER, [[5, 6, 7], [8, 9, 9]], [3, 1], [2, 3],
                                      ft_generate.SamplingParams(random_seed=[1, 2], bad_words_list=[[9], [1]]))
    batch = ft_generate.Batch.concatenate([first, second])
    assert batch.input_ids.tolist() == [[1, 2, 3], [5, 6, 7], [8, 9, 9]]  # cut / padded to the longest prompt
    assert batch.top_k.tolist() == [5, 0, 0] and batch.random_seed == [0, 1, 2]
    assert batch.bad_words_list == [(), ((9,),), ((9,),)]
