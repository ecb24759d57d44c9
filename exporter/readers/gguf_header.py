"""A GGUF file's header, parsed in one pass over its bytes: the metadata as Python values, the tensor table.

`gguf.GGUFReader` builds a numpy view for every part of every value: SmolLM2's header (a 49 152-token vocabulary
and 48 900 merges, ~100 000 strings) becomes ~500 000 objects and takes 2.7-3.0 s on this project's 2-core machine,
paid by the launcher (planning) and again by the convert sub-stage. Here a string is two slices of one bytes
object and a numeric array one `numpy.frombuffer`: the same header in ~0.1 s. Only the header is parsed; the type
names, block sizes and de-quantisation stay gguf's (`gguf.constants`, `gguf.quants`).

The layout (GGUF v2 and v3, little-endian): magic `GGUF`, version u32, tensor count u64, metadata count u64; each
metadata entry a key (string) and a value type u32 then the value, an array being its element type u32, a count
u64 and the elements; strings a u64 length and UTF-8 bytes; then per tensor its name, dimension count u32, the
dimensions u64 (innermost first), its GGML type u32 and its offset u64 within the data section, which starts at the
next multiple of `general.alignment` (32 by default) after the table.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# GGUF value type ids (gguf.constants.GGUFValueType) -> struct format of one scalar.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table, with what GGUFReader's tensors offer that the reader uses."""

    name: str
    shape: tuple[int, ...]  # innermost dimension first, as GGUF lists them
    tensor_type: Any        # gguf.GGMLQuantizationType
    data_offset: int        # absolute, in the file
    n_bytes: int


class GGUFHeader:
    """`fields`: metadata key -> value (int, float, bool, str, or a list of them, as gguf's `ReaderField.contents()`
    gives them); `tensors`: the tensor table in file order. A damaged, truncated or big-endian header raises
    ValueError (UnicodeDecodeError for a string that is not UTF-8)."""

    def __init__(self, path: str | Path):
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
            self._view, self._at = view, 0
            try:
                if self._take(4) != MAGIC:
                    raise ValueError("no GGUF magic")
                version = self._scalar("<I")
                if version not in VERSIONS:
                    if int.from_bytes(version.to_bytes(4, "little"), "big") in VERSIONS:
                        raise ValueError("a big-endian GGUF file; only little-endian files are supported")
                    raise ValueError(f"GGUF version {version} (supported: {', '.join(map(str, VERSIONS))})")
                tensor_count, field_count = self._scalar("<Q"), self._scalar("<Q")
                self.fields: dict[str, Any] = {}
                for _ in range(field_count):
                    key = self._string()
                    self.fields[key] = self._value(self._scalar("<I"))
                table = []
                for _ in range(tensor_count):
                    name = self._string()
                    dims = tuple(self._scalar("<Q") for _ in range(self._scalar("<I")))
                    table.append((name, dims, self._scalar("<I"), self._scalar("<Q")))
                alignment = self.fields.get("general.alignment", DEFAULT_ALIGNMENT)
                if not isinstance(alignment, int) or alignment <= 0:
                    raise ValueError(f"general.alignment {alignment!r} is not a positive integer")
                start = -(-self._at // alignment) * alignment
                size = len(view)
            finally:
                self._view = None
        self.tensors: list[TensorInfo] = []
        for name, dims, type_id, offset in table:
            try:
                kind = GGMLQuantizationType(type_id)
                block, type_bytes = GGML_QUANT_SIZES[kind]
            except (ValueError, KeyError):
                raise ValueError(f"tensor {name!r} has GGML type {type_id}, unknown to gguf") from None
            elements = int(np.prod(dims, dtype=np.int64)) if dims else 1
            n_bytes = elements // block * type_bytes
            if start + offset + n_bytes > size:
                raise ValueError(f"tensor {name!r} ends past the end of the file (truncated?)")
            self.tensors.append(TensorInfo(name, dims, kind, start + offset, n_bytes))

    # -- reading the header's parts ---------------------------------------------------------------------------
    def _take(self, count: int) -> bytes:
        end = self._at + count
        if end > len(self._view):
            raise ValueError("the header ends past the end of the file (truncated?)")
        data = self._view[self._at:end]
        self._at = end
        return data

    def _scalar(self, fmt: str):
        return struct.unpack(fmt, self._take(struct.calcsize(fmt)))[0]

    def _string(self) -> str:
        return self._take(self._scalar("<Q")).decode("utf-8")

    def _value(self, type_id: int) -> Any:
        if type_id == _STRING:
            return self._string()
        if type_id == _ARRAY:
            element, count = self._scalar("<I"), self._scalar("<Q")
            if element == _STRING:
                return [self._string() for _ in range(count)]
            if element == _ARRAY:
                return [self._value(_ARRAY) for _ in range(count)]
            fmt = self._format(element)
            values = np.frombuffer(self._take(count * struct.calcsize(fmt)), dtype=np.dtype(fmt))
            return values.tolist()
        return self._scalar(self._format(type_id))

    @staticmethod
    def _format(type_id: int) -> str:
        try:
            return _SCALARS[type_id]
        except KeyError:
            raise ValueError(f"unknown GGUF value type {type_id}") from None
