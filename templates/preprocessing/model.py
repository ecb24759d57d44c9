"""Triton python-backend model `preprocessing`: prompt strings -> padded token ids.

Self-contained: runs inside a generated model repository with only numpy, tokenizers and
triton_python_backend_utils available. Tokenizer: `tokenizer/tokenizer.json` next to this file.

inputs : QUERY              BYTES  [B, 1]  utf-8 prompt per row
         REQUEST_OUTPUT_LEN UINT32 [B, 1]  optional: passed through; absent: the model's default per row
         BAD_WORDS_DICT     BYTES  [B, 1]  optional: comma-separated words (CSV, quotes allowed) never to generate
         STOP_WORDS_DICT    BYTES  [B, 1]  optional: comma-separated words that end a row's generation
         PROMPT_TASK_NAME   BYTES  [B, 1]  optional, with prompt-learning tasks only: the row's task ('' = none)
outputs: INPUT_ID           UINT32 [B, Lmax]  right-padded with end_id
         REQUEST_INPUT_LEN  UINT32 [B, 1]     real lengths
         BAD_WORDS_IDS      INT32  [B, 2, W]  FT's word-list format (see word_list), also when no words are given
         STOP_WORDS_IDS     INT32  [B, 2, W]
         REQUEST_OUTPUT_LEN UINT32 [B, 1]
         PROMPT_TASK_ID     UINT32 [B, 1]     with prompt-learning tasks only: the task's id, 2^32 - 1 = none
A prompt is encoded with the special tokens tokenizer.json's post-processor adds (as HF's `tok(prompt)`); stop and
bad words without them.
Config parameters (string_value): `end_id`, the pad / end token id; `max_new_tokens` and `max_length`, the
checkpoint's generation_config.json values (each absent when it has none); `max_pos_seq_len`, the model's context
length (config.ini). They size the output of a request that leaves REQUEST_OUTPUT_LEN out: see output_lengths.
`prompt_tasks` ("name:prompt_length,..." in task-id order) and `prompt_learning_start_id`: FT's p/prompt tuning; a
row naming a task gets its virtual ids (start, start + 1, ..., start + prompt_length - 1) before the prompt's ids, as
FT's backend expects them inside input_ids, counted in REQUEST_INPUT_LEN.
A bad request (empty, not utf-8, mismatched batch) gets its own error response; the others are unaffected.
"""

import csv
import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# tokenizer_model.py is copied next to this file.
from tokenizer_model import (  # noqa: E402
    RequestError, config_parameter, int_parameter, load_tokenizer_and_end_id, respond_each)


def as_text(item, name, row):
    """One BYTES element (bytes or str) -> str; a RequestError naming `name[row]` if it is not utf-8 text."""
    if isinstance(item, (bytes, np.bytes_)):
        try:
            return bytes(item).decode("utf-8")
        except UnicodeDecodeError as e:
            raise RequestError(f"{name}[{row}] is not valid utf-8: {e}") from None
    if not isinstance(item, str):
        raise RequestError(f"{name}[{row}] is not a string (got {type(item).__name__})")
    return item


def decode_queries(query):
    """QUERY [B, 1] object/bytes array -> list of B python strings."""
    query = np.asarray(query)
    if query.ndim == 1:
        query = query.reshape(-1, 1)
    if query.ndim != 2 or query.shape[1] != 1:
        raise RequestError(f"QUERY must have shape [batch, 1], got {list(query.shape)}")
    if query.shape[0] == 0:
        raise RequestError("QUERY is empty (batch of 0)")
    texts = []
    for b in range(query.shape[0]):
        item = as_text(query[b, 0], "QUERY", b)
        if item == "":
            raise RequestError(f"QUERY[{b}] is empty")
        texts.append(item)
    return texts


def pad_ids(id_lists, pad_id):
    """List of B token-id lists -> (ids [B, Lmax] uint32 right-padded with pad_id, lengths [B, 1] uint32)."""
    lengths = np.array([len(ids) for ids in id_lists], dtype=np.uint32).reshape(-1, 1)
    out = np.full((len(id_lists), int(lengths.max())), pad_id, dtype=np.uint32)
    for b, ids in enumerate(id_lists):
        out[b, : len(ids)] = ids
    return out, lengths


def parse_words(item, name, row):
    """One row's CSV word string (bytes or str) -> list of words; '' means no words."""
    item = as_text(item, name, row)
    if item == "":
        return []
    try:
        rows = list(csv.reader([item], strict=True))
    except csv.Error as e:
        raise RequestError(f"{name}[{row}] is not a comma-separated word list: {e}") from None
    return [word for line in rows for word in line]


