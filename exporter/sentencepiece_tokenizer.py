"""A SentencePiece `tokenizer.model` rebuilt as an HF `tokenizers` Tokenizer, so serving needs only tokenizer.json.

Two readings of the same file, because its users tokenise it differently:

- `for_transformers`: an HF checkpoint, tokenised as transformers' `LlamaTokenizer` builds it from tokenizer.model
  (the class AutoTokenizer picks for Llama-style checkpoints): byte-fallback BPE over every piece, merges ranked by
  the merged piece's id, no normalizer (the model's own charsmap is ignored, as transformers ignores it), a
  Metaspace pre-tokenizer whose prefix follows tokenizer_config.json `legacy` / `add_prefix_space`, the added tokens
  and `add_bos_token` / `add_eos_token` of tokenizer_config.json in the post-processor.
- `as_sentencepiece`: as sentencepiece's own `encode` does (NeMo's SentencePieceTokenizer calls it, no BOS/EOS):
  the model's normalizer (precompiled charsmap, extra whitespace removed, dummy prefix, spaces escaped as U+2581),
  then the Unigram lattice or the BPE merges over the whole normalized text. Control, unknown, unused and byte
  pieces are never matched from text (sentencepiece keeps them out of its lattice): in a Unigram model they get a
  score nothing would pick, and they are no added tokens, so a literal "</s>" in a prompt stays text. Decoding
  drops control pieces and writes the unknown piece as sentencepiece's `unk_surface` (" ⁇ ").

Unigram and BPE models are rebuilt; word and char models (and `treat_whitespace_as_suffix`) are refused.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from .sentencepiece_model import BYTE, CONTROL, MODEL_TYPES, NORMAL, USER_DEFINED, read_model

SPACE = "\u2581"  # sentencepiece's escaped space
# transformers' classes that read tokenizer.model as LlamaTokenizer does (None: tokenizer_config.json names none)
LLAMA_CLASSES = (None, "LlamaTokenizer", "LlamaTokenizerFast", "CodeLlamaTokenizer", "CodeLlamaTokenizerFast")
REBUILT_TYPES = ("unigram", "bpe")


class SentencePieceError(ValueError):
    """A tokenizer.model that cannot be served with the ids its users get."""


def _model(path: Path):
    try:
        model = read_model(path)
    except ValueError as error:
        raise SentencePieceError(str(error)) from None
    model_type = MODEL_TYPES.get(model.trainer_spec.model_type, f"type {model.trainer_spec.model_type}")
    if model_type not in REBUILT_TYPES:
        raise SentencePieceError(f"{path}: a SentencePiece {model_type} model; supported: {', '.join(REBUILT_TYPES)}")
    if model.trainer_spec.treat_whitespace_as_suffix:
        raise SentencePieceError(f"{path}: treat_whitespace_as_suffix is set; supported: whitespace as a prefix")
    return model, model_type


def split_merges(pieces: list[str], rank) -> list[tuple[str, str]]:
    """BPE merges (left, right) for every piece that splits into two pieces, ordered by
    `rank(index, left, right)` (a sort key; None leaves that piece out). `pieces` are unique."""
    known = set(pieces)
    ranked = []
    for index, piece in enumerate(pieces):
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in known and right in known:
                key = rank(index, left, right)
                if key is not None:
                    ranked.append((key, left, right))
    ranked.sort(key=lambda entry: entry[0])
    return [(left, right) for _, left, right in ranked]


def _merges(model, pieces: list[str]) -> list[tuple[str, str]]:
    """The merges of every normal piece, ranked as transformers ranks them from tokenizer.model: by the merged
    piece's id (sentencepiece gives earlier BPE pieces higher scores), then the lengths of left and right."""
    mergeable = [entry.type in (NORMAL, USER_DEFINED) for entry in model.pieces]
    return split_merges(pieces, lambda index, left, right: (index, len(left), len(right)) if mergeable[index]
                        else None)


