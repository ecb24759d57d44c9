"""Triton python-backend model that serves FasterTransformer GPT shards with PyTorch.

Copied into `<model_name>/1/` of a generated model repository together with ft_checkpoint.py, ft_metrics.py (its
Prometheus metrics),
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

In-flight batching: execute() answers a bad request with its error at once and queues the others for the
model's scheduler thread, which admits them between decoding steps (ft_generate.Engine: each request is prefilled
alone, then decodes together with every running request, one joint forward per step) while the running rows stay
within max_batch_size. A request that finishes is answered and leaves at once, freeing its KV cache; one its client
cancelled stops before the next step. Every request keeps its own options and gets exactly the output it would
get alone. Responses go through each request's response sender, plain models too (exactly one response, flagged
TRITONSERVER_RESPONSE_COMPLETE_FINAL). Requests arrive with their own shapes (ragged), so nothing needs
BATCH_ITEM_SHAPE.

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
a request may ask for).
"""

import json
import os
import queue
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# OpenMP threads that sleep when idle instead of spinning (read once, when torch loads OpenMP): a served model
# shares its cores with Triton, the other models and the clients, and spinning threads there made decoding
# 5-10x slower on a busy 2-core machine (benchmarks/serving.py --omp-wait-policy). Set the variable to
# ACTIVE in the server's environment to spin on dedicated cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

import ft_checkpoint  # noqa: E402
import ft_generate  # noqa: E402
import ft_gpt  # noqa: E402
import ft_interface  # noqa: E402
import ft_metrics  # noqa: E402


def _log(message):
    logger = getattr(pb_utils, "Logger", None)
    if logger is not None:
        logger.log_info(message)
    else:
        print(message, flush=True)


def _input(request, name):
    """The input as a numpy array, or None when the request does not carry it."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _rows(array, batch, name, take_first=False):
    """A per-row value [B] from an input shaped [B], [B, 1] or broadcast from one value."""
    if take_first and array.ndim == 2 and array.shape[0] == batch:
        array = array[:, :1]  # e.g. request_output_len [B, n]: FT reads one value per row
    flat = np.asarray(array).reshape(-1)
    if flat.size == 1:
        return np.repeat(flat, batch)
    if flat.size != batch:
        raise ValueError(f"{name} has shape {list(np.shape(array))}, expected [{batch}] or "
                         f"[{batch}, 1] for a batch of {batch}")
    return flat


def _send(sender, response, flags=0):
    """Send through a request's response sender (response None: flags only); False (logged) when that fails."""
    try:
        if response is None:
            sender.send(flags=flags)
        else:
            sender.send(response, flags=flags)
    except Exception as exc:  # noqa: BLE001 - one lost stream must not fail the rest of the batch
        _log(f"ft_python: could not send a response: {type(exc).__name__}: {exc}")
        return False
    return True


def _cancelled(request):
    """Whether the client cancelled the request (python backend >= 23.10; False where unknown)."""
    is_cancelled = getattr(request, "is_cancelled", None)
    return bool(is_cancelled()) if callable(is_cancelled) else False


def _error(message):
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))


