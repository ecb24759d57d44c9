"""HF, GGUF or NeMo checkpoint -> FasterTransformer shards `<out_dir>/<tp>-gpu/`: plan and check everything, then
stream-write."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Iterator

from templates.ft_python.ft_checkpoint import CheckpointError, FTConfig

from ..arch import open_architecture
from ..arch.base import ENCODER_DECODER, Plan
from ..atomic import AtomicDirectory
from ..generation import generation_settings, write_generation_settings
from ..parallel import ParallelLayout, ShardingError
from ..readers import nemo_archive
from ..readers.source import SourceKind, source_kind
from ..tokenizer import (SpecialTokens, ServedTokenizerJson, decodable_vocab_size, load_tokenizer,
                         save_served_tokenizer)
from .encoder_decoder import convert_encoder_decoder
from .prompt_tables import PromptTables
from .sharding import file_names, rank_shape
from .verify import DTYPE_BYTES, expected_files, verify_shards
from .writer import write_config, write_plan

log = logging.getLogger(__name__)


@contextmanager
def _staged_nemo(checkpoint_path: Path, work_dir: Path) -> Iterator[Path]:
    """A .nemo archive or extracted NeMo directory staged for the reader (tokenizer under fixed names, weights
    unpacked or linked) in a temporary directory under `work_dir`, removed afterwards."""
    work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".nemo-source-", dir=work_dir) as staging:
        log.info("staging NeMo checkpoint %s in %s", checkpoint_path, staging)
        yield nemo_archive.stage(checkpoint_path, Path(staging))


def ft_config(plan: Plan, layout: ParallelLayout, weight_data_type: str) -> FTConfig:
    """config.ini of `plan` written for `layout` in `weight_data_type`."""
    return replace(plan.params, weight_data_type=weight_data_type, tensor_para_size=layout.tensor_parallel,
                   pipeline_para_size=layout.pipeline_parallel)


def check_plan(plan: Plan, layout: ParallelLayout, weight_data_type: str) -> int:
    """Every file the plan will write has exactly the size the runtime's table (FT's loader rules) reads; checked
    before writing. Returns the bytes the plan writes."""
    untied = any(spec.ft_name == "model.lm_head.weight" for spec in plan.specs)
    expected = expected_files(ft_config(plan, layout, weight_data_type), untied=untied)
    planned: dict[str, int] = {}
    for spec in plan.specs:
        piece = rank_shape(spec.shape, spec.split, layout.tensor_parallel, spec.source[0], spec.sections)
        nbytes = DTYPE_BYTES[weight_data_type]
        for dim in piece:
            nbytes *= dim
        for name in file_names(spec.ft_name, spec.split, layout.tensor_parallel):
            planned[name] = nbytes
    missing = sorted(set(expected) - set(planned))
    unexpected = sorted(set(planned) - set(expected))
    wrong = sorted(name for name in set(planned) & set(expected) if planned[name] != expected[name])
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"FT would open files the plan lacks: {missing}")
        if unexpected:
            details.append(f"the plan writes files FT never opens: {unexpected}")
        for name in wrong:
            details.append(f"{name}: planned {planned[name]} bytes, FT reads {expected[name]}")
        raise ShardingError("; ".join(details))
    return sum(planned.values())


def convert_checkpoint(
    checkpoint_path: str | Path,
    out_dir: str | Path,
    layout: ParallelLayout = ParallelLayout(),
    weight_data_type: str = "fp32",
    processes: int = 1,
    special_tokens: SpecialTokens = SpecialTokens(),
    prompt_tables: PromptTables | None = None,
) -> Path:
    """Convert; returns the finished `<out_dir>/<layout.shard_dir_name>` directory. Nothing is written before every
    check passes. The directory's tokenizer.json is the served one: `special_tokens` decided (exporter/tokenizer.py).
    prompt_tables: FT's p/prompt-tuning tables and keys written beside the shards (ft/prompt_tables.py)."""
    began = time.monotonic()
    if weight_data_type not in DTYPE_BYTES:
        raise ValueError(f"weight_data_type {weight_data_type!r} is not one of {sorted(DTYPE_BYTES)}")
    checkpoint_path = Path(checkpoint_path)
    if source_kind(checkpoint_path) is SourceKind.NEMO and not nemo_archive.is_staged(checkpoint_path):
        with _staged_nemo(checkpoint_path, Path(out_dir)) as staged:
            return convert_checkpoint(staged, out_dir, layout, weight_data_type, processes, special_tokens,
                                      prompt_tables)
    arch = open_architecture(checkpoint_path, layout)
    if arch.model_kind == ENCODER_DECODER:  # FT's own T5 layout, [encoder] / [decoder] config.ini
        if prompt_tables is not None:
            raise CheckpointError("prompt tables are supported for decoder models only (export.prompt_learning)")
        return convert_encoder_decoder(arch, partial(open_architecture, checkpoint_path, layout), checkpoint_path,
                                       out_dir, layout, weight_data_type, processes, special_tokens)
    gguf = source_kind(checkpoint_path) is SourceKind.GGUF  # its reader rebuilt the tokenizer on opening
    # Pre/postprocessing need it: fail now, not after writing gigabytes.
    served_tokenizer = None if gguf else load_tokenizer(checkpoint_path, special_tokens)
    served_json = None if served_tokenizer is None else ServedTokenizerJson(served_tokenizer, checkpoint_path)
    plan = arch.plan()
    # Every eos id of the source ends generation; FT's single end_id is the first (exporter/generation.py).
    generation = generation_settings(checkpoint_path, plan.params.end_id, plan.params.vocab_size)
    plan.params = replace(plan.params, end_id=generation["eos_token_id"][0])
    params = plan.params
    layout = layout.with_layers(params.num_layer)
    layout.check(params.head_num, params.kv_head_num, params.inter_size)
    shard_bytes = check_plan(plan, layout, weight_data_type)
    if prompt_tables is not None:
        prompt_tables.check(params)
    # The free space needed, checked before writing: shards, tokenizer files, the served tokenizer.json, config files.
    needed = (shard_bytes + sum(path.stat().st_size for path in arch.checkpoint.tokenizer_files())
              + (0 if served_json is None else served_json.nbytes) + (1 << 20))

    final = Path(out_dir) / layout.shard_dir_name
    started = time.monotonic()
    log.info(
        "converting %s (%s, %d layers) to %s, tp=%d, pp=%d, %s",
        checkpoint_path,
        type(arch).__name__,
        params.num_layer,
        final,
        layout.tensor_parallel,
        layout.pipeline_parallel,
        weight_data_type,
    )
    with AtomicDirectory(final, needed_bytes=needed) as partial_dir:
        nbytes = write_plan(arch, partial(open_architecture, checkpoint_path, layout), plan, partial_dir, layout,
                            weight_data_type, processes, total_bytes=shard_bytes)
        for tokenizer_file in arch.checkpoint.tokenizer_files():
            shutil.copy2(tokenizer_file, partial_dir / tokenizer_file.name)
        if gguf:  # tokenizer.json + tokenizer_config.json from the metadata, then the same special-token rules
            arch.checkpoint.save_tokenizer(partial_dir)
            save_served_tokenizer(load_tokenizer(partial_dir, special_tokens), partial_dir,
                                  partial_dir / "tokenizer.json")
        else:
            served_json.save(partial_dir / "tokenizer.json")
        config = ft_config(plan, layout, weight_data_type)
        # A vocab_size above what the served tokenizer decodes is padding: config.ini says where the real ids end.
        # The served tokenizer in memory has the saved one's vocabulary (only its post-processor may differ from
        # the checkpoint's file): no second parse of tokenizer.json. A GGUF's was built on disk: read it there.
        vocab = {} if served_tokenizer is None else served_tokenizer.get_vocab(with_added_tokens=True)
        decodable = max(vocab.values()) + 1 if vocab else decodable_vocab_size(partial_dir / "tokenizer.json")
        tokenizer_vocab = min(decodable, config.vocab_size)
        if tokenizer_vocab < config.vocab_size:
            log.info("padded vocabulary: %d rows, the tokenizer decodes %d ids; the others are padding",
                     config.vocab_size, tokenizer_vocab)
        write_generation_settings(generation, partial_dir)
        if prompt_tables is not None:
            prompt_tables.write(partial_dir, weight_data_type)
            config = prompt_tables.config(config)
        # config.ini last: a directory without it is never mistaken for a finished export.
        write_config(replace(config, tokenizer_vocab_size=tokenizer_vocab), partial_dir)
        verify_shards(partial_dir)
    now = time.monotonic()
    log.info("wrote %.1f MB of FT shards in %.2fs (conversion %.2fs in all, with its checks)", nbytes / 1e6,
             now - started, now - began)
    return final
