"""Triton python-backend model `postprocessing`: generated token ids -> text.

Self-contained: runs inside a generated model repository with only numpy, tokenizers and
triton_python_backend_utils available. Tokenizer: `tokenizer/tokenizer.json` next to this file.

inputs : TOKENS_BATCH    UINT32 [B, beam, T]  prompt + generated ids, end_id after sequence_length
         SEQUENCE_LENGTH UINT32 [B, beam]     prompt + generated length (an emitted end_id counts)
         INPUT_LENGTHS   UINT32 [B, 1]        prompt length (not declared for an encoder-decoder model, whose
                                              INT32 TOKENS_BATCH holds the generated tokens only: 0)
         IS_FINAL        BOOL   [B, 1]        optional (streaming): false while the row is still generating
         END_ID          UINT32 [B, 1]        optional per-row end id (default: any id of the eos_ids parameter)
output : OUTPUT          BYTES  [B, beam]     utf-8 text of tokens[input_length : sequence_length] only,
                                              cut before the first end id (the end token is not text)

Streaming (decoupled model upstream): this model runs once per streamed model response, each carrying the
sequences so far, so OUTPUT is the text generated so far and grows token by token. Stateless: while IS_FINAL is
false the text is cut before a trailing incomplete multi-byte character (decoded as U+FFFD), which a later
response completes; the final response's text is the full decode, the same as without streaming.
Config parameters (string_value): `end_id`, and `eos_ids` ("a,b,c": the model's eos ids, every one of which ends a
row that sends no END_ID, as the model's generation does; absent: end_id alone); `skip_special_tokens` ("1", the
default, or "0"): leave special tokens (<s>, </s>, <|endoftext|>, ...) out of the text, as HF's
`tok.decode(ids, skip_special_tokens=True)`. A bad request gets its own error response; the others are unaffected.
"""

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# tokenizer_model.py is copied next to this file.
from tokenizer_model import RequestError, config_parameter, load_tokenizer_and_end_id, respond_each  # noqa: E402


def generated_slices(tokens, seq_len, in_len, end_id, vocab_size):
    """Per (b, beam): the generated ids tokens[b, k, in_len[b] : seq_len[b, k]] up to the first end id.

    tokens [B, beam, T], seq_len [B, beam], in_len [B], end_id: int, per-row [B], or a tuple of ids ending every
    row; ids >= vocab_size (the tokenizer's) are left out -> (nested list [B][beam] of python int lists, nested list
    [B][beam] of bools: an end id was cut).
    """
    if tokens.ndim == 2:  # [B, T] from a caller without a beam dimension
        tokens = tokens[:, None, :]
    if tokens.ndim != 3:
        raise RequestError(f"TOKENS_BATCH must be [batch, beam, T], got {list(tokens.shape)}")
    batch, beam, t_max = tokens.shape
    if batch == 0 or beam == 0:
        raise RequestError(f"TOKENS_BATCH is empty (shape {list(tokens.shape)})")
    seq_len = np.asarray(seq_len).reshape(batch, -1)
    in_len = np.asarray(in_len).reshape(-1)
    if seq_len.shape != (batch, beam):
        raise RequestError(f"SEQUENCE_LENGTH must be [{batch}, {beam}], got {list(seq_len.shape)}")
    if in_len.shape != (batch,):
        raise RequestError(f"INPUT_LENGTHS must be [{batch}, 1], got {list(in_len.shape)}")
    if isinstance(end_id, tuple):  # the model's eos set: any of them ends every row
        end_ids = [np.asarray(end_id, dtype=np.int64)] * batch
    else:
        end_ids = np.broadcast_to(np.asarray(end_id, dtype=np.int64).reshape(-1), (batch,))
    out, ended = [], []
    for b in range(batch):
        start = int(in_len[b])
        row, row_ended = [], []
        for k in range(beam):
            stop = int(seq_len[b, k])
            if not 0 <= start <= stop <= t_max:
                raise RequestError(
                    f"row {b} beam {k}: need 0 <= input_length ({start}) <= sequence_length ({stop}) <= T ({t_max})"
                )
            ids = tokens[b, k, start:stop].astype(np.int64)
            ends = np.nonzero(np.isin(ids, end_ids[b]))[0]
            if ends.size:
                ids = ids[: ends[0]]
            # An id the tokenizer cannot decode (a padded vocabulary row, from a runtime that does not mask them)
            # has no text: dropped, never a failed request.
            ids = ids[ids < vocab_size]
            row.append(ids.tolist())
            row_ended.append(bool(ends.size))
        out.append(row)
        ended.append(row_ended)
    return out, ended


REPLACEMENT = "\ufffd"  # what decoding gives for an incomplete (or invalid) utf-8 byte sequence


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.tokenizer, self.end_id = load_tokenizer_and_end_id(config)
        eos = config_parameter(config, "eos_ids")
        self.eos_ids = tuple(int(i) for i in eos.split(",")) if eos else (self.end_id,)
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.skip_special_tokens = config_parameter(config, "skip_special_tokens") != "0"
        self.has_prompt = any(tensor["name"] == "INPUT_LENGTHS" for tensor in config.get("input", []))

    def _input(self, request, name):
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            raise RequestError(f"{name} is missing")
        return tensor.as_numpy()

    def _optional(self, request, name):
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        return None if tensor is None else np.asarray(tensor.as_numpy())

    def _prompt_lengths(self, request, batch):
        """INPUT_LENGTHS; an encoder-decoder model's postprocessing has none (its outputs hold no prompt): 0."""
        lengths = self._optional(request, "INPUT_LENGTHS")
        if lengths is None and self.has_prompt:
            raise RequestError("INPUT_LENGTHS is missing")
        return np.zeros(batch, dtype=np.int64) if lengths is None else lengths

    def _one(self, request):
        tokens = np.asarray(self._input(request, "TOKENS_BATCH"))
        end_id = self._optional(request, "END_ID")
        slices, ended = generated_slices(
            tokens,
            self._input(request, "SEQUENCE_LENGTH"),
            self._prompt_lengths(request, tokens.shape[0]),
            self.eos_ids if end_id is None else end_id,
            self.vocab_size,
        )
        batch, beam = len(slices), len(slices[0])
        flat = [ids for row in slices for ids in row]
        texts = self.tokenizer.decode_batch(flat, skip_special_tokens=self.skip_special_tokens)
        is_final = self._optional(request, "IS_FINAL")
        if is_final is not None:  # streaming: hold back a trailing partial character until the row is final
            is_final = is_final.reshape(batch, -1)[:, 0].astype(bool)
            for i in range(batch * beam):
                if not is_final[i // beam]:
                    texts[i] = texts[i].rstrip(REPLACEMENT)
        output = np.empty(batch * beam, dtype=object)
        output[:] = [t.encode("utf-8") for t in texts]  # BYTES tensors carry utf-8 bytes
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT", output.reshape(batch, beam))])

    def execute(self, requests):
        return respond_each(requests, self._one, "postprocessing", pb_utils)

    def finalize(self):
        self.tokenizer = None
