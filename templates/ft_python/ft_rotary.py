"""Rotary position tables for every rope type config.ini can name (exporter/arch/layout.md, "Rotary").

Copied into generated Triton model repositories next to ft_gpt.py; needs only torch. The formulas are the
published ones, evaluated as transformers 5 evaluates them (fp32 tensors), so that logits agree with it:

* default: inv_freq[i] = theta^(-2i / r) for i < r/2.
* linear: inv_freq / factor (positions interpolated by `factor`).
* llama3 (Llama 3.1): wavelengths 2 pi / inv_freq longer than original / low_freq_factor divided by
  `factor`, shorter than original / high_freq_factor kept, the band between blended linearly in
  original / wavelength.
* yarn: per-dimension blend of inv_freq / factor (interpolation) and inv_freq (extrapolation) by a
  linear ramp between the correction dims of beta_fast and beta_slow rotations over the original
  context; cos and sin are multiplied by `rope_attention_factor` (computed at export).
* dynamic (dynamic NTK): the base grows with the sequence length L (>= the original context length
  L0): theta' = theta * (factor L / L0 - (factor - 1))^(r / (r - 2)). Like transformers with its KV
  cache, each forward call uses L = (largest position in the call) + 1, so keys cached earlier keep
  the rotation they were given; here L is taken per batch row (a row never depends on another).
"""

import math

import torch

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


def _base_inv_freq(theta, dim):
    # [dim/2] fp32: 1 / theta^(2i / dim)
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def _yarn_inv_freq(config, dim):
    theta, factor = config.rope_theta, config.rope_scaling_factor
    original = config.rope_original_max_positions

    def correction_dim(rotations):  # the dimension whose wavelength fits `rotations` times in `original`
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(config.rope_beta_fast), correction_dim(config.rope_beta_slow)
    if config.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp                                     # 1: keep the frequency, 0: interpolate
    powers = theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    return (1.0 / (factor * powers)) * (1 - extrapolation) + (1.0 / powers) * extrapolation


def _llama3_inv_freq(config, dim):
    inv_freq = _base_inv_freq(config.rope_theta, dim)
    factor, original = config.rope_scaling_factor, config.rope_original_max_positions
    low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelength - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelength < original / high) & ~(wavelength > original / low)
    return torch.where(medium, blended, scaled)


def check(config):
    """Refuse a rope type this module does not compute (config.ini written by something else)."""
    if config.rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_type {config.rope_type!r} is not supported (one of {', '.join(ROPE_TYPES)})")
    if config.rope_type in ("dynamic", "yarn", "llama3") and config.rope_original_max_positions <= 0:
        raise ValueError(f"rope_type {config.rope_type} needs rope_original_max_positions > 0")


class RotaryTables:
    """cos / sin tables for positions, from an FTConfig's rotary keys (rotary_embedding = r dims)."""

    def __init__(self, config):
        check(config)
        self.dim = config.rotary_embedding
        self.config = config
        self.dynamic = config.rope_type == "dynamic"
        self.scale = config.rope_attention_factor if config.rope_type == "yarn" else 1.0
        if config.rope_type == "default":
            # fp64 then fp32, as this runtime always computed it (the unscaled tables are unchanged)
            exponent = torch.arange(0, self.dim, 2, dtype=torch.float64) / self.dim
            self.inv_freq = (1.0 / config.rope_theta ** exponent).float()
        elif config.rope_type in ("linear", "dynamic"):
            # dynamic: the table below the original context length; longer rows get theirs per call
            self.inv_freq = _base_inv_freq(config.rope_theta, self.dim)
            if config.rope_type == "linear":
                self.inv_freq = self.inv_freq / config.rope_scaling_factor
        elif config.rope_type == "yarn":
            self.inv_freq = _yarn_inv_freq(config, self.dim)
        else:
            self.inv_freq = _llama3_inv_freq(config, self.dim)          # [r/2] fp32

    def _dynamic_inv_freq(self, pos):
        """[B, r/2]: each row's frequencies for L = its largest position in this call + 1."""
        config, dim = self.config, self.dim
        original, factor = config.rope_original_max_positions, config.rope_scaling_factor
        length = (pos.max(dim=1).values + 1).clamp(min=original).float()   # [B]
        base = config.rope_theta * ((factor * length / original) - (factor - 1)) ** (dim / (dim - 2))
        exponent = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        return 1.0 / (base[:, None] ** exponent[None])

    def __call__(self, pos, device):
        """cos, sin [B, 1, S, r/2] (fp32) for positions pos [B, S] (computed on CPU: tiny)."""
        pos = pos.to("cpu")
        inv_freq = self._dynamic_inv_freq(pos)[:, None] if self.dynamic else self.inv_freq   # [B|1, 1|, r/2]
        angles = pos.to(torch.float32)[..., None] * inv_freq                 # [B, S, r/2]
        angles = angles[:, None].to(device)
        if self.scale == 1.0:
            return angles.cos(), angles.sin()
        return angles.cos() * self.scale, angles.sin() * self.scale
