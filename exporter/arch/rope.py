"""Rotary parameters from an HF config.json -> config.ini's rope keys (layout.md "Rotary"; the runtime's tables are
templates/ft_python/ft_rotary.py).

Reads transformers 5's `rope_parameters` and transformers 4's `rope_scaling` + `rope_theta` (the latter wins when
both are present, as in transformers). What the runtime needs only as a number is resolved here, as transformers
resolves it: yarn's missing `factor` (max_position_embeddings / original) and its attention factor
(0.1 ln(factor) + 1, or the mscale / mscale_all_dim ratio); the original context length of llama3 and yarn (a
top-level `original_max_position_embeddings` first, then the rope dict's, then max_position_embeddings).
"""

from __future__ import annotations

import math
from typing import Any

from templates.ft_python.ft_checkpoint import CheckpointError

SUPPORTED = ("default", "linear", "dynamic", "yarn", "llama3")


def _required(source: dict[str, Any], key: str, rope_type: str) -> float:
    if source.get(key) is None:
        raise CheckpointError(f"config.json rope type {rope_type!r} lacks {key!r}")
    return float(source[key])


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def partial_rotary_factor(config: dict[str, Any]) -> float:
    source = config.get("rope_scaling") or config.get("rope_parameters") or {}
    return float(source.get("partial_rotary_factor") or config.get("partial_rotary_factor") or 1.0)


def rope_keys(config: dict[str, Any], default_theta: float = 10000.0, partial: bool = False) -> dict[str, Any]:
    """config.ini rope keys (rope_theta, rope_type, ...) for an HF config; refuses rope types the runtime does not
    compute, naming the supported ones, and a partial_rotary_factor unless the family rotates part of the head
    (`partial`: the caller sets rotary_embedding)."""
    source = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if any(isinstance(value, dict) for value in source.values()):
        raise CheckpointError(f"config.json has per-layer-type rope parameters {sorted(source)}; supported: one "
                              "rope dict for every layer")
    rope_type = source.get("rope_type") or source.get("type") or "default"
    if rope_type not in SUPPORTED:
        raise CheckpointError(f"config.json rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED)}")
    if not partial and partial_rotary_factor(config) != 1.0:
        raise CheckpointError(f"config.json partial_rotary_factor {partial_rotary_factor(config)} is not supported "
                              "for this family (rotary over the whole head only)")
    theta = float(source.get("rope_theta") or config.get("rope_theta") or default_theta)
    keys: dict[str, Any] = {"rope_theta": theta, "rope_type": rope_type}
    if rope_type == "default":
        return keys
    max_positions = int(config["max_position_embeddings"])
    original = int(config.get("original_max_position_embeddings") or source.get("original_max_position_embeddings")
                   or max_positions)
    if rope_type == "linear":
        keys["rope_scaling_factor"] = _required(source, "factor", rope_type)
    elif rope_type == "dynamic":  # relative to max_position_embeddings itself
        keys.update(rope_scaling_factor=_required(source, "factor", rope_type),
                    rope_original_max_positions=max_positions)
    elif rope_type == "llama3":
        keys.update(rope_scaling_factor=_required(source, "factor", rope_type), rope_original_max_positions=original,
                    rope_low_freq_factor=_required(source, "low_freq_factor", rope_type),
                    rope_high_freq_factor=_required(source, "high_freq_factor", rope_type))
    else:  # yarn
        factor = float(source["factor"]) if source.get("factor") is not None else max_positions / original
        attention_factor = source.get("attention_factor")
        if attention_factor is None:
            mscale, mscale_all_dim = source.get("mscale"), source.get("mscale_all_dim")
            if mscale and mscale_all_dim:
                attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
            else:
                attention_factor = _yarn_mscale(factor)
        keys.update(rope_scaling_factor=factor, rope_original_max_positions=original,
                    rope_beta_fast=float(source.get("beta_fast") or 32), rope_beta_slow=float(source.get("beta_slow") or 1),
                    rope_truncate=bool(source.get("truncate", True)), rope_attention_factor=float(attention_factor))
    return keys
