"""The tokenizer a GGUF file describes in its metadata, rebuilt as an HF `tokenizers` tokenizer.json.

A GGUF carries no tokenizer.json: `tokenizer.ggml.model` names the kind, `tokens` / `merges` / `token_type` the
vocabulary, `tokenizer.ggml.pre` how text is split before BPE, and the `*_token_id` / `add_*_token` keys the special
tokens. Ids are those transformers gives when it loads the same file (`AutoTokenizer.from_pretrained(dir,
gguf_file=...)`). Supported:
- `gpt2`: byte-level BPE (GPT-2 / Llama-3 / Qwen2 style), merges from `tokenizer.ggml.merges`;
- `llama`: a SentencePiece BPE vocabulary (Llama-2 / Mistral style) as transformers' LlamaTokenizer reads it:
  byte-fallback BPE, merges recovered from the pieces ranked by `tokenizer.ggml.scores`, Metaspace with a prefix
  space on the first word, BOS added unless the file says `add_bos_token` false (llama.cpp's default too).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from templates.ft_python.ft_checkpoint import CheckpointError

from ..atomic import write_text_atomic
from ..sentencepiece_tokenizer import add_tokens_once, llama_bpe, split_merges

# llama.cpp's token types (`tokenizer.ggml.token_type`).
CONTROL, USER_DEFINED = 3, 4

# How each `tokenizer.ggml.pre` splits text before byte-level BPE. None: GPT-2's own split, which is also what
# transformers applies to SmolLM's "smollm" (a vocabulary with single digits only, so llama.cpp's extra digit
# split changes no id).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS: dict[str, str | None] = {
    "default": None, "gpt2": None, "smollm": None,
    "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT, "falcon3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}
MODELS = ("gpt2", "llama")


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes stand for themselves, the other 68 bytes
    take the characters from U+0100 on, in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in kept}
    extra = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def build(metadata) -> tuple[Tokenizer, dict[str, Any]]:
    """(tokenizer, tokenizer_config.json dict) from the metadata; CheckpointError naming an unsupported
    `tokenizer.ggml.model` or `tokenizer.ggml.pre`."""
    model = metadata.get("tokenizer.ggml.model")
    if model not in MODELS:
        raise CheckpointError(f"GGUF tokenizer.ggml.model {model!r} is not supported (supported: {', '.join(MODELS)})")
    pre = metadata.get("tokenizer.ggml.pre", "default")
    supported_pre = PRE_TOKENIZERS if model == "gpt2" else {"default": None}  # llama.cpp writes "default" for llama
    if pre not in supported_pre:
        raise CheckpointError(f"GGUF tokenizer.ggml.pre {pre!r} is not supported with tokenizer.ggml.model {model!r} "
                              f"(supported: {', '.join(sorted(supported_pre))})")
    tokens: list[str] = list(metadata.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise CheckpointError("GGUF metadata lacks tokenizer.ggml.tokens")
    token_types = list(metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    special = {name: metadata.get(f"tokenizer.ggml.{key}_token_id")
               for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))}
    if model == "gpt2":
        tokenizer = _byte_level_bpe(tokens, list(metadata.get("tokenizer.ggml.merges") or []), token_types,
                                    PRE_TOKENIZERS[pre])
    else:
        scores = metadata.get("tokenizer.ggml.scores")
        if scores is None:
            raise CheckpointError("GGUF tokenizer.ggml.model 'llama' without tokenizer.ggml.scores (needed to rank "
                                  "the merges)")
        tokenizer = _sentencepiece_bpe(tokens, list(scores), token_types,
                                       [tokens[int(index)] for index in special.values() if index is not None])
    # An older llama file has no add_bos_token; llama.cpp (and transformers) then add BOS to a SentencePiece one.
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", model == "llama"))
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
    tokenizer.post_processor = _post_processor(tokens, special["bos"] if add_bos else None,
                                               special["eos"] if add_eos else None)
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        **{f"{name}_token": tokens[int(index)] if index is not None else None for name, index in special.items()},
    }
    template = metadata.get("tokenizer.chat_template")
    if template is not None:
        config["chat_template"] = template
    return tokenizer, config


def _sentencepiece_bpe(tokens: list[str], scores: list[float], token_types: list[int], named: list[str]) -> Tokenizer:
    """transformers' LlamaTokenizer over the file's pieces. The merges are every split of a piece into two pieces,
    ranked best first: higher score of the merged piece, then longer left, then longer right, then piece order (a
    sentencepiece BPE scores its pieces minus their merge order; control, byte and user-defined pieces score 0).
    A repeated token keeps its first place and its last id and score, as a dict built from the list does."""
    if len(scores) != len(tokens):
        raise CheckpointError(f"GGUF tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens")
    vocab = {token: index for index, token in enumerate(tokens)}
    score = dict(zip(tokens, scores))
    pieces = list(score)
    merges = split_merges(pieces, lambda index, left, right: (-score[pieces[index]], -len(left), -len(right), index))
    tokenizer = llama_bpe(vocab, merges)  # transformers ignores tokenizer.ggml.add_space_prefix here
    # Control pieces (<s>, </s>) and the named bos / eos / unk / pad tokens match whole and are special;
    # user-defined ones match whole and are text. Byte, unknown and unused pieces are never matched from text.
    added = [AddedToken(token, normalized=False, special=True)
             for token, kind in zip(tokens, token_types) if kind == CONTROL]
    added += [AddedToken(token, normalized=False, special=False)
              for token, kind in zip(tokens, token_types) if kind == USER_DEFINED]
    added += [AddedToken(token, normalized=False, special=True) for token in named]
    add_tokens_once(tokenizer, added)
    return tokenizer


def _byte_level_bpe(tokens: list[str], merges: list[str], token_types: list[int], split: str | None) -> Tokenizer:
    alphabet = _byte_alphabet()
    letters = set(alphabet.values())

    def spelled(token: str) -> str:
        # A gpt2 vocabulary is stored byte-level spelled; a token in plain text (a space, say) is respelled.
        return token if set(token) <= letters else "".join(alphabet[byte] for byte in token.encode("utf-8"))

    vocab = {spelled(token): index for index, token in enumerate(tokens)}
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    if split is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tokenizer.decoder = decoders.ByteLevel()
    # Control tokens (<|endoftext|>, <|im_start|>, ...) match whole and are special; user-defined ones match whole
    # and are ordinary text. A control token outside the byte alphabet is a mislabel llama.cpp is known to write:
    # left as a vocabulary entry, as transformers does.
    tokenizer.add_special_tokens([AddedToken(token, normalized=False, special=True)
                                  for token, kind in zip(tokens, token_types)
                                  if kind == CONTROL and set(token) <= letters])
    user = [AddedToken(token, normalized=False, special=False)
            for token, kind in zip(tokens, token_types) if kind == USER_DEFINED and spelled(token) == token]
    if user:
        tokenizer.add_tokens(user)
    return tokenizer


def _post_processor(tokens: list[str], bos: int | None, eos: int | None):
    """BOS / EOS around each sequence as the file's add_bos_token / add_eos_token ask (the tokenizer's default),
    with transformers' type ids (the second sequence's specials are type 1)."""
    before = [tokens[bos]] if bos is not None else []
    after = [tokens[eos]] if eos is not None else []
    special = [(tokens[index], int(index)) for index in (bos, eos) if index is not None]
    return processors.TemplateProcessing(
        single=[*before, "$A", *after],
        pair=[*before, "$A", *after, *[f"{token}:1" for token in before], "$B:1", *[f"{token}:1" for token in after]],
        special_tokens=list(dict.fromkeys(special)),
    )


def save(tokenizer: Tokenizer, config: dict[str, Any], directory: Path) -> None:
    write_text_atomic(directory / "tokenizer.json", tokenizer.to_str())
    write_text_atomic(directory / "tokenizer_config.json", json.dumps(config, indent=2))
