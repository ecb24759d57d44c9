"""Triton python-backend model `preprocessing`: prompt strings -> padded token ids.

Self-contained: runs inside a generated model repository with only numpy, tokenizers and
triton_python_backend_utils available. Tokenizer: `tokenizer/tokenizer.json` next to this file.

inputs : QUERY              BYTES  [B, 1]  utf-8 prompt per row
         REQUEST_OUTPUT_LEN UINT32 [B, 1]  passed through
outputs: INPUT_ID           UINT32 [B, Lmax]  right-padded with end_id
         REQUEST_INPUT_LEN  UINT32 [B, 1]     real lengths
         REQUEST_OUTPUT_LEN UINT32 [B, 1]
Config parameter `end_id` (string_value): the pad / end token id.
A bad request (empty, not utf-8, mismatched batch) gets its own error response; the others are unaffected.
"""

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# tokenizer_model.py is copied next to this file.
from tokenizer_model import RequestError, load_tokenizer_and_end_id, respond_each  # noqa: E402


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
        item = query[b, 0]
        if isinstance(item, (bytes, np.bytes_)):
            try:
                item = bytes(item).decode("utf-8")
            except UnicodeDecodeError as e:
                raise RequestError(f"QUERY[{b}] is not valid utf-8: {e}") from None
        elif not isinstance(item, str):
            raise RequestError(f"QUERY[{b}] is not a string (got {type(item).__name__})")
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


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.tokenizer, self.end_id = load_tokenizer_and_end_id(config)
        # The model wants raw prompt ids: no padding/truncation baked into tokenizer.json.
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()

    def _one(self, request):
        texts = decode_queries(pb_utils.get_input_tensor_by_name(request, "QUERY").as_numpy())
        out_len_tensor = pb_utils.get_input_tensor_by_name(request, "REQUEST_OUTPUT_LEN")
        if out_len_tensor is None:
            raise RequestError("REQUEST_OUTPUT_LEN is missing")
        out_len = np.asarray(out_len_tensor.as_numpy())
        if out_len.shape[0] != len(texts):
            raise RequestError(f"REQUEST_OUTPUT_LEN has batch {out_len.shape[0]}, QUERY has {len(texts)}")
        out_len = out_len.reshape(len(texts), -1).astype(np.uint32)

        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        id_lists = [enc.ids for enc in encodings]
        for b, ids in enumerate(id_lists):
            if not ids:
                raise RequestError(f"QUERY[{b}] encodes to no tokens")
        input_id, input_len = pad_ids(id_lists, self.end_id)
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor("INPUT_ID", input_id),
                pb_utils.Tensor("REQUEST_INPUT_LEN", input_len),
                pb_utils.Tensor("REQUEST_OUTPUT_LEN", out_len),
            ]
        )

    def execute(self, requests):
        return respond_each(requests, self._one, "preprocessing", pb_utils)

    def finalize(self):
        self.tokenizer = None
