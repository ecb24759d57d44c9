"""Tiny GGUF files written with `gguf.GGUFWriter` as llama.cpp's converter writes them, from a tiny seeded HF Llama.

Names, shapes (innermost dimension first) and the q/k row permutation follow llama.cpp's `convert_hf_to_gguf.py`;
the tokenizer is a tiny byte-level BPE trained on LAMBADA with `tokenizers` ("gpt2"), or a tiny SentencePiece BPE
trained on LAMBADA with `sentencepiece`, its pieces, scores and token types written as llama.cpp writes a Llama
`tokenizer.model` ("llama"). Types gguf-py can quantise are
quantised from the weights; the K-quants it cannot write get valid blocks of seeded random bytes (with small finite
scales), so the reader and transformers de-quantise the very same bytes.
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import numpy as np

from tokenizer_fixtures import lambada_texts


HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, LAYERS = 256, 256, 4, 2, 2  # rows of 256: whole K-quant blocks
# Each K-quant: its block size, the byte offsets of its fp16 super-block scales (ggml's block_q*_K structs), and the
# largest |sub-block scale x quant| its bytes can give (so scales of 0.2 / that keep weights under ~0.2 and the
# logits of the size other fixtures have).
K_BLOCKS = {"Q2_K": (84, (80, 82), 15 * 3), "Q3_K": (110, (108,), 32 * 4), "Q4_K": (144, (0, 2), 63 * 15),
            "Q5_K": (176, (0, 2), 63 * 31), "Q6_K": (210, (208,), 128 * 32)}


def train_tokenizer(vocab_size: int = 400, lines: int = 800):
    """A byte-level BPE trained on the first LAMBADA lines, <|endoftext|> first: (tokens by id, merges)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    texts = lambada_texts(lines)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    model = json.loads(tokenizer.to_str())["model"]
    tokens = [token for token, _ in sorted(model["vocab"].items(), key=lambda item: item[1])]
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model["merges"]]
    return tokens, merges


# llama.cpp's token types (gguf-py's `TokenType`)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
USER_SYMBOL = "<sep>"  # a user-defined piece: matched whole in text, an ordinary (not special) token
PADDING_PIECES = 2  # "[PAD1]", "[PAD2]": llama.cpp pads the vocabulary to config.json's vocab_size with these


@functools.lru_cache(maxsize=1)
def train_sentencepiece(vocab_size: int = 1000) -> tuple[list[str], list[float], list[int]]:
    """A Llama-like SentencePiece BPE (byte fallback, digits split, whitespace kept) trained on the LAMBADA text,
    read as llama.cpp's converter reads a tokenizer.model: (tokens, scores, token types), padded with unused
    pieces of score -1000."""
    import sentencepiece

    texts = lambada_texts()
    with tempfile.TemporaryDirectory() as directory:
        corpus = Path(directory) / "lambada.txt"
        corpus.write_text("\n".join(texts) + "\n", encoding="utf-8")
        sentencepiece.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(Path(directory) / "bpe"), model_type="bpe", vocab_size=vocab_size,
            byte_fallback=True, split_digits=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, character_coverage=0.999,
            user_defined_symbols=[USER_SYMBOL], num_threads=2, minloglevel=2)
        model = sentencepiece.SentencePieceProcessor(model_file=str(Path(directory) / "bpe.model"))
    tokens, scores, types = [], [], []
    for index in range(model.get_piece_size()):
        tokens.append(model.id_to_piece(index))
        scores.append(model.get_score(index))
        kind = NORMAL
        if model.is_unknown(index):
            kind = UNKNOWN
        elif model.is_control(index):
            kind = CONTROL
        elif model.is_unused(index):
            kind = UNUSED
        elif model.is_byte(index):
            kind = BYTE
        elif tokens[-1] == USER_SYMBOL:
            kind = USER_DEFINED
        types.append(kind)
    for number in range(1, PADDING_PIECES + 1):
        tokens.append(f"[PAD{number}]")
        scores.append(-1000.0)
        types.append(UNUSED)
    return tokens, scores, types


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter: per head, rotary halves -> interleaved pairs (rows [heads, 2, d/2] -> [heads, d/2, 2])."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape)


