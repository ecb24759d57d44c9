"""Triton python-backend model that serves FasterTransformer T5 shards (encoder-decoder) with PyTorch.

Copied into `<model_name>/1/` of a generated model repository together with ft_t5.py, ft_t5_checkpoint.py,
ft_t5_interface.py, ft_checkpoint.py, ft_generate.py, ft_interface.py, ft_metrics.py and ft_scheduler.py. Same tensors as FT's T5 backend
(all_models/t5/fastertransformer/config.pbtxt, listed in ft_t5_interface): inputs input_ids [B, L] (right-padded
encoder inputs), sequence_length [B, 1] (their lengths), max_output_len [B, 1], the optional per-row sampling
options and word lists of the GPT interface (start_id = the row's first decoder token); outputs output_ids
[B, beam, max_output_len] (generated tokens only, end_id padded), sequence_length [B, beam], cum_log_probs [B, beam],
output_log_probs [B, beam, max_output_len], beam = the request's largest beam_width. Decoding semantics:
ft_generate.generate on ft_t5's bound decoder.

In-flight batching, as GPT's model.py (the same ft_scheduler.Scheduler): execute() answers a bad request with its
error at once and queues the others; the scheduler thread admits each between decoding steps (its encoder runs once,
then its decoder, bound to that encoder output, joins the running requests; ft_generate.Engine runs a decoder
forward per request), answers it when it finishes and stops one its client cancelled. Responses go through each
request's response sender, plain models too (exactly one, flagged TRITONSERVER_RESPONSE_COMPLETE_FINAL). Decoupled (model_transaction_policy { decoupled: true }): every request
gets a response after each decoding step that grew one of its sequences (T = steps so far), then the final one
(the same tensors as without streaming) flagged TRITONSERVER_RESPONSE_COMPLETE_FINAL; every response also carries
prompt_lengths [B, 1] (0: output_ids holds no prompt) and is_final [B, 1] for the streaming ensemble's
postprocessing (ft_t5_interface.STREAMING_OUTPUTS).

Parameters (config.pbtxt, string_value): model_checkpoint_path (relative to this file's directory, default
"<tensor_para_size>-gpu"), tensor_para_size (must match config.ini), pipeline_para_size (layers run in sequence
on one device), data_type (compute type on CUDA; the CPU computes in fp32), int8_mode (0), device ("auto" | "cpu" |
"cuda"), max_beam_width, admission_window_microseconds (model.py says what it does).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ft_imports  # noqa: E402

ft_imports.openmp_threads_sleep_when_idle()  # before torch loads OpenMP; OMP_WAIT_POLICY=ACTIVE overrides it

with ft_imports.imports_without_gc():  # torch and the runtime (ft_imports.py)
    import numpy as np
    import torch
    import triton_python_backend_utils as pb_utils

    import ft_checkpoint
    import ft_generate
    import ft_metrics
    import ft_request
    import ft_scheduler
    import ft_t5
    import ft_t5_checkpoint
    import ft_t5_interface


def _input(request, name):
    return ft_request.input_array(pb_utils, request, name)


_rows = ft_request.per_row


class TritonPythonModel:
    """One model instance: a verified, loaded FTT5 on the chosen device."""

    def initialize(self, args):
        arguments = ft_request.ModelArguments(args, os.path.dirname(os.path.abspath(__file__)))
        self.model_config = arguments.config
        checkpoint = arguments.shard_dir(ft_checkpoint.shard_dir_name)
        config = ft_t5_checkpoint.verify(checkpoint)  # CheckpointError naming every bad file: Triton refuses
        arguments.check_tensor_para_size(checkpoint, config.tensor_para_size)
        arguments.check_int8_mode()
        device = arguments.device()
        data_type = arguments.param("data_type") or config.weight_data_type
        if data_type not in ft_checkpoint.TORCH_DTYPES:
            raise ValueError(f"parameter data_type={data_type!r}: expected one of {sorted(ft_checkpoint.TORCH_DTYPES)}")
        dtype = torch.float32 if device.type == "cpu" else ft_checkpoint.TORCH_DTYPES[data_type]
        self.max_beam_width = arguments.max_beam_width(ft_generate.MAX_BEAM_WIDTH)
        self.decoupled = arguments.decoupled
        self.model = ft_t5.FTT5.from_shards(checkpoint, device=device, dtype=dtype)
        self.defaults = ft_generate.GenerationDefaults.read(checkpoint)
        metrics = ft_metrics.Metrics(pb_utils, args.get("model_name", ""), args.get("model_version", ""),
                                     arguments.max_batch_size)
        self._scheduler = ft_scheduler.Scheduler(
            self, ft_generate.Engine(self.model), pb_utils, metrics,
            int(arguments.max_batch_size), self.decoupled, "ft_python t5",
            window=arguments.admission_window(ft_scheduler.ADMISSION_WINDOW_US))
        ft_scheduler.log(pb_utils, f"ft_python t5: loaded {checkpoint} (tp={config.tensor_para_size}, weights {config.weight_data_type}) "
             f"on {device} computing in {dtype}; {self.defaults}")

    def _parse(self, request):
        """One request's inputs -> its checked ft_t5.T5Batch (ValueError naming the bad input)."""
        for name in ft_t5_interface.UNSERVED_INPUTS:
            if _input(request, name) is not None:
                raise ValueError(f"{name} is not served by the python runtime's T5 model")
        ids = _input(request, "input_ids")
        if ids is None:
            raise ValueError("input_ids is required")
        ids = np.asarray(ids)
        ids = ids[None, :] if ids.ndim == 1 else ids
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [batch, length >= 1], got shape {list(ids.shape)}")
        batch = ids.shape[0]
        lengths = _input(request, "sequence_length")
        lengths = np.full(batch, ids.shape[1]) if lengths is None else _rows(lengths, batch, "sequence_length")
        output_len = _input(request, "max_output_len")
        if output_len is None:
            raise ValueError("max_output_len is required")
        params = ft_generate.SamplingParams()
        for tensor in ft_t5_interface.SAMPLING_INPUTS:
            value = _input(request, tensor.name)
            if value is None:
                continue
            if not tensor.scalar:  # FT's word-list format [B, 2, W]
                value = np.asarray(value).astype(np.int64)
            else:
                value = _rows(value, batch, tensor.name)
                if value.dtype.kind == "u" and tensor.field != "random_seed":  # seeds stay uint64
                    value = value.astype(np.int64)
            setattr(params, tensor.field, value)
        return ft_t5.check_t5_inputs(self.model, ids.astype(np.int64), lengths.astype(np.int64),
                                     _rows(output_len, batch, "max_output_len").astype(np.int64), params,
                                     max_beam_width=self.max_beam_width, defaults=self.defaults)

    def execute(self, requests):
        """Hand each valid request to the scheduler (it answers through the request's response sender) and
        answer each bad one with an error at once; returns None."""
        self._scheduler.submit(requests)
        return None

    # ---------------------------------------------------------------- ft_scheduler's hooks
    def parse(self, request):
        return self._parse(request)

    @staticmethod
    def rows(batch):
        return batch.encoder_ids.shape[0]

    @staticmethod
    def prompt_tokens(batch):
        return int(batch.encoder_lengths.sum())

    def admit(self, engine, batch, stream):
        """Encode the request once; its decoder (bound to that output) joins the engine."""
        decoder = self.model.bind(batch.encoder_ids, batch.encoder_lengths)
        wrapped = None if stream is None else (lambda output: stream(ft_t5.t5_output(output)))
        return engine.admit(batch.decoder, stream=wrapped, model=decoder)

    def final(self, cohort, batch):
        output = ft_t5.t5_output(cohort.output)
        beams = batch.decoder.beam_width
        generated = sum(int(output.sequence_length[row, :int(beams[row])].sum()) for row in range(beams.shape[0]))
        return self._response(output, slice(None), batch), generated

    def partial(self, output, batch):
        return self._response(output, slice(None), batch, steps=output.output_ids.shape[-1])

    def _response(self, results, rows, item, steps=None):
        """One request's rows and beams of the batch result: T = its max_output_len (steps so far when
        streaming)."""
        max_new = int(item.decoder.max_new_tokens.max())
        final = steps is None
        steps = max_new if final else min(steps, max_new)
        beams = int(item.decoder.beam_width.max())
        cut = {"output_ids": results.output_ids[rows, :beams, :steps],
               "sequence_length": results.sequence_length[rows, :beams],
               "cum_log_probs": results.cum_log_probs[rows, :beams],
               "output_log_probs": results.output_log_probs[rows, :beams, :steps]}
        if self.decoupled:  # what the streaming ensemble's postprocessing reads (ft_t5_interface.STREAMING_OUTPUTS)
            batch = item.encoder_ids.shape[0]
            cut["prompt_lengths"] = torch.zeros((batch, 1), dtype=torch.int64)
            cut["is_final"] = torch.full((batch, 1), final)
        # Owned copies, never views of torch memory (a decoupled response is serialised with the GIL released).
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(name, np.array(tensor.numpy(), copy=True, order="C",
                                           dtype=ft_t5_interface.OUTPUTS_BY_NAME[name].numpy_dtype))
            for name, tensor in cut.items()])

    def finalize(self):
        """Stop the scheduler (requests still running or waiting get an error), then free the model."""
        if getattr(self, "_scheduler", None) is not None:
            self._scheduler.stop()
            self._scheduler.metrics.close()
        device = getattr(getattr(self, "model", None), "device", None)
        self.model = None
        if device is not None and device.type == "cuda":
            torch.cuda.empty_cache()
