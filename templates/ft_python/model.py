"""Triton python-backend model that serves FasterTransformer GPT shards with PyTorch.

Copied into `<model_name>/1/` of a generated model repository together with ft_checkpoint.py, ft_metrics.py (its
Prometheus metrics), ft_scheduler.py (in-flight batching, shared with model_t5.py),
ft_gpt.py, ft_generate.py and ft_interface.py. Same tensors as the fastertransformer backend (FT's GPT
config.pbtxt, listed in ft_interface's table):
inputs input_ids [B, L] (right-padded), input_lengths [B], request_output_len [B, 1], optional per-row
runtime_top_k, runtime_top_p, temperature, len_penalty, repetition_penalty, random_seed,
is_return_log_probs, beam_width, beam_search_diversity_rate, start_id, end_id, top_p_decay, top_p_min,
top_p_reset_ids, prompt_learning_task_name_ids (FT's p/prompt tuning: the row's task, whose virtual ids
>= config.ini's prompt_learning_start_id sit inside input_ids) and the word lists bad_words_list / stop_words_list
[B, 2, W]; outputs output_ids
[B, beam, T], sequence_length [B, beam], cum_log_probs [B, beam], output_log_probs [B, beam, steps],
beam = the request's largest beam_width. Decoding semantics: ft_generate.generate.
The model's generation_config.json beside the shards (ft_generate.GenerationDefaults): its eos ids end every row
that sends no end_id, and its sampling defaults apply to the options a request leaves unset.

In-flight batching (ft_scheduler.Scheduler): execute() answers a bad request with its error at once and queues the
others for the model's scheduler thread, which admits them between decoding steps (ft_generate.Engine: the requests
admitted between two steps are prefilled together, prompts of similar lengths in one forward, then each decodes
together with every running request, one joint forward per step) while the running rows stay within max_batch_size.
A request that finishes is answered and leaves at once, freeing its KV cache; one its client cancelled stops before
the next step. Every request keeps its own options and gets exactly the output it would get alone. Responses go
through each request's response sender, plain models too (exactly one response, flagged
TRITONSERVER_RESPONSE_COMPLETE_FINAL). Requests arrive with their own shapes (ragged), so nothing needs BATCH_ITEM_SHAPE.

Decoupled (model_transaction_policy { decoupled: true }): every request gets one response after each
decoding step that grew one of its sequences (the sequences so far, T = its longest prompt + steps so far),
then a final response with the complete result (the same tensors as without streaming) flagged
TRITONSERVER_RESPONSE_COMPLETE_FINAL. Every response also carries prompt_lengths [B, 1] and is_final [B, 1]
for the streaming ensemble's postprocessing (ft_interface.STREAMING_OUTPUTS). A request its client cancelled gets no
more responses, and its stream is closed with a flags-only final (a plain request: an error response).

Parameters (config.pbtxt, string_value): model_checkpoint_path (relative paths are resolved
against this file's directory, e.g. "1-gpu"), tensor_para_size (must match config.ini),
pipeline_para_size (stages run in sequence on one device), data_type (compute type on CUDA; CPU always computes in fp32),
int8_mode (0), device ("auto" | "cpu" | "cuda"; auto = cuda when available), max_beam_width (largest beam_width
a request may ask for), admission_window_microseconds (how long an idle model waits for the next request before
prefilling: ft_scheduler.Scheduler._gather; default ft_scheduler.ADMISSION_WINDOW_US, 0 = at once).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# oneDNN (the CPU products, ft_gpt._linear) keeps a primitive per product shape it has seen, 1024 by default: every
# new prompt length adds some, and the stub's memory grew ~210 MB before it levelled off under mixed requests;
# with 64 it levelled off ~110 MB lower, decoding as fast (benchmarks/inflight_step.py).
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")

import ft_imports  # noqa: E402

ft_imports.openmp_threads_sleep_when_idle()  # before torch loads OpenMP; OMP_WAIT_POLICY=ACTIVE overrides it

with ft_imports.imports_without_gc():  # torch and the runtime (ft_imports.py)
    import numpy as np
    import torch
    import triton_python_backend_utils as pb_utils

    import ft_checkpoint
    import ft_generate
    import ft_gpt
    import ft_interface
    import ft_metrics
    import ft_request
    import ft_scheduler


def _input(request, name):
    return ft_request.input_array(pb_utils, request, name)


_rows = ft_request.per_row


def _generated(results, batch):
    """Tokens generated for a request: each row's own beams (sequence_length - input_length)."""
    generated = 0
    for row in range(batch.input_ids.shape[0]):
        lengths = results.sequence_length[row, :int(batch.beam_width[row])] - int(batch.input_lengths[row])
        generated += int(lengths.clamp(min=0).sum())
    return generated


