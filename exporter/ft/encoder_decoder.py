"""An encoder-decoder checkpoint (T5) -> FT's T5 shards `<out_dir>/<tp>-gpu/`: plan and check everything, then
stream-write with the same writer as decoder models (ft/writer.py).

The file table and config.ini schema are templates/ft_python/ft_t5_checkpoint.py (FT's T5 loaders' rules); the
plan is checked against it file by file, byte for byte, before anything is written.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from templates.ft_python.ft_t5_checkpoint import T5Config, expected_files, verify

from ..arch.base import Architecture, Plan
from ..atomic import AtomicDirectory
from ..generation import generation_settings, write_generation_settings
from ..parallel import ParallelLayout, ShardingError
from ..tokenizer import ServedTokenizerJson, SpecialTokens, has_tokenizer, load_tokenizer
from .sharding import file_names, rank_shape
from .verify import DTYPE_BYTES
from .writer import write_plan

log = logging.getLogger(__name__)

# Tokenizer files copied beside the shards as they are (T5's SentencePiece model among them); tokenizer.json is
# then the served one (exporter/tokenizer.py: as transformers' T5Tokenizer reads the checkpoint).
T5_TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def check_layout(params: T5Config, layout: ParallelLayout) -> None:
    """FT's T5 rules for the layout (nothing written yet): heads and d_ff split whole over TP ranks; the encoder's
    layers divide evenly over pipeline stages (T5EncoderWeight.cc: FT_CHECK(num_layer % pipeline_para_size == 0)),
    the decoder's by FT's ceil rule with no empty stage."""
    tp, pp = layout.tensor_parallel, layout.pipeline_parallel
    if tp < 1 or pp < 1:
        raise ShardingError("tensor and pipeline parallel sizes must be >= 1")
    for key, value in (("num_heads", params.num_heads), ("d_ff", params.d_ff)):
        if value % tp:
            raise ShardingError(f"config.json {key} {value} is not divisible by tensor_para_size {tp}")
    if params.encoder_num_layers % pp:
        raise ShardingError(f"config.json num_layers {params.encoder_num_layers} (encoder) is not divisible by "
                            f"pipeline_para_size {pp}, as FT's T5 encoder requires")
    layout.with_layers(params.decoder_num_layers).check(params.num_heads)


def t5_config(plan: Plan, layout: ParallelLayout, weight_data_type: str) -> T5Config:
    return replace(plan.params, weight_data_type=weight_data_type, tensor_para_size=layout.tensor_parallel,
                   pipeline_para_size=layout.pipeline_parallel)


def check_plan(plan: Plan, layout: ParallelLayout, weight_data_type: str) -> int:
    """Every file the plan writes has exactly the size FT's T5 loaders read, and no file is missing or extra.
    Returns the bytes the plan writes."""
    expected = expected_files(t5_config(plan, layout, weight_data_type))
    planned: dict[str, int] = {}
    for spec in plan.specs:
        nbytes = DTYPE_BYTES[weight_data_type]
        for dim in rank_shape(spec.shape, spec.split, layout.tensor_parallel, spec.source[0]):
            nbytes *= dim
        for name in file_names(spec.ft_name, spec.split, layout.tensor_parallel):
            planned[name] = nbytes
    problems = [f"FT would open files the plan lacks: {sorted(set(expected) - set(planned))}"] \
        if set(expected) - set(planned) else []
    if set(planned) - set(expected):
        problems.append(f"the plan writes files FT never opens: {sorted(set(planned) - set(expected))}")
    problems += [f"{name}: planned {planned[name]} bytes, FT reads {expected[name]}"
                 for name in sorted(set(planned) & set(expected)) if planned[name] != expected[name]]
    if problems:
        raise ShardingError("; ".join(problems))
    return sum(planned.values())


def convert_encoder_decoder(arch: Architecture, make_arch: Callable[[], Architecture], checkpoint_path: Path,
                            out_dir: Path, layout: ParallelLayout, weight_data_type: str, processes: int = 1,
                            special_tokens: SpecialTokens = SpecialTokens()) -> Path:
    """Convert; returns the finished `<out_dir>/<tp>-gpu`. Every check passes before anything is written.
    special_tokens: what the served tokenizer.json adds around a prompt (default: T5's </s> after it)."""
    plan = arch.plan()
    # The shards alone need no tokenizer (the export stage refuses a tokenizer-less checkpoint before converting).
    served_tokenizer = load_tokenizer(checkpoint_path, special_tokens) if has_tokenizer(checkpoint_path) else None
    served_json = None if served_tokenizer is None else ServedTokenizerJson(served_tokenizer, checkpoint_path)
    generation = generation_settings(checkpoint_path, plan.params.eos_token_id, plan.params.vocab_size)
    plan.params = replace(plan.params, eos_token_id=generation["eos_token_id"][0])
    check_layout(plan.params, layout)
    shard_bytes = check_plan(plan, layout, weight_data_type)
    tokenizer_files = [checkpoint_path / name for name in T5_TOKENIZER_FILES if (checkpoint_path / name).is_file()]
    needed = (shard_bytes + sum(path.stat().st_size for path in tokenizer_files)
              + (served_json.nbytes if served_json else 0)
              + (1 << 20))
    final = Path(out_dir) / layout.shard_dir_name
    started = time.monotonic()
    log.info("converting %s (T5, %d encoder + %d decoder layers) to %s, tp=%d, pp=%d, %s", checkpoint_path,
             plan.params.encoder_num_layers, plan.params.decoder_num_layers, final, layout.tensor_parallel,
             layout.pipeline_parallel, weight_data_type)
    with AtomicDirectory(final, needed_bytes=needed) as partial_dir:
        nbytes = write_plan(arch, make_arch, plan, partial_dir, layout, weight_data_type, processes,
                            total_bytes=shard_bytes)
        for path in tokenizer_files:
            shutil.copy2(path, partial_dir / path.name)
        if served_json is not None:
            served_json.save(partial_dir / "tokenizer.json")
        write_generation_settings(generation, partial_dir)
        # config.ini last: a directory without it is never mistaken for a finished export.
        (partial_dir / "config.ini").write_text(t5_config(plan, layout, weight_data_type).to_ini())
        verify(partial_dir)
    log.info("wrote %.1f MB of FT T5 shards in %.1fs", nbytes / 1e6, time.monotonic() - started)
    return final

