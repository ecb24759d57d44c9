"""Triton python-backend model with the TensorRT-LLM backend's request interface, over the repository's GPT model.

Self-contained: runs inside a generated model repository with numpy, tokenizers and triton_python_backend_utils.
Beside it: tokenizer_model.py, text_preprocessing.py (a copy of the preprocessing model, for its tokenizing helpers)
and tokenizer/tokenizer.json.

A BLS model (it calls the GPT model with pb_utils.InferenceRequest) rather than an ensemble: it sends the model only
the options a request sets (so generation_config.json's defaults still apply to the others), and it honours
`stream` and `exclude_input_in_output` per request, which no ensemble step downstream of a decoupled model can read.
Always decoupled, so Triton's `generate_stream` (SSE) and gRPC streams reach it; a request without `stream` gets
exactly one response, as `generate` wants.

inputs (TensorRT-LLM's all_models/inflight_batcher_llm/ensemble, per row of the batch; all but text_input optional):
  text_input STRING [-1]   max_tokens INT32 [-1]   bad_words / stop_words STRING [-1] (CSV words, as FT's)
  exclude_input_in_output BOOL [1]   end_id / pad_id INT32 [1]   top_k INT32 [1]   top_p FP32 [1]
  temperature FP32 [1]   length_penalty FP32 [1]   repetition_penalty FP32 [1]   min_length INT32 [1]
  presence_penalty / frequency_penalty FP32 [1]   random_seed UINT64 [1]   return_log_probs BOOL [1]
  beam_width INT32 [1]   stream BOOL [1]
outputs: text_output STRING [B, beam]   cum_log_probs FP32 [B, beam]   output_log_probs FP32 [B, beam, steps]
  num_input_tokens INT32 [B, 1] (the prompt's tokens)   num_output_tokens INT32 [B, beam] (generated, an end
  token included, as HF's generate counts them)
Streaming (`stream` true, the GPT model decoupled): one response per generated token whose text_output is only the
new text (the chunks concatenate to the full text, the prompt never included), then a final one with the rest.
Refused per request with an error naming the input: presence_penalty / frequency_penalty / min_length other than
0 (the GPT model has no such option), `stream` true when the GPT model is not decoupled.
Config parameters (string_value): `end_id`, `model_name` (the GPT model), `model_decoupled` ("1" / "0"),
`exclude_input_in_output` ("1": the default of a request that leaves it out, as TensorRT-LLM's deployments set it),
`eos_ids`, `skip_special_tokens`, and preprocessing's output-length parameters (`max_new_tokens`, `max_length`,
`max_pos_seq_len`).
"""

import json
import os
import sys
import threading

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import text_preprocessing  # noqa: E402
from tokenizer_model import RequestError, config_parameter  # noqa: E402

