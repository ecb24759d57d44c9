"""Open a `pytorch_model.bin` safely: `torch.load(weights_only=True)`, and every way it fails as one CheckpointError.

A pickle can name any Python callable (`os.system`, say) and have the unpickler call it. `weights_only=True` makes
torch's unpickler refuse every global outside its allowlist (tensors, storages, plain containers) before calling
anything; this module turns that refusal, and a damaged file, into one line naming the file, what is wrong and
what to do. It never suggests `weights_only=False`, which would run the payload.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

from templates.ft_python.ft_checkpoint import CheckpointError

from ..lazy import torch

# torch names the global it refused: "... GLOBAL posix.system whose module posix is blocked" (torch >= 2.6),
# "Unsupported global: GLOBAL argparse.Namespace was not an allowed global ..." (earlier).
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6 is a zip archive


def load_state_dict(file: Path) -> Any:
    """The state dict in `file`: memory-mapped (tensors stay on disk until touched) for torch's zip format; loaded
    whole for the legacy format (torch < 1.6), which cannot be mapped. Raises CheckpointError when the file holds
    more than tensors (nothing from it is run) or is no readable PyTorch checkpoint."""
    try:
        return torch.load(file, map_location="cpu", mmap=is_mappable(file), weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only load failed" not in str(error).lower():
            raise _damaged(file, error) from None
        raise _refused(file, error) from None
    except (RuntimeError, EOFError, KeyError, ValueError) as error:
        raise _damaged(file, error) from None


def is_mappable(file: Path) -> bool:
    """Torch's zip format (memory-mappable, one tensor read at a time), not the legacy one."""
    return zipfile.is_zipfile(file)


def _refused(file: Path, error: pickle.UnpicklingError) -> CheckpointError:
    match = _REFUSED_GLOBAL.search(str(error))
    what = f"the global {match.group(1)!r}" if match else "objects other than tensors"
    return CheckpointError(
        f"{file}: refused: its pickle holds more than tensors: loading it would call {what}, which could run code "
        f"(nothing from it was run); convert it to safetensors where you trust its origin (transformers: "
        f"from_pretrained(dir).save_pretrained(dir)) or get the checkpoint as model.safetensors from its publisher"
    )


def _damaged(file: Path, error: BaseException) -> CheckpointError:
    # The first sentence of torch's reason ("PytorchStreamReader failed reading zip archive: failed finding central
    # directory"); the exception type where the reason alone says nothing (a KeyError's "101").
    reason = str(error).split(". ")[0].splitlines()[0] if str(error).strip() else ""
    if not isinstance(error, RuntimeError):
        reason = f"{type(error).__name__}: {reason}" if reason else type(error).__name__
    with open(file, "rb") as handle:
        kind = "zip format" if handle.read(4) == _ZIP_MAGIC else "not torch's zip format"
    return CheckpointError(
        f"{file}: not a readable PyTorch checkpoint ({kind}; {reason}): it is probably truncated or damaged; "
        f"copy or download it again"
    )