def _pieces(model, path: Path) -> list[str]:
    pieces = [entry.piece for entry in model.pieces]
    if len(set(pieces)) != len(pieces):
        raise SentencePieceError(f"{path}: the SentencePiece model repeats a piece; supported: unique pieces")
    return pieces


# -- as transformers reads it ------------------------------------------------------------------------------------
def _config(directory: Path) -> dict:
    path = directory / "tokenizer_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def check_for_transformers(model_path: Path) -> None:
    """Raise before any export work when `for_transformers` cannot rebuild this tokenizer."""
    model_path = Path(model_path)
    tokenizer_class = _config(model_path.parent).get("tokenizer_class")
    if tokenizer_class not in LLAMA_CLASSES:
        raise SentencePieceError(f"{model_path.parent}: tokenizer_config.json tokenizer_class {tokenizer_class!r} "
                                 f"with only tokenizer.model; supported: {', '.join(LLAMA_CLASSES[1:])}")
    _, model_type = _model(model_path)
    if model_type != "bpe":
        raise SentencePieceError(f"{model_path}: a SentencePiece {model_type} model under "
                                 f"{tokenizer_class or 'a Llama'} tokenizer; supported: bpe (transformers reads it "
                                 "as byte-fallback BPE)")


def for_transformers(model_path: Path) -> Tokenizer:
    """The tokenizer transformers' AutoTokenizer builds from tokenizer.model + tokenizer_config.json."""
    model_path = Path(model_path)
    check_for_transformers(model_path)
    model, _ = _model(model_path)
    config = _config(model_path.parent)
    pieces = _pieces(model, model_path)
    vocab = {piece: index for index, piece in enumerate(pieces)}
    add_prefix_space = config.get("add_prefix_space")
    tokenizer = llama_bpe(vocab, _merges(model, pieces), True if add_prefix_space is None else bool(add_prefix_space),
                          bool(config.get("legacy", False)))

    trainer = model.trainer_spec
    named = {key: _token_text(config.get(f"{key}_token")) for key in ("unk", "bos", "eos", "pad")}
    for key, index in (("unk", trainer.unk_id), ("bos", trainer.bos_id), ("eos", trainer.eos_id)):
        if named[key] is None and index >= 0:
            named[key] = pieces[index]
    added = [AddedToken(entry.piece, special=entry.type == CONTROL, normalized=False)
             for entry in model.pieces if entry.type in (CONTROL, USER_DEFINED)]
    added += [AddedToken(token, special=True, normalized=False) for token in named.values() if token]
    for _, entry in sorted((config.get("added_tokens_decoder") or {}).items(), key=lambda item: int(item[0])):
        token = AddedToken(entry["content"], special=entry.get("special", False),
                           normalized=entry.get("normalized", False), lstrip=entry.get("lstrip", False),
                           rstrip=entry.get("rstrip", False), single_word=entry.get("single_word", False))
        added.append(token)
    add_tokens_once(tokenizer, added)
    _check_added_ids(tokenizer, config, model_path)

    # transformers 5 adds neither unless tokenizer_config.json asks (Llama-2's file sets add_bos_token: true)
    bos = named["bos"] if config.get("add_bos_token", False) else None
    eos = named["eos"] if config.get("add_eos_token", False) else None
    tokenizer.post_processor = _template(tokenizer, bos, eos)
    return tokenizer


def llama_bpe(vocab: dict[str, int], merges: list[tuple[str, str]], add_prefix_space: bool = True,
              legacy: bool = False) -> Tokenizer:
    """transformers' LlamaTokenizer without its added tokens and post-processor: byte-fallback BPE (no unk token:
    a character with neither a piece nor a byte piece is dropped), no normalizer, a Metaspace pre-tokenizer whose
    prefix follows `add_prefix_space` / `legacy`, and the decoder that undoes both."""
    tokenizer = Tokenizer(models.BPE(vocab, merges, fuse_unk=True, byte_fallback=True))
    prepend = ("always" if legacy else "first") if add_prefix_space else "never"
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme=prepend, split=False)
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def add_tokens_once(tokenizer: Tokenizer, tokens: list[AddedToken]) -> None:
    """Add each token once (the last flags given win): special ones as special tokens, the others as added text."""
    unique: dict[str, AddedToken] = {}
    for token in tokens:
        unique[token.content] = token
    for token in unique.values():
        (tokenizer.add_special_tokens if token.special else tokenizer.add_tokens)([token])


