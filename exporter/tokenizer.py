"""The checkpoint's own tokenizer, normalised to one `tokenizer.json` (HF tokenizers format) for serving.

Pre/postprocessing load only `tokenizer.json`; a checkpoint that ships GPT-2 style `vocab.json` + `merges.txt`
(and no tokenizer.json) gets one built from them: byte-level BPE, no prefix space, as GPT-2 tokenises; one that
ships only a SentencePiece `tokenizer.model` gets one rebuilt by sentencepiece_tokenizer.py.

Special tokens are decided here, once, at export: the served tokenizer.json adds what the checkpoint's tokenizer adds
when people run `tok(prompt)` with HF transformers (5.24), which
- with a tokenizer.json, keeps its post-processor (Llama-2/3's template puts <s> / <|begin_of_text|> first) and
  ignores tokenizer_config.json's `add_bos_token` / `add_eos_token`;
- without one (GPT-2 style vocab.json + merges.txt, or a SentencePiece tokenizer.model), builds the post-processor
  `[bos] text [eos]` from those two flags (absent = false): OPT's files (add_bos_token: true, bos </s>) put </s>
  first, GPT-2's add nothing, Llama-2's tokenizer.model + tokenizer_config.json put <s> first (built by
  sentencepiece_tokenizer.py).
`SpecialTokens` sets either flag as `from_pretrained(..., add_bos_token=...)` does: the post-processor is then
rebuilt from the flags whatever the files say.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors


SENTENCEPIECE_MODEL = "tokenizer.model"
T5_SENTENCEPIECE_MODEL = "spiece.model"  # T5's name for it: read as transformers' T5Tokenizer (eos appended)


class TokenizerError(ValueError):
    """The checkpoint has no tokenizer the exporter can use."""


@dataclass(frozen=True)
class SpecialTokens:
    """What the served tokenizer adds around a prompt: None = what the checkpoint's tokenizer does by default;
    True/False = as HF's `AutoTokenizer.from_pretrained(checkpoint, add_bos_token=..., add_eos_token=...)`."""

    add_bos_token: bool | None = None
    add_eos_token: bool | None = None


# transformers' defaults for bos/eos when tokenizer_config.json names none, by its `tokenizer_class`.
CLASS_DEFAULT_TOKENS = {
    "GPT2Tokenizer": ("<|endoftext|>", "<|endoftext|>"),
    "GPT2TokenizerFast": ("<|endoftext|>", "<|endoftext|>"),
    "LlamaTokenizer": ("<s>", "</s>"),
    "LlamaTokenizerFast": ("<s>", "</s>"),
    "T5Tokenizer": (None, "</s>"),
    "T5TokenizerFast": (None, "</s>"),
}


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
    if (directory / T5_SENTENCEPIECE_MODEL).is_file():
        _t5_sentencepiece(directory / T5_SENTENCEPIECE_MODEL)
        return directory / T5_SENTENCEPIECE_MODEL
    raise TokenizerError(
        f"no tokenizer in {directory}: expected tokenizer.json, vocab.json + merges.txt (GPT-2 BPE), "
        f"{SENTENCEPIECE_MODEL} (SentencePiece) or {T5_SENTENCEPIECE_MODEL} (T5's SentencePiece)"
    )


def has_tokenizer(directory: Path) -> bool:
    """Whether `directory` holds any file a tokenizer is built from (find_tokenizer checks that it is usable)."""
    return any((Path(directory) / name).is_file()
               for name in ("tokenizer.json", "vocab.json", SENTENCEPIECE_MODEL, T5_SENTENCEPIECE_MODEL))


def load_tokenizer(directory: Path, special_tokens: SpecialTokens = SpecialTokens()) -> Tokenizer:
    """The checkpoint's tokenizer, adding the special tokens its HF tokenizer adds by default (or as overridden)."""
    source = find_tokenizer(directory)
    if source.name == "tokenizer.json":
        tokenizer = Tokenizer.from_file(str(source))
    elif source.name == SENTENCEPIECE_MODEL:
        tokenizer = _sentencepiece(Path(directory))
    elif source.name == T5_SENTENCEPIECE_MODEL:
        tokenizer = _t5_sentencepiece(source)
    else:
        tokenizer = _byte_level_bpe(directory)
    return with_default_special_tokens(tokenizer, directory, special_tokens)


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


def _t5_sentencepiece(model: Path) -> Tokenizer:
    """spiece.model as transformers' T5Tokenizer reads it (sentencepiece_tokenizer.for_t5)."""
    from . import sentencepiece_tokenizer as sentencepiece

    try:
        return sentencepiece.for_t5(model)
    except sentencepiece.SentencePieceError as error:
        raise TokenizerError(str(error)) from None