def word_list(words_per_row, encode, name):
    """FT's word-list tensor [B, 2, W] int32 from B lists of words.

    Row 0 holds the token ids of all the row's words one after the other, row 1 the cumulative end offset of each
    word (word i is ids[offsets[i-1]:offsets[i]]); W = the batch's longest id list (at least 1). Ids are padded
    with 0 and offsets with -1, so a row without words is [[0, ...], [-1, ...]].
    """
    flat_rows, offset_rows = [], []
    for row, words in enumerate(words_per_row):
        flat, offsets = [], []
        for index, word in enumerate(words):
            ids = encode(word)
            if not ids:
                raise RequestError(f"{name}[{row}] word {index} ({word!r}) encodes to no tokens")
            flat += ids
            offsets.append(len(flat))
        flat_rows.append(flat)
        offset_rows.append(offsets)
    width = max([1] + [len(flat) for flat in flat_rows])
    out = np.zeros((len(flat_rows), 2, width), dtype=np.int32)
    out[:, 1, :] = -1
    for row, (flat, offsets) in enumerate(zip(flat_rows, offset_rows)):
        out[row, 0, : len(flat)] = flat
        out[row, 1, : len(offsets)] = offsets
    return out


# GenerationConfig's max_length when neither generation_config.json nor the call sets a length. transformers 5.24's
# generate then reads it as 20 *new* tokens (max_length = 20 + prompt length, "by default let's always generate 20
# new tokens"), at most max_position_embeddings in all.
HF_DEFAULT_NEW_TOKENS = 20


def output_lengths(prompt_lengths, max_new_tokens=None, max_length=None, max_positions=None):
    """REQUEST_OUTPUT_LEN [B, 1] uint32 for a request that leaves it out: the new tokens HF's
    `generate(**tok(prompt))` allows each prompt with the checkpoint's generation_config.json.

    prompt_lengths [B, 1]. max_new_tokens when set (it wins over max_length, as in HF); else max_length - prompt
    length (max_length counts the prompt); else 20 new tokens, at most max_positions - prompt length. Each row is
    sized by its own prompt, as HF sizes a single unpadded prompt. A prompt that leaves no room for one new token is
    a RequestError (HF's generate raises ValueError there too).
    """
    lengths = np.asarray(prompt_lengths, dtype=np.int64).reshape(-1, 1)
    if max_new_tokens is not None:
        return np.full(lengths.shape, max_new_tokens, dtype=np.uint32)
    if max_length is not None:
        limit = np.full(lengths.shape, max_length, dtype=np.int64)
        source = f"generation_config max_length={max_length}"
    else:
        limit, source = lengths + HF_DEFAULT_NEW_TOKENS, f"HF's default of {HF_DEFAULT_NEW_TOKENS} new tokens"
        if max_positions is not None:
            limit = np.minimum(limit, max_positions)
            source += f" within max_pos_seq_len={max_positions}"
    new = limit - lengths
    no_room = np.flatnonzero(new[:, 0] < 1)
    if no_room.size:
        row = int(no_room[0])
        raise RequestError(f"QUERY[{row}] has {int(lengths[row, 0])} tokens: no room for output under {source}; "
                           "send REQUEST_OUTPUT_LEN")
    return new.astype(np.uint32)


NO_TASK = 2**32 - 1  # PROMPT_TASK_ID of a row without a task (UINT32 -1)


def parse_prompt_tasks(text):
    """"name:length,..." -> {name: (task id, prompt_length)}."""
    tasks = {}
    for index, item in enumerate(part for part in (text or "").split(",") if part):
        name, length = item.rsplit(":", 1)
        tasks[name] = (index, int(length))
    return tasks


def prompt_prefixes(names, batch, tasks, start_id):
    """PROMPT_TASK_NAME [B, 1] (None: absent) -> (B lists of virtual ids to put before each prompt, task ids [B, 1]
    uint32). An unknown name is a RequestError listing the model's tasks."""
    prefixes, ids = [[] for _ in range(batch)], np.full((batch, 1), NO_TASK, dtype=np.uint32)
    if names is None:
        return prefixes, ids
    names = np.asarray(names)
    if names.ndim == 1:
        names = names.reshape(-1, 1)
    if names.shape != (batch, 1):
        raise RequestError(f"PROMPT_TASK_NAME must have shape [{batch}, 1] (one task name per QUERY row), "
                           f"got {list(names.shape)}")
    for row in range(batch):
        name = as_text(names[row, 0], "PROMPT_TASK_NAME", row)
        if name == "":
            continue
        if name not in tasks:
            raise RequestError(f"PROMPT_TASK_NAME[{row}] {name!r} is not a prompt-learning task of this model; "
                               f"its tasks: {', '.join(tasks)}")
        task_id, length = tasks[name]
        prefixes[row] = list(range(start_id, start_id + length))
        ids[row, 0] = task_id
    return prefixes, ids