def _check_added_ids(tokenizer: Tokenizer, config: dict, model_path: Path) -> None:
    """The ids tokenizer_config.json states for its added tokens are the ones they got."""
    for index, entry in (config.get("added_tokens_decoder") or {}).items():
        if tokenizer.token_to_id(entry["content"]) != int(index):
            raise SentencePieceError(f"{model_path.parent}: tokenizer_config.json gives {entry['content']!r} id "
                                     f"{index}, but tokenizer.model ({tokenizer.get_vocab_size()} pieces with the "
                                     f"added tokens) gives it {tokenizer.token_to_id(entry['content'])}")


def _template(tokenizer: Tokenizer, bos: str | None, eos: str | None):
    """BOS / EOS around each sequence, as transformers' LlamaTokenizer adds them."""
    single, pair, special = ["$A:0"], ["$A:0"], []
    if bos:
        single, pair = [f"{bos}:0", *single], [f"{bos}:0", *pair]
        special.append((bos, tokenizer.token_to_id(bos)))
    if eos:
        single, pair = [*single, f"{eos}:0"], [*pair, f"{eos}:0"]
        if eos != bos:
            special.append((eos, tokenizer.token_to_id(eos)))
    pair += [f"{bos}:1"] if bos else []
    pair += ["$B:1"] + ([f"{eos}:1"] if eos else [])
    return processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair), special_tokens=special)


# -- as transformers' T5Tokenizer reads spiece.model ---------------------------------------------------------------
T5_DEFAULT_EXTRA_IDS = 100  # transformers' T5Tokenizer default: <extra_id_0..99> after the pieces


def for_t5(model_path: Path) -> Tokenizer:
    """The tokenizer transformers (5.24) builds as `T5Tokenizer.from_pretrained(dir)` from spiece.model alone: the
    Unigram pieces with their scores (unknown = piece unk_id), the model's precompiled charsmap as the only
    normalizer, whitespace split + Metaspace (a U+2581 before every word) as pre-tokenizer, `$A </s>` (eos appended,
    no bos) as post-processor, and the sentinels <extra_id_{n-1}> .. <extra_id_0> as special tokens after the pieces
    (n = tokenizer_config.json `extra_ids`, default 100), so <extra_id_0> is the last id."""
    model_path = Path(model_path)
    model, model_type = _model(model_path)
    if model_type != "unigram":
        raise SentencePieceError(f"{model_path}: a SentencePiece {model_type} model under a T5 tokenizer; "
                                 "supported: unigram (T5's spiece.model)")
    config = _config(model_path.parent)
    pieces = _pieces(model, model_path)
    trainer = model.trainer_spec
    tokenizer = Tokenizer(models.Unigram([(entry.piece, entry.score) for entry in model.pieces], trainer.unk_id,
                                         False))
    if model.normalizer_spec.precompiled_charsmap:
        tokenizer.normalizer = normalizers.Precompiled(model.normalizer_spec.precompiled_charsmap)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always", split=True)])
    tokenizer.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="always", split=True)
    extra_ids = int(config.get("extra_ids", T5_DEFAULT_EXTRA_IDS))
    named = {key: _token_text(config.get(f"{key}_token")) or default
             for key, default in (("pad", "<pad>"), ("eos", "</s>"), ("unk", "<unk>"))}
    for key, token in named.items():
        if token not in pieces:
            raise SentencePieceError(f"{model_path}: {key}_token {token!r} is not a piece of the model")
    add_tokens_once(tokenizer, [AddedToken(named[key], special=True, normalized=False) for key in ("pad", "eos", "unk")]
                    + [AddedToken(f"<extra_id_{index}>", special=True, normalized=False)
                       for index in reversed(range(extra_ids))])
    _check_added_ids(tokenizer, config, model_path)
    tokenizer.post_processor = _template(tokenizer, None, named["eos"])
    return tokenizer


