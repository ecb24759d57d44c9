"""Read a SentencePiece `tokenizer.model` (a serialized `sentencepiece.ModelProto`) with protobuf alone.

The schema below declares only the fields the tokenizer builder reads, with the field numbers and proto2 defaults
of sentencepiece's `sentencepiece_model.proto`; every other field is skipped as unknown. It lives in a private
descriptor pool, so it neither clashes with nor depends on the generated module the `sentencepiece` package ships
(sentencepiece 0.2.3's module needs protobuf >= 7, which tritonclient excludes).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

# ModelProto.SentencePiece.Type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# TrainerSpec.ModelType
MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}

_FIELD = descriptor_pb2.FieldDescriptorProto
# (name, number, type, default or None); all optional
_TRAINER_FIELDS = (
    ("model_type", 3, _FIELD.TYPE_INT32, "1"),  # an enum in sentencepiece: int32 has the same wire format
    ("treat_whitespace_as_suffix", 24, _FIELD.TYPE_BOOL, "false"),
    ("byte_fallback", 35, _FIELD.TYPE_BOOL, "false"),
    ("unk_id", 40, _FIELD.TYPE_INT32, "0"),
    ("bos_id", 41, _FIELD.TYPE_INT32, "1"),
    ("eos_id", 42, _FIELD.TYPE_INT32, "2"),
    ("pad_id", 43, _FIELD.TYPE_INT32, "-1"),
    ("unk_surface", 44, _FIELD.TYPE_STRING, " \u2047 "),
)
_NORMALIZER_FIELDS = (
    ("name", 1, _FIELD.TYPE_STRING, None),
    ("precompiled_charsmap", 2, _FIELD.TYPE_BYTES, None),
    ("add_dummy_prefix", 3, _FIELD.TYPE_BOOL, "true"),
    ("remove_extra_whitespaces", 4, _FIELD.TYPE_BOOL, "true"),
    ("escape_whitespaces", 5, _FIELD.TYPE_BOOL, "true"),
)
_PIECE_FIELDS = (
    ("piece", 1, _FIELD.TYPE_STRING, None),
    ("score", 2, _FIELD.TYPE_FLOAT, None),
    ("type", 3, _FIELD.TYPE_INT32, "1"),
)


def _message(file: descriptor_pb2.FileDescriptorProto, name: str, fields) -> descriptor_pb2.DescriptorProto:
    message = file.message_type.add(name=name)
    for field_name, number, kind, default in fields:
        field = message.field.add(name=field_name, number=number, type=kind, label=_FIELD.LABEL_OPTIONAL)
        if default is not None:
            field.default_value = default
    return message


@lru_cache(maxsize=1)
def _model_class():
    file = descriptor_pb2.FileDescriptorProto(name="exporter_sentencepiece_model.proto",
                                              package="exporter_sentencepiece", syntax="proto2")
    _message(file, "SentencePiece", _PIECE_FIELDS)
    _message(file, "TrainerSpec", _TRAINER_FIELDS)
    _message(file, "NormalizerSpec", _NORMALIZER_FIELDS)
    model = file.message_type.add(name="ModelProto")
    for name, number, type_name, label in (("pieces", 1, "SentencePiece", _FIELD.LABEL_REPEATED),
                                           ("trainer_spec", 2, "TrainerSpec", _FIELD.LABEL_OPTIONAL),
                                           ("normalizer_spec", 3, "NormalizerSpec", _FIELD.LABEL_OPTIONAL)):
        model.field.add(name=name, number=number, type=_FIELD.TYPE_MESSAGE, label=label,
                        type_name=f".exporter_sentencepiece.{type_name}")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("exporter_sentencepiece.ModelProto"))


def read_model(path: Path):
    """The parsed ModelProto of `path` (pieces, trainer_spec, normalizer_spec); ValueError when it is not one."""
    model = _model_class()()
    try:
        model.ParseFromString(Path(path).read_bytes())
    except DecodeError as error:
        raise ValueError(f"{path} is not a SentencePiece model: {error}") from None
    if not model.pieces:
        raise ValueError(f"{path} is not a SentencePiece model: it holds no pieces")
    return model