def prompt_tokenizer(config):
    """(tokenizer, end_id) for prompts: the model wants raw prompt ids, no padding/truncation baked into
    tokenizer.json."""
    tokenizer, end_id = load_tokenizer_and_end_id(config)
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer, end_id


def output_length_defaults(config):
    """output_lengths' keyword arguments from the config parameters: the output length of a request that gives none."""
    return {"max_new_tokens": int_parameter(config, "max_new_tokens"),
            "max_length": int_parameter(config, "max_length"),
            "max_positions": int_parameter(config, "max_pos_seq_len")}


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.tokenizer, self.end_id = prompt_tokenizer(config)
        # The output length of a request that leaves REQUEST_OUTPUT_LEN out (see output_lengths).
        self.length_defaults = output_length_defaults(config)
        self.prompt_tasks = parse_prompt_tasks(config_parameter(config, "prompt_tasks"))
        self.prompt_start_id = int_parameter(config, "prompt_learning_start_id")

    def _one(self, request):
        texts = decode_queries(pb_utils.get_input_tensor_by_name(request, "QUERY").as_numpy())
        out_len_tensor = pb_utils.get_input_tensor_by_name(request, "REQUEST_OUTPUT_LEN")
        if out_len_tensor is not None:
            out_len = np.asarray(out_len_tensor.as_numpy())
            if out_len.shape[0] != len(texts):
                raise RequestError(f"REQUEST_OUTPUT_LEN has batch {out_len.shape[0]}, QUERY has {len(texts)}")
            out_len = out_len.reshape(len(texts), -1).astype(np.uint32)

        # The prompt's special tokens as the checkpoint's tokenizer adds them by default (Llama's <s>, OPT's </s>
        # first): the exporter baked that choice into tokenizer.json's post-processor.
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=True)
        id_lists = [enc.ids for enc in encodings]
        for b, ids in enumerate(id_lists):
            if not ids:
                raise RequestError(f"QUERY[{b}] encodes to no tokens")
        task_outputs = []
        if self.prompt_tasks:
            names = pb_utils.get_input_tensor_by_name(request, "PROMPT_TASK_NAME")
            prefixes, task_ids = prompt_prefixes(None if names is None else names.as_numpy(), len(texts),
                                                 self.prompt_tasks, self.prompt_start_id)
            id_lists = [prefix + list(ids) for prefix, ids in zip(prefixes, id_lists)]
            task_outputs = [pb_utils.Tensor("PROMPT_TASK_ID", task_ids)]
        input_id, input_len = pad_ids(id_lists, self.end_id)
        if out_len_tensor is None:
            out_len = output_lengths(input_len, **self.length_defaults)
        return pb_utils.InferenceResponse(
            output_tensors=task_outputs + [
                pb_utils.Tensor("INPUT_ID", input_id),
                pb_utils.Tensor("REQUEST_INPUT_LEN", input_len),
                pb_utils.Tensor("BAD_WORDS_IDS", self._words(request, "BAD_WORDS_DICT", len(texts))),
                pb_utils.Tensor("STOP_WORDS_IDS", self._words(request, "STOP_WORDS_DICT", len(texts))),
                pb_utils.Tensor("REQUEST_OUTPUT_LEN", out_len),
            ]
        )

    def _words(self, request, name, batch):
        """The word-list tensor for input `name` ([B, 1] CSV strings; absent = no words)."""
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            return word_list([[] for _ in range(batch)], self._encode, name)
        items = np.asarray(tensor.as_numpy())
        if items.ndim == 1:
            items = items.reshape(-1, 1)
        if items.ndim != 2 or items.shape != (batch, 1):
            raise RequestError(f"{name} must have shape [{batch}, 1] (one CSV string per QUERY row), "
                               f"got {list(items.shape)}")
        words = [parse_words(items[row, 0], name, row) for row in range(batch)]
        return word_list(words, self._encode, name)

    def _encode(self, word):
        return self.tokenizer.encode(word, add_special_tokens=False).ids

    def execute(self, requests):
        return respond_each(requests, self._one, "preprocessing", pb_utils)

    def finalize(self):
        self.tokenizer = None