class TritonPythonModel:
    """One model instance: a verified, loaded FTGPT on the chosen device."""

    def initialize(self, args):
        arguments = ft_request.ModelArguments(args, os.path.dirname(os.path.abspath(__file__)))
        self.model_config = arguments.config
        checkpoint = arguments.shard_dir(ft_checkpoint.shard_dir_name)
        # Raises CheckpointError naming every missing / wrongly sized file: Triton then
        # refuses to load the model instead of serving garbage as FT would.
        config = ft_checkpoint.verify(checkpoint)
        arguments.check_tensor_para_size(checkpoint, config.tensor_para_size)
        # The shards of every pipeline stage live in the same directory (layers keep their global
        # indices), so on one device the stages simply run one after the other: all layers in order.
        pp = arguments.param("pipeline_para_size")
        if pp and int(pp) < 1:
            raise ValueError(f"pipeline_para_size={pp}: must be >= 1")
        arguments.check_int8_mode("; weight-only int8 (1) is FT's backend's")
        device = arguments.device()
        dtype = ft_gpt.resolve_dtype(device, arguments.param("data_type") or None, config.weight_data_type)
        self.max_beam_width = arguments.max_beam_width(ft_generate.MAX_BEAM_WIDTH)
        self.decoupled = arguments.decoupled

        self.model = ft_gpt.FTGPT.from_shards(checkpoint, device=device, dtype=dtype)
        self.defaults = ft_generate.GenerationDefaults.read(checkpoint)
        self.metrics = ft_metrics.Metrics(pb_utils, args.get("model_name", ""), args.get("model_version", ""),
                                          arguments.max_batch_size)
        # In-flight batching: execute() queues requests; the scheduler's thread admits them between decoding steps.
        self._scheduler = ft_scheduler.Scheduler(
            self, ft_generate.Engine(self.model), pb_utils, self.metrics,
            arguments.max_batch_size, self.decoupled, "ft_python",
            window=arguments.admission_window(ft_scheduler.ADMISSION_WINDOW_US))
        ft_scheduler.log(pb_utils, f"ft_python: loaded {checkpoint} (tp={config.tensor_para_size}, "
             f"weights {config.weight_data_type}) on {device} computing in {dtype}; {self.defaults}")

    def _parse(self, request):
        """One request's inputs -> its checked ft_generate.Batch (ValueError if invalid)."""
        ids = _input(request, "input_ids")
        if ids is None:
            raise ValueError("input_ids is required")
        ids = np.asarray(ids)
        if ids.ndim == 1:
            ids = ids[None, :]
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [batch, length >= 1], got shape {list(ids.shape)}")
        batch = ids.shape[0]
        lengths = _input(request, "input_lengths")
        lengths = (np.full(batch, ids.shape[1]) if lengths is None
                   else _rows(lengths, batch, "input_lengths"))
        output_len = _input(request, "request_output_len")
        if output_len is None:
            raise ValueError("request_output_len is required")
        params = ft_generate.SamplingParams()
        for tensor in ft_interface.SAMPLING_INPUTS:
            value = _input(request, tensor.name)
            if value is None:
                continue
            if not tensor.scalar:  # FT's word-list format [B, 2, W] (ids + cumulative offsets)
                value = np.asarray(value).astype(np.int64)
            else:
                value = _rows(value, batch, tensor.name)
                if value.dtype.kind == "u" and tensor.field != "random_seed":  # seeds stay uint64 (python ints later)
                    value = value.astype(np.int64)
            setattr(params, tensor.field, value)
        return ft_generate.check_inputs(
            self.model, ids.astype(np.int64), lengths.astype(np.int64),
            _rows(output_len, batch, "request_output_len", take_first=True).astype(np.int64),
            params, max_beam_width=self.max_beam_width, defaults=self.defaults)

    def execute(self, requests):
        """Hand each valid request to the scheduler (it answers through the request's response sender) and
        answer each bad one with an error at once; returns None (every response goes through the senders)."""
        self._scheduler.submit(requests)
        return None

    # ---------------------------------------------------------------- ft_scheduler's hooks
    def parse(self, request):
        return self._parse(request)

    @staticmethod
    def rows(batch):
        return batch.input_ids.shape[0]

    @staticmethod
    def prompt_tokens(batch):
        return int(batch.input_lengths.sum())

    @staticmethod
    def admit(engine, batch, stream):
        return engine.admit(batch, stream=stream)

    def final(self, cohort, batch):
        return self._response(cohort.output, slice(None), batch), _generated(cohort.output, batch)

    def partial(self, output, batch):
        steps = output.output_ids.shape[-1] - int(batch.input_lengths.max())
        return self._response(output, slice(None), batch, steps=steps)

    def _response(self, results, rows, item, steps=None):
        """Cut one request's rows and beams out of the batch result, sized for that request.

        steps: None for a complete result (T = its longest prompt + its largest request_output_len; every
        position after a row's sequence_length holds end_id), else the steps decoded so far (streaming).
        """
        max_new = int(item.max_new_tokens.max())
        final = steps is None
        steps = max_new if final else min(steps, max_new)
        width = int(item.input_lengths.max()) + steps
        beams = int(item.beam_width.max())
        # Owned copies (np.array(..., copy=True)), never views of torch memory: a decoupled response is
        # serialised by the stub with the GIL released, and freeing a torch-backed view there aborts the stub.
        cut = {
            "output_ids": results.output_ids[rows, :beams, :width],
            "sequence_length": results.sequence_length[rows, :beams],
            "cum_log_probs": results.cum_log_probs[rows, :beams],
            "output_log_probs": results.output_log_probs[rows, :beams, :steps],
        }
        if self.decoupled:  # what the streaming ensemble's postprocessing needs (ft_interface.STREAMING_OUTPUTS)
            batch = item.input_ids.shape[0]
            cut["prompt_lengths"] = item.input_lengths.reshape(batch, 1)
            cut["is_final"] = torch.full((batch, 1), final)
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(name, np.array(tensor.numpy(), dtype=ft_interface.BY_NAME[name].numpy_dtype, copy=True,
                                           order="C"))
            for name, tensor in cut.items()])

    def finalize(self):
        """Stop the scheduler (requests still running or waiting get an error), then free the model."""
        if getattr(self, "_scheduler", None) is not None:
            self._scheduler.stop()
        if getattr(self, "metrics", None) is not None:
            self.metrics.close()
        device = getattr(getattr(self, "model", None), "device", None)
        self.model = None
        if device is not None and device.type == "cuda":
            torch.cuda.empty_cache()
