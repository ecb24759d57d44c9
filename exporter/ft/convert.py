"""HF checkpoint -> FasterTransformer shards `<out_dir>/<tp>-gpu/`: plan and check everything, then stream-write."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Iterator

from ..arch import Architecture, architecture_for
from ..arch.base import ModelParams, Plan
from ..readers import nemo_archive
from ..readers.hf import HFCheckpoint
from ..tokenizer import find_tokenizer, save_tokenizer_json
from ..parallel import ParallelLayout, ShardingError
from .sharding import file_names, rank_shape
from .verify import DTYPE_BYTES, expected_files, read_config, verify_shards
from ..atomic import AtomicDirectory
from .writer import config_ini, write_plan

log = logging.getLogger(__name__)


def _open(checkpoint_path: Path, tensor_parallel: int = 1) -> Architecture:
    if nemo_archive.is_staged(checkpoint_path):
        from ..arch.nemo_gpt import open_nemo

        return open_nemo(checkpoint_path, tensor_parallel)
    checkpoint = HFCheckpoint(checkpoint_path)
    return architecture_for(checkpoint.config)(checkpoint, tensor_parallel)


@contextmanager
def _staged_nemo(checkpoint_path: Path, work_dir: Path) -> Iterator[Path]:
    """A .nemo archive or extracted NeMo directory staged for the reader (tokenizer under fixed names, weights
    unpacked or linked) in a temporary directory under `work_dir`, removed afterwards."""
    work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".nemo-source-", dir=work_dir) as staging:
        log.info("staging NeMo checkpoint %s in %s", checkpoint_path, staging)
        yield nemo_archive.stage(checkpoint_path, Path(staging))


def check_plan(plan: Plan, layout: ParallelLayout, weight_data_type: str, section: str = "gpt") -> None:
    """Every file the plan will write has exactly the size the runtime's table (FT's loader rules) reads; checked
    before writing."""
    untied = any(spec.ft_name == "model.lm_head.weight" for spec in plan.specs)
    values = ini_values(plan.params, section, layout, weight_data_type)
    expected = expected_files(values, untied=untied)
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


def ini_values(params: ModelParams, section: str, layout: ParallelLayout, weight_data_type: str) -> dict:
    """The config.ini values as the runtime's reader types them (read back from the very text written)."""
    parser = config_ini(params, section, layout.tensor_parallel, weight_data_type, layout.pipeline_parallel)
    with tempfile.TemporaryDirectory() as scratch:
        with open(Path(scratch) / "config.ini", "w") as handle:
            parser.write(handle)
        return read_config(scratch)


def convert_checkpoint(
    checkpoint_path: str | Path,
    out_dir: str | Path,
    tensor_parallel: int = 1,
    weight_data_type: str = "fp32",
    processes: int = 1,
    pipeline_parallel: int = 1,
) -> Path:
    """Convert; returns the finished `<out_dir>/<tp>-gpu` directory. Nothing is written before every check passes."""
    if weight_data_type not in DTYPE_BYTES:
        raise ValueError(f"weight_data_type {weight_data_type!r} is not one of {sorted(DTYPE_BYTES)}")
    checkpoint_path = Path(checkpoint_path)
    if nemo_archive.is_nemo_source(checkpoint_path):
        with _staged_nemo(checkpoint_path, Path(out_dir)) as staged:
            return convert_checkpoint(staged, out_dir, tensor_parallel, weight_data_type, processes, pipeline_parallel)
    arch = _open(checkpoint_path, tensor_parallel)
    find_tokenizer(checkpoint_path)  # pre/postprocessing need it: fail now, not after writing gigabytes
    plan = arch.plan()
    params = plan.params
    layout = ParallelLayout(tensor_parallel, pipeline_parallel, params.num_layer)
    layout.check(params.head_num, params.kv_heads, params.inter_size)
    check_plan(plan, layout, weight_data_type, arch.section)

    final = Path(out_dir) / f"{tensor_parallel}-gpu"
    started = time.monotonic()
    log.info(
        "converting %s (%s, %d layers) to %s, tp=%d, pp=%d, %s",
        checkpoint_path,
        type(arch).__name__,
        plan.params.num_layer,
        final,
        tensor_parallel,
        pipeline_parallel,
        weight_data_type,
    )
    with AtomicDirectory(final) as partial_dir:
        nbytes = write_plan(
            arch,
            partial(_open, checkpoint_path, tensor_parallel),
            plan,
            partial_dir,
            tensor_parallel,
            weight_data_type,
            processes,
        )
        for tokenizer_file in arch.checkpoint.tokenizer_files():
            shutil.copy2(tokenizer_file, partial_dir / tokenizer_file.name)
        if not (partial_dir / "tokenizer.json").exists():
            save_tokenizer_json(checkpoint_path, partial_dir / "tokenizer.json")
        # config.ini last: a directory without it is never mistaken for a finished export.
        with open(partial_dir / "config.ini", "w") as handle:
            config_ini(plan.params, arch.section, tensor_parallel, weight_data_type, pipeline_parallel).write(handle)
        verify_shards(partial_dir)
    log.info("wrote %.1f MB of FT shards in %.1fs", nbytes / 1e6, time.monotonic() - started)
    return final