def _byte_level_bpe(directory: Path) -> Tokenizer:
    directory = Path(directory)
    tokenizer = Tokenizer(models.BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt")))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    # No post-processor, as transformers' GPT2Tokenizer: with_default_special_tokens builds it from the flags.
    special = _special_tokens(directory, tokenizer)
    if special:
        tokenizer.add_special_tokens([AddedToken(token, special=True) for token in special])
    return tokenizer


def _special_tokens(directory: Path, tokenizer: Tokenizer) -> list[str]:
    """Special tokens named by tokenizer_config.json / special_tokens_map.json; GPT-2's <|endoftext|> otherwise,
    when `tokenizer`'s vocabulary has it."""
    found: list[str] = []
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        data = _read_json(directory / name)
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            token = _token_text(data.get(key))
            if token is not None and token not in found:
                found.append(token)
    if not found and tokenizer.token_to_id("<|endoftext|>") is not None:
        found.append("<|endoftext|>")
    return found


def with_default_special_tokens(tokenizer: Tokenizer, directory: Path,
                                special_tokens: SpecialTokens = SpecialTokens()) -> Tokenizer:
    """Set `tokenizer`'s post-processor as transformers does on loading `directory` (see the module docstring)."""
    directory = Path(directory)
    overrides = {key: getattr(special_tokens, key) for key in ("add_bos_token", "add_eos_token")
                 if getattr(special_tokens, key) is not None}
    if not overrides and tokenizer.post_processor is not None:
        # tokenizer.json's own (a template, or GPT-2's ByteLevel), or the one sentencepiece_tokenizer.py built
        # from tokenizer_config.json's flags
        return tokenizer
    config = _read_json(directory / "tokenizer_config.json")
    flags = {} if (directory / "tokenizer.json").is_file() else {
        key: config[key] for key in ("add_bos_token", "add_eos_token") if key in config
    }
    flags.update(overrides)
    add_bos, add_eos = flags.get("add_bos_token", False), flags.get("add_eos_token", False)
    bos, eos = _named_tokens(directory, config)
    template, specials = "$A:0", []
    # [bos] text [eos]; a flag whose token is unknown adds nothing (transformers drops it too), unless overridden.
    for flag, token, override, where in ((add_bos, bos, special_tokens.add_bos_token, "bos"),
                                         (add_eos, eos, special_tokens.add_eos_token, "eos")):
        if not flag:
            continue
        if token is None:
            if override:
                raise TokenizerError(f"add_{where}_token=true, but {directory} names no {where}_token")
            continue
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"{directory}: {where}_token {token!r} is not in the tokenizer's vocabulary")
        template = f"{token}:0 {template}" if where == "bos" else f"{template} {token}:0"
        specials.append((token, token_id))
    tokenizer.post_processor = processors.TemplateProcessing(single=template, special_tokens=specials)
    return tokenizer


def _named_tokens(directory: Path, config: dict) -> tuple[str | None, str | None]:
    """(bos, eos) token texts: tokenizer_config.json, else special_tokens_map.json, else the class's defaults."""
    tokens_map = _read_json(directory / "special_tokens_map.json")
    defaults = CLASS_DEFAULT_TOKENS.get(config.get("tokenizer_class"), (None, None))
    named = []
    for key, default in zip(("bos_token", "eos_token"), defaults):
        token = _token_text(config.get(key))
        named.append(token if token is not None else _token_text(tokens_map.get(key), default))
    return named[0], named[1]


def _token_text(value, default: str | None = None) -> str | None:
    """A special-token entry (a string, or {"content": ...} as transformers saves AddedToken) -> its text."""
    token = value.get("content") if isinstance(value, dict) else value
    return token if isinstance(token, str) else default


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TokenizerError(f"{path} is not readable JSON: {error}") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} holds {type(data).__name__}, expected a JSON object")
    return data


def decodable_vocab_size(tokenizer_json: Path) -> int:
    """How many ids the served tokenizer can decode: one past its largest id, added tokens included."""
    vocab = Tokenizer.from_file(str(tokenizer_json)).get_vocab(with_added_tokens=True)
    if not vocab:
        raise TokenizerError(f"{tokenizer_json} has an empty vocabulary")
    return max(vocab.values()) + 1


class ServedTokenizerJson:
    """The served tokenizer.json, decided once (before a conversion writes anything: `nbytes` is part of the space
    it checks for) and written after the shards: the checkpoint's own file byte for byte when its post-processor
    already adds what `tokenizer`'s does, else `tokenizer` serialised as `Tokenizer.save` writes it (pretty JSON).
    Pre/postprocessing and LAMBADA read it as it is."""

    def __init__(self, tokenizer: Tokenizer, source_dir: Path):
        self.source = Path(source_dir) / "tokenizer.json"
        text: str | None = tokenizer.to_str(pretty=True)
        if self.source.is_file():
            own = json.loads(self.source.read_text(encoding="utf-8")).get("post_processor")
            if own == json.loads(text).get("post_processor"):
                text = None
        self.data = None if text is None else text.encode("utf-8")

    @property
    def nbytes(self) -> int:
        return self.source.stat().st_size if self.data is None else len(self.data)

    def save(self, destination: Path) -> None:
        if self.data is not None:
            Path(destination).write_bytes(self.data)
        elif self.source.resolve() != Path(destination).resolve():
            shutil.copyfile(self.source, destination)


def save_served_tokenizer(tokenizer: Tokenizer, source_dir: Path, destination: Path) -> None:
    """Write the served tokenizer.json (`ServedTokenizerJson`)."""
    ServedTokenizerJson(tokenizer, source_dir).save(destination)
