"""transformers loading a GGUF source for the accuracy stage's reference, with gguf's parsing done once.

transformers reads a GGUF file through gguf's `GGUFReader` three times (the tokenizer, the config, then the
tensors), and each parse builds a numpy view for every part of every metadata value: SmolLM2's 49 152-token
vocabulary makes that 5-7 s per parse on 2 cores. While it maps tensor names it also rebuilds gguf's name table
(`get_tensor_name_map`) for every module of the model: 397 times for SmolLM2, 9 s. `gguf_parsed_once()` memoises
both for the duration of the loads: the same reader for the same file, the same table for the same architecture and
depth. transformers only reads either, so what it loads is unchanged (tests/test_gguf_reference.py: the same
weights and token ids as without); the default model's tokenizer and model load in 13-15 s instead of 32-36 s.

Only gguf's two module attributes are replaced, and restored on exit; the readers are dropped with the context.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterator


@contextlib.contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """Within the block, gguf.GGUFReader(path) returns one reader per file and mode, and gguf.get_tensor_name_map one
    table per (architecture, blocks). Nothing happens where gguf is not installed."""
    try:
        import gguf
    except ImportError:
        yield
        return
    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], object] = {}

    def one_reader(path, mode="r"):
        key = (os.path.realpath(os.fspath(path)), mode)
        if key not in readers:
            readers[key] = reader(path, mode)
        return readers[key]

    gguf.GGUFReader = one_reader
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map
        readers.clear()
