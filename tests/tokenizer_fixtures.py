"""Tokenizer files as checkpoints ship them, built offline, and tiny seeded models around them.

HF transformers loading these files is the independent reference for what `tok(prompt)` adds:
- a Llama-style byte-level BPE `tokenizer.json` trained here on the LAMBADA text, whose post-processor puts `<s>`
  first (Llama-3's kind: TemplateProcessing in tokenizer.json, `PreTrainedTokenizerFast`), with a
  tokenizer_config.json that may set add_bos_token / add_eos_token as Llama-2's does;
- OPT's files: GPT-2's vocab.json + merges.txt with OPT's special tokens, and its tokenizer_config.json
  (GPT2Tokenizer, add_bos_token: true, bos = eos = unk = `</s>`), so `tok(prompt)` starts with `</s>`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from exporter.config import DATA_DIR
from exporter.evaluate.lambada import read_texts

ROOT = Path(__file__).resolve().parents[1]
LAMBADA = DATA_DIR / "lambada_test.jsonl"  # the vendored copy of the shared LAMBADA test set
GPT2_TOKENIZER = ROOT / "exporter" / "data" / "gpt2-tokenizer"

LLAMA_SPECIALS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2, as Llama-2 has them
OPT_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # OPT's four, appended after GPT-2's 50257 tokens here
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")


def lambada_texts(limit: int | None = None) -> list[str]:
    """The LAMBADA test texts (the first `limit`), as the accuracy stage reads them."""
    return read_texts(LAMBADA, limit)


def train_llama_tokenizer(directory: Path, vocab_size: int = 768) -> Path:
    """`directory/tokenizer.json`: byte-level BPE trained on LAMBADA, post-processor `<s> $A` (seconds, offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(LLAMA_SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(lambada_texts(), trainer=trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]),
    ])
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory


def write_llama_tokenizer_config(directory: Path, **flags) -> Path:
    """tokenizer_config.json as Llama checkpoints have it; `flags`: add_bos_token / add_eos_token (absent: unset)."""
    config = {
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
        "clean_up_tokenization_spaces": False, "model_max_length": 128, "tokenizer_class": "PreTrainedTokenizerFast",
        **flags,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return directory


def write_opt_tokenizer(directory: Path) -> Path:
    """GPT-2's BPE with OPT's special tokens and tokenizer_config.json (add_bos_token: true, bos `</s>`)."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = json.loads((GPT2_TOKENIZER / "vocab.json").read_text(encoding="utf-8"))
    for token in OPT_SPECIALS:
        vocab[token] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    shutil.copy2(GPT2_TOKENIZER / "merges.txt", directory / "merges.txt")
    config = {
        "add_bos_token": True, "add_prefix_space": False, "errors": "replace", "tokenizer_class": "GPT2Tokenizer",
        "bos_token": {"content": "</s>", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False},
        "eos_token": {"content": "</s>", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False},
        "unk_token": {"content": "</s>", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False},
        "pad_token": {"content": "<pad>", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False},
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special_map = {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>"}
    (directory / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
    return directory


def copy_tokenizer(source: Path, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, directory / name)
    return directory


def _ids(directory: Path) -> tuple[int, int, int, int | None]:
    """(vocabulary size, bos id, eos id, pad id) of the tokenizer in `directory`, read by HF transformers."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    return len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id


def build_llama_bos(directory: Path, tokenizer_dir: Path, *, seed: int = 11) -> Path:
    """A tiny seeded Llama whose tokenizer adds `<s>` (tokenizer.json's template and add_bos_token: true)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    copy_tokenizer(tokenizer_dir, directory)
    write_llama_tokenizer_config(directory, add_bos_token=True, add_eos_token=False)
    vocab, bos, eos, _ = _ids(directory)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=96, max_position_embeddings=128,
                         rms_norm_eps=1e-5, initializer_range=0.2, bos_token_id=bos, eos_token_id=eos)
    LlamaForCausalLM(config).eval().save_pretrained(directory)
    return directory


def build_opt_bos(directory: Path, *, seed: int = 12) -> Path:
    """A tiny seeded OPT with OPT's tokenizer files (`</s>` first)."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    write_opt_tokenizer(directory)
    vocab, bos, eos, pad = _ids(directory)
    torch.manual_seed(seed)
    config = OPTConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                       max_position_embeddings=128, word_embed_proj_dim=64, init_std=0.2, bos_token_id=bos,
                       eos_token_id=eos, pad_token_id=pad, dropout=0.0)
    OPTForCausalLM(config).eval().save_pretrained(directory)
    return directory
