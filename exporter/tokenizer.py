"""The checkpoint's own tokenizer, normalised to one `tokenizer.json` (HF tokenizers format) for serving.

Pre/postprocessing load only `tokenizer.json`; a checkpoint that ships GPT-2 style `vocab.json` + `merges.txt`
(and no tokenizer.json) gets one built from them: byte-level BPE, no prefix space, as GPT-2 tokenises; one that
ships only a SentencePiece `tokenizer.model` gets one rebuilt by sentencepiece_tokenizer.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors


SENTENCEPIECE_MODEL = "tokenizer.model"


class TokenizerError(ValueError):
    """The checkpoint has no tokenizer the exporter can use."""


def find_tokenizer(directory: Path) -> Path:
    """The file(s) a tokenizer will be built from; raises before any export work when there is none."""
    directory = Path(directory)
    if (directory / "tokenizer.json").is_file():
        return directory / "tokenizer.json"
    if (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        return directory / "vocab.json"
    if (directory / SENTENCEPIECE_MODEL).is_file():
        _sentencepiece(directory, check_only=True)
        return directory / SENTENCEPIECE_MODEL
    raise TokenizerError(
        f"no tokenizer in {directory}: expected tokenizer.json, vocab.json + merges.txt (GPT-2 BPE), or "
        f"{SENTENCEPIECE_MODEL} (SentencePiece)"
    )


def load_tokenizer(directory: Path) -> Tokenizer:
    source = find_tokenizer(directory)
    if source.name == "tokenizer.json":
        return Tokenizer.from_file(str(source))
    if source.name == SENTENCEPIECE_MODEL:
        return _sentencepiece(Path(directory))
    return _byte_level_bpe(directory)


def _sentencepiece(directory: Path, check_only: bool = False) -> Tokenizer | None:
    """tokenizer.model rebuilt as its users tokenise: a staged NeMo checkpoint (model_config.yaml beside it) as
    sentencepiece encodes (NeMo's SentencePieceTokenizer), an HF checkpoint as transformers' AutoTokenizer does."""
    from . import sentencepiece_tokenizer as sentencepiece
    from .readers.nemo_archive import CONFIG_NAME, origin_of

    model = directory / SENTENCEPIECE_MODEL
    nemo = (directory / CONFIG_NAME).is_file()
    try:
        if check_only:
            (sentencepiece.check_as_sentencepiece if nemo else sentencepiece.check_for_transformers)(model)
            return None
        return (sentencepiece.as_sentencepiece if nemo else sentencepiece.for_transformers)(model)
    except sentencepiece.SentencePieceError as error:
        # a staged NeMo checkpoint is a temporary directory: name the user's .nemo instead
        raise TokenizerError(str(error).replace(str(directory), origin_of(directory)) if nemo else str(error)) from None


def _byte_level_bpe(directory: Path) -> Tokenizer:
    directory = Path(directory)
    tokenizer = Tokenizer(models.BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt")))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    special = _special_tokens(directory)
    if special:
        tokenizer.add_special_tokens([AddedToken(token, special=True) for token in special])
    return tokenizer


def _special_tokens(directory: Path) -> list[str]:
    """Special tokens named by tokenizer_config.json / special_tokens_map.json; GPT-2's <|endoftext|> otherwise."""
    found: list[str] = []
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = directory / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = data.get(key)
            token = value.get("content") if isinstance(value, dict) else value
            if isinstance(token, str) and token not in found:
                found.append(token)
    if not found:
        vocab = json.loads((directory / "vocab.json").read_text())
        if "<|endoftext|>" in vocab:
            found.append("<|endoftext|>")
    return found


def save_tokenizer_json(source_dir: Path, destination: Path) -> None:
    load_tokenizer(source_dir).save(str(destination))


def decodable_vocab_size(tokenizer_json: Path) -> int:
    """How many ids the served tokenizer can decode: one past its largest id, added tokens included."""
    vocab = Tokenizer.from_file(str(tokenizer_json)).get_vocab(with_added_tokens=True)
    if not vocab:
        raise TokenizerError(f"{tokenizer_json} has an empty vocabulary")
    return max(vocab.values()) + 1