class _Work:
    """One request inside the model: its parsed batch, its decoding (cohort) once admitted, its stream's state."""

    def __init__(self, request, sender, batch, started):
        self.request, self.sender, self.batch, self.started = request, sender, batch, started
        self.cohort = None
        self.answered = False  # got its first response (time to first token)
        self.last = None       # sequence lengths of its latest streamed response
        self.gone = False      # its stream failed or its client cancelled: stop at the next step


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
        self.model_config = json.loads(args["model_config"])
        params = {key: value.get("string_value", "")
                  for key, value in self.model_config.get("parameters", {}).items()}
        here = os.path.dirname(os.path.abspath(__file__))

        tp_param = params.get("tensor_para_size", "").strip()
        checkpoint = params.get("model_checkpoint_path", "").strip() or ft_checkpoint.shard_dir_name(tp_param or 1)
        if not os.path.isabs(checkpoint):
            checkpoint = os.path.join(here, checkpoint)
        # Raises CheckpointError naming every missing / wrongly sized file: Triton then
        # refuses to load the model instead of serving garbage as FT would.
        config = ft_checkpoint.verify(checkpoint)
        if tp_param and int(tp_param) != config.tensor_para_size:
            raise ValueError(f"parameter tensor_para_size={tp_param} but {checkpoint}/config.ini "
                             f"says tensor_para_size={config.tensor_para_size}")
        # The shards of every pipeline stage live in the same directory (layers keep their global
        # indices), so on one device the stages simply run one after the other: all layers in order.
        pp = params.get("pipeline_para_size", "").strip()
        if pp and int(pp) < 1:
            raise ValueError(f"pipeline_para_size={pp}: must be >= 1")
        int8 = params.get("int8_mode", "").strip()
        if int8 and int(int8) != 0:
            raise ValueError(f"int8_mode={int8}: the python runtime serves the shards unquantised (int8_mode 0); "
                             "weight-only int8 (1) is FT's backend's")

        device_param = (params.get("device", "").strip() or "auto").lower()
        if device_param not in ("auto", "cpu", "cuda"):
            raise ValueError(f"parameter device={device_param!r}: expected auto, cpu or cuda")
        device = ft_gpt.resolve_device(device_param)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("parameter device=cuda but torch sees no CUDA device")
            index = 0
            if args.get("model_instance_kind") == "GPU":
                index = int(args.get("model_instance_device_id", 0))
            device = torch.device("cuda", index)
        data_type = params.get("data_type", "").strip() or None
        dtype = ft_gpt.resolve_dtype(device, data_type, config.weight_data_type)

        beam_param = params.get("max_beam_width", "").strip()
        self.max_beam_width = int(beam_param) if beam_param else ft_generate.MAX_BEAM_WIDTH
        if self.max_beam_width < 1:
            raise ValueError(f"parameter max_beam_width={beam_param}: must be >= 1")
        # Read from the config itself (same as pb_utils.using_decoupled_model_transaction_policy).
        self.decoupled = bool(self.model_config.get("model_transaction_policy", {}).get("decoupled", False))

        self.model = ft_gpt.FTGPT.from_shards(checkpoint, device=device, dtype=dtype)
        self.defaults = ft_generate.GenerationDefaults.read(checkpoint)
        self.metrics = ft_metrics.Metrics(pb_utils, args.get("model_name", ""), args.get("model_version", ""),
                                          self.model_config.get("max_batch_size", 0))
        # In-flight batching: execute() queues requests; this thread admits them between decoding steps.
        self.max_rows = int(self.model_config.get("max_batch_size", 0))
        self._engine = ft_generate.Engine(self.model)
        self._incoming, self._running, self._stopping = queue.Queue(), {}, False
        self._lock = threading.Lock()  # the metrics, updated by execute() and the scheduler
        self._scheduler = threading.Thread(target=self._serve, name="ft_python scheduler", daemon=True)
        self._scheduler.start()
        _log(f"ft_python: loaded {checkpoint} (tp={config.tensor_para_size}, "
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
        started = time.monotonic()
        with self._lock:
            self.metrics.started(len(requests))
        for request in requests:
            sender = request.get_response_sender()
            try:
                batch = self._parse(request)
            except Exception as exc:  # noqa: BLE001 - a bad request fails alone
                self._close(_Work(request, sender, None, started), _error(f"bad request: {exc}"), failed=True)
                continue
            self._incoming.put(_Work(request, sender, batch, started))
        return None

    # ---------------------------------------------------------------- the scheduler thread
    def _serve(self):
        """Admit waiting requests between steps, step every running one, answer those that leave, until finalize()."""
        waiting = []
        while True:
            waiting += self._take(block=not waiting and not self._running)
            if self._stopping:
                break
            try:
                waiting = self._admit(waiting)
                self._drop_cancelled()
                for cohort in self._engine.step():
                    work = self._running.pop(id(cohort))
                    if cohort.error is not None:
                        self._close(work, _error(f"generation failed: {type(cohort.error).__name__}: "
                                                 f"{cohort.error}"), failed=True)
                    else:
                        self._close(work, self._response(cohort.output, slice(None), work.batch),
                                    generated=_generated(cohort.output, work.batch))
            except Exception as exc:  # noqa: BLE001 - a scheduler bug answers every running request, never hangs it
                _log(f"ft_python: the scheduler failed: {type(exc).__name__}: {exc}")
                for cohort in list(self._engine.cohorts):
                    self._engine.cancel(cohort)
                for work in self._running.values():
                    self._close(work, _error(f"generation failed: {type(exc).__name__}: {exc}"), failed=True)
                self._running.clear()
        for work in waiting + list(self._running.values()) + self._take(block=False):
            self._close(work, _error("the model is being unloaded"), failed=True)
        self._running.clear()

    def _take(self, block):
        """The requests queued by execute() (waiting for one when `block`); finalize() wakes a blocked call."""
        taken = []
        try:
            item = self._incoming.get(block=block)
            while True:
                if item is not None:
                    taken.append(item)
                item = self._incoming.get_nowait()
        except queue.Empty:
            pass
        return taken

    def _admit(self, waiting):
        """Prefill the waiting requests in arrival order while the running rows stay within max_batch_size
        (one request alone may be larger); returns those still waiting."""
        while waiting:
            work = waiting[0]
            rows = work.batch.input_ids.shape[0]
            running = sum(item.batch.input_ids.shape[0] for item in self._running.values())
            if running and self.max_rows and running + rows > self.max_rows:
                break
            waiting.pop(0)
            if _cancelled(work.request):
                self._close(work, None, cancelled=True)
                continue
            stream = self._streamer(work) if self.decoupled else None
            try:
                cohort = self._engine.admit(work.batch, stream=stream)
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory: this request fails alone
                self._close(work, _error(f"generation failed: {type(exc).__name__}: {exc}"), failed=True)
                continue
            self._running[id(cohort)] = work
            work.cohort = cohort
            with self._lock:
                self.metrics.batch(running + rows, int(work.batch.input_lengths.sum()))
        return waiting

    def _drop_cancelled(self):
        """Stop the requests whose client cancelled them; their caches are freed now."""
        for key, work in list(self._running.items()):
            if work.gone or _cancelled(work.request):
                self._engine.cancel(work.cohort)
                del self._running[key]
                self._close(work, None, cancelled=True)

    def _close(self, work, response, failed=False, cancelled=False, generated=0):
        """Send a request's final response and count it (ft_metrics). A cancelled request: a flags-only final on a
        stream, an error response on a plain model (which must send exactly one response)."""
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        if cancelled or (not failed and _cancelled(work.request)):
            _log("ft_python: a request was cancelled by its client; it is stopped and closed")
            response = None if self.decoupled else _error("the request was cancelled by its client")
        _send(work.sender, response, flags=final)
        with self._lock:
            if not work.answered:
                self.metrics.first_response(time.monotonic() - work.started)
            self.metrics.finished(1, int(failed), generated)

    def _streamer(self, work):
        """The stream callback of a decoupled request: a response after each step that grew its sequences."""
        prompt = int(work.batch.input_lengths.max())

        def send(partial):
            lengths = partial.sequence_length
            if work.gone or (work.last is not None and torch.equal(lengths, work.last)):
                return  # gone, or finished: nothing new to say until the final response
            work.last = lengths.clone()
            steps = partial.output_ids.shape[-1] - prompt
            if _cancelled(work.request) or not _send(work.sender, self._response(partial, slice(None), work.batch,
                                                                               steps=steps)):
                work.gone = True  # its client went away: stopped before the next step
            elif not work.answered:
                work.answered = True
                with self._lock:
                    self.metrics.first_response(time.monotonic() - work.started)

        return send

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
            self._stopping = True
            self._incoming.put(None)  # wakes a scheduler waiting for work
            self._scheduler.join()
        if getattr(self, "metrics", None) is not None:
            self.metrics.close()
        device = getattr(getattr(self, "model", None), "device", None)
        self.model = None
        if device is not None and device.type == "cuda":
            torch.cuda.empty_cache()