# -- as sentencepiece encodes it ---------------------------------------------------------------------------------
def check_as_sentencepiece(model_path: Path) -> None:
    """Raise before any export work when `as_sentencepiece` cannot rebuild this tokenizer."""
    _model(Path(model_path))


def as_sentencepiece(model_path: Path) -> Tokenizer:
    """The tokenizer that gives sentencepiece's `encode(text)` ids (no BOS / EOS) and its `decode`."""
    model, model_type = _model(Path(model_path))
    pieces = _pieces(model, model_path)
    trainer, spec = model.trainer_spec, model.normalizer_spec
    unknown = pieces[trainer.unk_id] if 0 <= trainer.unk_id < len(pieces) else None
    if model_type == "unigram":
        # The lowest normal score keeps tokenizers' unknown-character penalty (lowest score - 10) at sentencepiece's.
        lowest = min((entry.score for entry in model.pieces if entry.type == NORMAL), default=0.0)
        scored = [(entry.piece, entry.score if entry.type in (NORMAL, USER_DEFINED) else lowest)
                  for entry in model.pieces]
        tokenizer = Tokenizer(models.Unigram(scored, trainer.unk_id if unknown else None, trainer.byte_fallback))
    else:
        vocab = {piece: index for index, piece in enumerate(pieces)}
        tokenizer = Tokenizer(models.BPE(vocab, _merges(model, pieces), unk_token=unknown, fuse_unk=True,
                                         byte_fallback=trainer.byte_fallback))
    tokenizer.normalizer = _normalizer(spec)
    user_defined = [AddedToken(entry.piece, normalized=True) for entry in model.pieces if entry.type == USER_DEFINED]
    if user_defined:
        tokenizer.add_tokens(user_defined)  # sentencepiece matches them in the normalized text before anything else

    steps = []
    for entry in model.pieces:
        if entry.type == CONTROL:
            steps.append(decoders.Replace(entry.piece, ""))  # invisible, as sentencepiece decodes them
    if unknown:
        steps.append(decoders.Replace(unknown, trainer.unk_surface))
    steps.append(decoders.Replace(SPACE, " "))
    if any(entry.type == BYTE for entry in model.pieces):
        steps.append(decoders.ByteFallback())
    steps.append(decoders.Fuse())
    if spec.add_dummy_prefix:
        # sentencepiece removes the dummy prefix of the first piece (an unknown first piece keeps its space there,
        # not here: the one place the two decodings differ)
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def _normalizer(spec):
    """sentencepiece's normalizer: charsmap, then (remove_extra_whitespaces) spaces trimmed at both ends and runs
    of spaces collapsed, (add_dummy_prefix) one space in front of non-empty text, (escape_whitespaces) spaces as
    U+2581."""
    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(" "))
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", SPACE))
    return normalizers.Sequence(steps) if steps else None


def end_of_text_ids(model_path: Path) -> tuple[int | None, int | None]:
    """(bos id, eos id) of the model; None where it defines none."""
    trainer = _model(Path(model_path))[0].trainer_spec
    return (trainer.bos_id if trainer.bos_id >= 0 else None, trainer.eos_id if trainer.eos_id >= 0 else None)


__all__ = ["SentencePieceError", "add_tokens_once", "as_sentencepiece", "check_as_sentencepiece",
           "check_for_transformers", "end_of_text_ids", "for_t5", "for_transformers", "llama_bpe", "split_merges"]