def _encode(values: np.ndarray, kind: str, rng: np.random.Generator):
    """(bytes or values to store, GGMLQuantizationType) of a 2-D weight in `kind`."""
    from gguf import GGMLQuantizationType, quants

    qtype = GGMLQuantizationType[kind]
    if kind in K_BLOCKS:
        block_bytes, scale_offsets, largest = K_BLOCKS[kind]
        rows, columns = values.shape
        blocks = rng.integers(0, 256, size=(rows * columns // 256, block_bytes), dtype=np.uint8)
        for offset in scale_offsets:
            scale = (rng.uniform(0.05, 0.2, size=blocks.shape[0]) / largest).astype(np.float16)
            blocks[:, offset:offset + 2] = scale.view(np.uint8).reshape(-1, 2)
        return blocks.reshape(rows, -1), qtype
    return quants.quantize(values.astype(np.float32), qtype), qtype


def write_gguf(path: Path, kind: str = "Q8_0", *, seed: int = 7, tied: bool = False, architecture: str = "llama",
               tokenizer_model: str = "gpt2", pre: str | None = None, add_bos: bool | None = True,
               add_eos: bool | None = None, vocabulary: tuple[list, list, list] | None = None,
               name: str | None = None, hf_dir: Path | None = None) -> Path:
    """A tiny Llama GGUF whose 2-D weights are stored in `kind` (norms stay F32, as llama.cpp keeps them); with
    `hf_dir`, the HF model it was written from is saved there too (the norms with the file's noise).
    `tokenizer_model` "llama" writes the SentencePiece vocabulary (pre "default", as llama.cpp does; "gpt2": pre
    "smollm"); `add_bos` / `add_eos` None leave that key out; `vocabulary` (tokens, scores or None, token types)
    replaces the trained one; `name` is general.name. `architecture` "qwen2" writes a Qwen2 as llama.cpp does: q/k/v
    biases (noisy), q/k rows not permuted (llama.cpp runs qwen2 with NeoX rotary, HF's layout)."""
    import torch
    from gguf import GGUFWriter
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if tokenizer_model == "llama":
        tokens, scores, token_types = vocabulary or train_sentencepiece()
        merges, pre = [], pre or "default"
    else:
        tokens, merges = train_tokenizer()
        pre = pre or "smollm"
        scores, token_types = None, [CONTROL] + [NORMAL] * (len(tokens) - 1)  # <|endoftext|> is a control token
    torch.manual_seed(seed)
    qwen2 = architecture == "qwen2"
    config = (Qwen2Config if qwen2 else LlamaConfig)(
        vocab_size=len(tokens), hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_theta=50000.0, tie_word_embeddings=tied, initializer_range=0.05)
    model = (Qwen2ForCausalLM if qwen2 else LlamaForCausalLM)(config).eval()
    state = {name: tensor.detach().numpy() for name, tensor in model.state_dict().items()}
    rng = np.random.default_rng(seed)

    writer = GGUFWriter(str(path), architecture)
    if name is not None:
        writer.add_name(name)
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(50000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    if scores is not None:
        writer.add_token_scores(scores)
    writer.add_token_types(token_types)
    if merges:
        writer.add_token_merges(merges)
    if tokenizer_model == "llama":  # sentencepiece's <unk>, <s>, </s>
        writer.add_unk_token_id(0)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
    else:
        writer.add_bos_token_id(0)
        writer.add_eos_token_id(0)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    if add_eos is not None:
        writer.add_add_eos_token(add_eos)

    def add(name: str, values: np.ndarray) -> None:
        if values.ndim == 1:
            writer.add_tensor(name, values.astype(np.float32))
            return
        data, qtype = _encode(values, kind, rng)
        writer.add_tensor(name, data, raw_dtype=qtype)

    # Norm weights and biases noisy, so a wrong mapping of any tensor changes the logits.
    noisy = {key: values + rng.normal(0, 0.2, size=values.shape).astype(np.float32)
             for key, values in state.items() if "norm" in key or key.endswith(".bias")}
    permute = _permute if not qwen2 else lambda weights, heads: weights
    add("token_embd.weight", state["model.embed_tokens.weight"])
    add("output_norm.weight", noisy["model.norm.weight"])
    if not tied:
        add("output.weight", state["lm_head.weight"])
    for i in range(LAYERS):
        hf = lambda part: state[f"model.layers.{i}.{part}.weight"]  # noqa: E731
        add(f"blk.{i}.attn_norm.weight", noisy[f"model.layers.{i}.input_layernorm.weight"])
        add(f"blk.{i}.attn_q.weight", permute(hf("self_attn.q_proj"), HEADS))
        add(f"blk.{i}.attn_k.weight", permute(hf("self_attn.k_proj"), KV_HEADS))
        add(f"blk.{i}.attn_v.weight", hf("self_attn.v_proj"))
        for part in ("q", "k", "v") if qwen2 else ():
            add(f"blk.{i}.attn_{part}.bias", noisy[f"model.layers.{i}.self_attn.{part}_proj.bias"])
        add(f"blk.{i}.attn_output.weight", hf("self_attn.o_proj"))
        add(f"blk.{i}.ffn_norm.weight", noisy[f"model.layers.{i}.post_attention_layernorm.weight"])
        add(f"blk.{i}.ffn_gate.weight", hf("mlp.gate_proj"))
        add(f"blk.{i}.ffn_up.weight", hf("mlp.up_proj"))
        add(f"blk.{i}.ffn_down.weight", hf("mlp.down_proj"))
    if hf_dir is not None:
        with torch.no_grad():
            for key, tensor in model.state_dict().items():
                if key in noisy:
                    tensor.copy_(torch.from_numpy(noisy[key]))
        model.save_pretrained(hf_dir)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
