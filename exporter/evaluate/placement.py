"""Where the HF reference of the accuracy stage runs: the GPU in the checkpoint's dtype when its weights fit,
else the CPU in float32; and the parity tolerance that placement allows."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError
from ..lazy import imports_without_gc

# The reference in half precision: near-tie greedy choices may flip against a float32 served model, so parity
# allows at least this difference in accuracy (and at least one example's flip on small subsets).
HALF_PRECISION_TOLERANCE = 0.01


@dataclass(frozen=True)
class Placement:
    """Where the HF reference runs: device ("cpu" | "cuda"), torch dtype name, and why there."""

    device: str = "cpu"
    dtype: str = "float32"
    reason: str = "the CPU, in float32"

    def tolerance(self, configured: float, examples: int) -> tuple[float, str]:
        """(the parity tolerance for this placement, a note saying why it differs from `configured`, or '')."""
        if self.dtype == "float32":
            return configured, ""
        tolerance = max(configured, HALF_PRECISION_TOLERANCE, 1 / examples)
        if tolerance == configured:
            return configured, ""
        return tolerance, (f"reference in {self.dtype} on {self.device}: near-tie greedy choices may flip, so the "
                           f"tolerance is max(configured {configured}, {HALF_PRECISION_TOLERANCE}, one example "
                           f"1/{examples})")


_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def _stored_dtype(checkpoint: Path) -> str:
    """config.json's `dtype` (`torch_dtype` before transformers 5) when a float type, else float32 (GGUF: the
    de-quantised weights transformers gives)."""
    config = checkpoint / "config.json"
    if checkpoint.is_dir() and config.is_file():
        settings = json.loads(config.read_text())
        stored = settings.get("dtype") or settings.get("torch_dtype")
        if stored in ("float16", "bfloat16", "float32"):
            return stored
    return "float32"


def _weight_bytes(checkpoint: Path, dtype: str) -> int:
    """About the bytes of the model's weights loaded in `dtype`: the weight files' size (in their stored dtype);
    a GGUF file's quantised weights x 8 (4-5 bits a parameter -> float32)."""
    if checkpoint.is_file():
        return checkpoint.stat().st_size * 8
    files = [path for pattern in ("*.safetensors", "*.bin", "*.pt") for path in checkpoint.glob(pattern)]
    stored = sum(path.stat().st_size for path in files)
    return stored * _DTYPE_BYTES[dtype] // _DTYPE_BYTES[_stored_dtype(checkpoint)]


def reference_placement(checkpoint: Path, requested: str = "auto") -> Placement:
    """The GPU, in the checkpoint's dtype, when there is one and the weights fit in its free memory with room for
    activations (`requested` "auto" or "cuda"); else the CPU in float32, as before."""
    with imports_without_gc():
        import torch

    checkpoint = Path(checkpoint)
    if requested == "cpu":
        return Placement(reason="the CPU, in float32 (accuracy.reference_device=cpu)")
    if not torch.cuda.is_available():
        if requested == "cuda":
            raise ConfigError("export.accuracy.reference_device=cuda, but torch sees no CUDA device")
        return Placement(reason="the CPU, in float32 (no CUDA device)")
    dtype = _stored_dtype(checkpoint)
    needed = _weight_bytes(checkpoint, dtype)
    free, _ = torch.cuda.mem_get_info()
    if needed * 1.2 + (1 << 30) > free:
        reason = f"{needed / 1e9:.1f} GB of {dtype} weights do not fit the GPU's {free / 1e9:.1f} GB free"
        if requested == "cuda":
            raise ConfigError(f"export.accuracy.reference_device=cuda: {reason}")
        return Placement(reason=f"the CPU, in float32 ({reason})")
    return Placement("cuda", dtype, f"the GPU, in {dtype} ({needed / 1e9:.1f} GB of {free / 1e9:.1f} GB free)")
