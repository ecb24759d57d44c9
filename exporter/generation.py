"""The source's generation settings -> the `generation_config.json` served beside the shards.

HF's `generate` reads the checkpoint's `generation_config.json`: it stops a row at any id of `eos_token_id` (an id
or a list) and takes its sampling settings for what a call leaves unset. The export keeps the keys the served model
applies (templates/ft_python/ft_generate.py `GenerationDefaults` says how), checked here, so the repository carries
them and config.ini's single `end_id` (FT's) is the first eos id. Without a generation_config.json, config.json's
`eos_token_id` (an id or a list) is the eos set, as transformers derives it; without either, config.ini's end_id.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from templates.ft_python.ft_checkpoint import CheckpointError
from templates.ft_python.ft_generate import GENERATION_CONFIG

from .readers.hf import read_json

# The sampling keys the python runtime applies, and the output length preprocessing gives a request without one
# (max_new_tokens, else max_length - the prompt's length), in HF's names.
SAMPLING_KEYS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens", "max_length")


def _eos_ids(value, where: str, vocab_size: int) -> list[int]:
    ids = value if isinstance(value, list) else [value]
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size for i in ids):
        raise CheckpointError(f"{where}: eos_token_id {value!r} must be a token id or a non-empty list of ids "
                              f"in [0, {vocab_size}) (the model's vocabulary)")
    return list(dict.fromkeys(ids))  # unique, first kept first


def _check(key: str, value, where: str) -> None:
    """Refuse a sampling value the served model could not apply (HF refuses the same ones when it samples)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    allowed = {
        "do_sample": isinstance(value, bool),
        "temperature": number and value > 0,
        "top_k": isinstance(value, int) and not isinstance(value, bool) and value >= 0,
        "top_p": number and 0 < value <= 1,
        "repetition_penalty": number and value > 0,
        "max_new_tokens": isinstance(value, int) and not isinstance(value, bool) and value >= 1,
        "max_length": isinstance(value, int) and not isinstance(value, bool) and value >= 1,
    }[key]
    if not allowed:
        supported = {"do_sample": "true or false", "temperature": "a number > 0", "top_k": "an integer >= 0",
                     "top_p": "a number in (0, 1]", "repetition_penalty": "a number > 0",
                     "max_new_tokens": "an integer >= 1", "max_length": "an integer >= 1"}[key]
        raise CheckpointError(f"{where}: {key} = {value!r} is not supported: expected {supported}")


def generation_settings(checkpoint_dir: Path, end_id: int, vocab_size: int) -> dict:
    """{"eos_token_id": [ids, first = FT's end_id], and the SAMPLING_KEYS the source sets} (CheckpointError on a bad
    value, before anything is written). `end_id`: the architecture's, used when the source names no eos id."""
    checkpoint_dir = Path(checkpoint_dir)
    generation_path, config_path = checkpoint_dir / GENERATION_CONFIG, checkpoint_dir / "config.json"
    generation = read_json(generation_path) if generation_path.is_file() else {}
    settings: dict = {}
    if generation.get("eos_token_id") is not None:
        settings["eos_token_id"] = _eos_ids(generation["eos_token_id"], str(generation_path), vocab_size)
    else:
        config = read_json(config_path) if config_path.is_file() else {}
        eos = config.get("eos_token_id")
        settings["eos_token_id"] = [end_id] if eos is None else _eos_ids(eos, str(config_path), vocab_size)
    for key in SAMPLING_KEYS:
        if generation.get(key) is not None:
            _check(key, generation[key], str(generation_path))
            settings[key] = generation[key]
    return settings


def write_generation_settings(settings: dict, shard_dir: Path) -> Path:
    """`<shard_dir>/generation_config.json` (HF's keys; the shard directory is itself written atomically)."""
    path = Path(shard_dir) / GENERATION_CONFIG
    path.write_text(json.dumps(settings, indent=2) + "\n")
    return path