# TensorRT-LLM's sampling inputs -> (the GPT model's input, its numpy dtype) (templates/ft_python/ft_interface.py).
PASSED_ON = {
    "end_id": ("end_id", np.uint32),
    "top_k": ("runtime_top_k", np.uint32),
    "top_p": ("runtime_top_p", np.float32),
    "temperature": ("temperature", np.float32),
    "length_penalty": ("len_penalty", np.float32),
    "repetition_penalty": ("repetition_penalty", np.float32),
    "random_seed": ("random_seed", np.uint64),
    "return_log_probs": ("is_return_log_probs", np.bool_),
    "beam_width": ("beam_width", np.uint32),
}
# Inputs the GPT model cannot honour: accepted only at their neutral value.
NEUTRAL_ONLY = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "min_length": 0}
MODEL_OUTPUTS = ["output_ids", "sequence_length", "cum_log_probs", "output_log_probs"]
REPLACEMENT = "\ufffd"  # a trailing incomplete utf-8 character, completed by a later token


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.tokenizer, self.end_id = text_preprocessing.prompt_tokenizer(config)
        self.model_name = config_parameter(config, "model_name")
        self.model_decoupled = config_parameter(config, "model_decoupled") == "1"
        self.exclude_input_default = config_parameter(config, "exclude_input_in_output") != "0"
        eos = config_parameter(config, "eos_ids")
        self.eos_ids = tuple(int(i) for i in eos.split(",")) if eos else (self.end_id,)
        self.skip_special_tokens = config_parameter(config, "skip_special_tokens") != "0"
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.length_defaults = text_preprocessing.output_length_defaults(config)
        self.threads = []

    def execute(self, requests):
        """Each request runs in its own thread (decoupled), so concurrent requests reach the GPT model together and
        its dynamic batching can group them."""
        self.threads = [thread for thread in self.threads if thread.is_alive()]
        for request in requests:
            thread = threading.Thread(target=self._serve, args=(request,), daemon=True)
            thread.start()
            self.threads.append(thread)
        return None

    def _serve(self, request):
        sender = request.get_response_sender()
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            for response, is_last in self._responses(request):
                sender.send(response, flags=final if is_last else 0)
        except Exception as exc:  # noqa: BLE001 - the client gets the reason, the model stays up
            message = str(exc) if isinstance(exc, RequestError) else f"{type(exc).__name__}: {exc}"
            try:
                sender.send(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message)),
                            flags=final)
            except Exception as lost:  # noqa: BLE001 - the client went away: nobody left to tell
                pb_utils.Logger.log_warn(f"trtllm: could not send the error {message!r}: {lost}")

    def _optional(self, request, name):
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        return None if tensor is None else np.asarray(tensor.as_numpy())

    def _per_row(self, request, name, batch):
        """Input `name` as one value per row [B, 1] (the first of a row's values; one value serves every row), None
        when the request leaves it out."""
        value = self._optional(request, name)
        if value is None:
            return None
        if value.size == 1:
            return np.full((batch, 1), value.reshape(-1)[0], dtype=value.dtype)
        if value.shape[0] != batch:
            raise RequestError(f"{name} has batch {value.shape[0]}, text_input has {batch}")
        return value.reshape(batch, -1)[:, :1]

    def _flag(self, request, name, default):
        value = self._optional(request, name)
        return default if value is None else bool(value.reshape(-1)[0])

    def _responses(self, request):
        """(response, is_last) pairs for one request."""
        texts = text_preprocessing.decode_queries(self._optional(request, "text_input"))
        batch = len(texts)
        for name, neutral in NEUTRAL_ONLY.items():
            value = self._optional(request, name)
            if value is not None and np.any(value != neutral):
                raise RequestError(f"{name}={value.reshape(-1).tolist()} is not supported by this model "
                                   f"(only {neutral}); leave it out")
        stream = self._flag(request, "stream", False)
        if stream and not self.model_decoupled:
            raise RequestError(f"stream=true needs a decoupled model; {self.model_name!r} is not "
                               "(export with export.triton_deployment.decoupled=True)")
        exclude_input = stream or self._flag(request, "exclude_input_in_output", self.exclude_input_default)

        ids = [encoding.ids for encoding in self.tokenizer.encode_batch(texts, add_special_tokens=True)]
        for row, row_ids in enumerate(ids):
            if not row_ids:
                raise RequestError(f"text_input[{row}] encodes to no tokens")
        input_ids, input_lengths = text_preprocessing.pad_ids(ids, self.end_id)
        max_tokens = self._per_row(request, "max_tokens", batch)
        if max_tokens is None:
            output_len = text_preprocessing.output_lengths(input_lengths, **self.length_defaults)
        else:
            max_tokens = max_tokens.astype(np.int64)
            if np.any(max_tokens < 1):
                raise RequestError(f"max_tokens must be >= 1, got {max_tokens.reshape(-1).tolist()}")
            output_len = max_tokens.astype(np.uint32)
        inputs = {"input_ids": input_ids, "input_lengths": input_lengths, "request_output_len": output_len}
        for name, target in (("bad_words", "bad_words_list"), ("stop_words", "stop_words_list")):
            words = self._words(request, name, batch)
            if words is not None:
                inputs[target] = words
        for name, (target, dtype) in PASSED_ON.items():
            value = self._per_row(request, name, batch)
            if value is not None:
                if value.dtype.kind == "i" and np.any(value < 0):
                    raise RequestError(f"{name} must be >= 0, got {value.reshape(-1).tolist()}")
                inputs[target] = value.astype(dtype)

        model_request = pb_utils.InferenceRequest(
            model_name=self.model_name, requested_output_names=MODEL_OUTPUTS,
            inputs=[pb_utils.Tensor(name, array) for name, array in inputs.items()])
        if not self.model_decoupled:
            yield self._response(self._outputs(model_request.exec()), input_lengths, exclude_input, True, None), True
            return
        previous = None  # the text sent so far per (row, beam), streaming
        last = None
        for model_response in model_request.exec(decoupled=True):
            if not model_response.output_tensors() and not model_response.has_error():
                continue  # the flags-only end of the stream
            outputs = self._outputs(model_response)
            if stream:
                before = previous
                response, previous = self._delta(outputs, input_lengths, previous)
                if previous != before:  # nothing new (a partial character, the model's final copy): no chunk
                    yield response, False
            last = outputs
        if last is None:
            raise RuntimeError(f"{self.model_name} sent no result")
        if stream:  # the final text completes any character held back
            response, previous = self._delta(last, input_lengths, previous, final=True)
            yield response, True
        else:
            yield self._response(last, input_lengths, exclude_input, True, None), True

    def _outputs(self, model_response):
        if model_response.has_error():
            raise RuntimeError(model_response.error().message())
        return {name: np.asarray(pb_utils.get_output_tensor_by_name(model_response, name).as_numpy())
                for name in MODEL_OUTPUTS}

    def _words(self, request, name, batch):
        """FT's word-list tensor [B, 2, W] for `name` ([B, n] CSV strings, all of a row's words together), None when
        the request sends none."""
        items = self._optional(request, name)
        if items is None:
            return None
        items = items.reshape(batch, -1)
        words = [[word for column in range(items.shape[1])
                  for word in text_preprocessing.parse_words(items[row, column], name, row)]
                 for row in range(batch)]
        if not any(words):
            return None
        return text_preprocessing.word_list(
            words, lambda word: self.tokenizer.encode(word, add_special_tokens=False).ids, name)

    def _ids(self, outputs, input_lengths, exclude_input):
        """Per (row, beam) the ids to decode: the generated ones up to the first end id (the end token is not text),
        after the prompt's unless exclude_input -> (ids [B][beam], generated token counts [B, beam])."""
        tokens, lengths = outputs["output_ids"], outputs["sequence_length"]
        batch, beams = tokens.shape[0], tokens.shape[1]
        lengths = lengths.reshape(batch, beams)
        rows = []
        for row in range(batch):
            prompt = int(input_lengths[row, 0])
            row_ids = []
            for beam in range(beams):
                generated = tokens[row, beam, prompt:int(lengths[row, beam])].astype(np.int64)
                ends = np.nonzero(np.isin(generated, self.eos_ids))[0]
                if ends.size:
                    generated = generated[: ends[0]]
                ids = generated if exclude_input else np.concatenate([tokens[row, beam, :prompt], generated])
                row_ids.append([int(i) for i in ids if i < self.vocab_size])  # a padded vocabulary row has no text
            rows.append(row_ids)
        return rows, lengths.astype(np.int64) - input_lengths.astype(np.int64)

    def _texts(self, outputs, input_lengths, exclude_input, final):
        """-> (texts [B][beam], generated token counts [B, beam]); not final: without a trailing partial character."""
        ids, counts = self._ids(outputs, input_lengths, exclude_input)
        texts = [self.tokenizer.decode_batch(row, skip_special_tokens=self.skip_special_tokens) for row in ids]
        if not final:
            texts = [[text.rstrip(REPLACEMENT) for text in row] for row in texts]
        return texts, counts

    def _response(self, outputs, input_lengths, exclude_input, final, texts=None):
        if texts is None:
            texts, counts = self._texts(outputs, input_lengths, exclude_input, final)
        else:
            counts = outputs["sequence_length"].astype(np.int64) - input_lengths.astype(np.int64)
        text_output = np.empty((len(texts), len(texts[0])), dtype=object)
        for row, row_texts in enumerate(texts):
            text_output[row, :] = [text.encode("utf-8") for text in row_texts]
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("text_output", text_output),
            pb_utils.Tensor("cum_log_probs", np.array(outputs["cum_log_probs"], dtype=np.float32)),
            pb_utils.Tensor("output_log_probs", np.array(outputs["output_log_probs"], dtype=np.float32)),
            pb_utils.Tensor("num_input_tokens", input_lengths.astype(np.int32).reshape(-1, 1)),
            pb_utils.Tensor("num_output_tokens", np.maximum(counts, 0).astype(np.int32)),
        ])

    def _delta(self, outputs, input_lengths, previous, final=False):
        """The streamed response: only the text new since `previous` -> (response, the text so far)."""
        texts, _ = self._texts(outputs, input_lengths, True, final)
        if previous is None:
            previous = [["" for _ in row] for row in texts]
        deltas = [[text[len(before):] if text.startswith(before) else text
                   for text, before in zip(row, row_before)] for row, row_before in zip(texts, previous)]
        return self._response(outputs, input_lengths, True, final, texts=deltas), texts

    def finalize(self):
        for thread in self.threads:
            thread.join(timeout=30)
        self.tokenizer = None
