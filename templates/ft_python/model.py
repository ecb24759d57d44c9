"""Triton python-backend model that serves FasterTransformer GPT shards with PyTorch.

Copied into `<model_name>/1/` of a generated model repository together with ft_checkpoint.py
ft_gpt.py and ft_generate.py. Same tensors as the fastertransformer backend (see the project contract):
inputs input_ids [B, L] (right-padded), input_lengths [B], request_output_len [B, 1] and
optional per-row sampling parameters; outputs output_ids [B, 1, T], sequence_length [B, 1],
cum_log_probs [B, 1], output_log_probs [B, 1, request_output_len].

Parameters (config.pbtxt, string_value): model_checkpoint_path (relative paths are resolved
against this file's directory, e.g. "1-gpu"), tensor_para_size (must match config.ini),
pipeline_para_size (stages run in sequence on one device), data_type (compute type on CUDA; CPU always computes in fp32),
int8_mode (0), device ("auto" | "cpu" | "cuda"; auto = cuda when available).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

import ft_checkpoint  # noqa: E402
import ft_gpt  # noqa: E402

# Optional scalar-per-row inputs: Triton name -> FTGPT.generate keyword.
OPTIONAL_INPUTS = {
    "runtime_top_k": "top_k",
    "runtime_top_p": "top_p",
    "temperature": "temperature",
    "repetition_penalty": "repetition_penalty",
    "random_seed": "random_seed",
    "end_id": "end_id",
    "beam_width": "beam_width",
}
# Accepted for compatibility with the FT backend's interface but without effect here:
# len_penalty and beam_search_diversity_rate only matter for beam search (rejected anyway),
# start_id is not used by GPT generation, and log probs are always returned.
IGNORED_INPUTS = ("len_penalty", "beam_search_diversity_rate", "start_id", "is_return_log_probs")


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


class TritonPythonModel:
    """One model instance: a verified, loaded FTGPT on the chosen device."""

    def initialize(self, args):
        self.model_config = json.loads(args["model_config"])
        params = {key: value.get("string_value", "")
                  for key, value in self.model_config.get("parameters", {}).items()}
        here = os.path.dirname(os.path.abspath(__file__))

        tp_param = params.get("tensor_para_size", "").strip()
        checkpoint = params.get("model_checkpoint_path", "").strip() or f"{tp_param or 1}-gpu"
        if not os.path.isabs(checkpoint):
            checkpoint = os.path.join(here, checkpoint)
        # Raises CheckpointError naming every missing / wrongly sized file: Triton then
        # refuses to load the model instead of serving garbage as FT would.
        config = ft_checkpoint.verify(checkpoint)
        if tp_param and int(tp_param) != config["tensor_para_size"]:
            raise ValueError(f"parameter tensor_para_size={tp_param} but {checkpoint}/config.ini "
                             f"says tensor_para_size={config['tensor_para_size']}")
        # The shards of every pipeline stage live in the same directory (layers keep their global
        # indices), so on one device the stages simply run one after the other: all layers in order.
        pp = params.get("pipeline_para_size", "").strip()
        if pp and int(pp) < 1:
            raise ValueError(f"pipeline_para_size={pp}: must be >= 1")
        int8 = params.get("int8_mode", "").strip()
        if int8 and int(int8) != 0:
            raise ValueError(f"int8_mode={int8} is not supported by the python runtime")

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
        dtype = ft_gpt.resolve_dtype(device, data_type, config["weight_data_type"])

        self.model = ft_gpt.FTGPT.from_shards(checkpoint, device=device, dtype=dtype)
        _log(f"ft_python: loaded {checkpoint} (tp={config['tensor_para_size']}, "
             f"weights {config['weight_data_type']}) on {device} computing in {dtype}")

    def _parse(self, request):
        """One request's inputs -> normalised per-row arguments (ValueError if invalid)."""
        ids = _input(request, "input_ids")
        if ids is None:
            raise ValueError("input_ids is required")
        ids = np.asarray(ids)
        if ids.ndim == 1:
            ids = ids[None, :]
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {list(ids.shape)}")
        batch = ids.shape[0]
        lengths = _input(request, "input_lengths")
        lengths = (np.full(batch, ids.shape[1]) if lengths is None
                   else _rows(lengths, batch, "input_lengths"))
        output_len = _input(request, "request_output_len")
        if output_len is None:
            raise ValueError("request_output_len is required")
        kwargs = {}
        for name, key in OPTIONAL_INPUTS.items():
            value = _input(request, name)
            if value is not None:
                value = _rows(value, batch, name)
                if key != "random_seed":  # seeds stay uint64 (python ints later)
                    value = value.astype(np.int64 if value.dtype.kind in "uib" else np.float64)
                kwargs[key] = value
        return self.model.check_inputs(
            ids.astype(np.int64), lengths.astype(np.int64),
            _rows(output_len, batch, "request_output_len", take_first=True).astype(np.int64),
            **kwargs)

    def execute(self, requests):
        """All valid requests form one generation batch; one response per request, in order."""
        parsed = []
        for request in requests:
            try:
                parsed.append(self._parse(request))
            except Exception as exc:  # noqa: BLE001 - a bad request fails alone
                parsed.append(exc)
        good = [p for p in parsed if isinstance(p, dict)]
        results = None
        failure = None
        if good:
            try:
                results = self._generate(good)
            except Exception as exc:  # noqa: BLE001 - report to every client instead of dying
                failure = f"generation failed: {type(exc).__name__}: {exc}"
        responses, row = [], 0
        for item in parsed:
            if not isinstance(item, dict):
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"bad request: {item}")))
                continue
            if failure is not None:
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(failure)))
                continue
            batch = item["input_ids"].shape[0]
            responses.append(self._response(results, slice(row, row + batch), item))
            row += batch
        return responses

    def _generate(self, items):
        """Concatenate the rows of all requests (padded to a common width) and generate."""
        width = max(int(it["input_lengths"].max()) for it in items)
        ids = torch.cat([
            torch.nn.functional.pad(it["input_ids"][:, :width],
                                    (0, max(0, width - it["input_ids"].shape[1])), value=0)
            for it in items])
        cat = {key: torch.cat([it[key] for it in items])
               for key in ("input_lengths", "max_new_tokens", "end_id", "top_k", "top_p",
                           "temperature", "repetition_penalty")}
        seeds = [s for it in items for s in it["random_seed"]]
        return self.model.generate(
            ids, cat["input_lengths"], cat["max_new_tokens"], end_id=cat["end_id"],
            top_k=cat["top_k"], top_p=cat["top_p"], temperature=cat["temperature"],
            repetition_penalty=cat["repetition_penalty"], random_seed=seeds)

    @staticmethod
    def _response(results, rows, item):
        """Cut one request's rows out of the batch result, sized for that request."""
        # T = this request's longest prompt + its largest request_output_len; every position
        # after a row's sequence_length already holds that row's end_id.
        width = int(item["input_lengths"].max()) + int(item["max_new_tokens"].max())
        steps = int(item["max_new_tokens"].max())
        outputs = [
            pb_utils.Tensor("output_ids",
                            results.output_ids[rows, :, :width].numpy().astype(np.uint32)),
            pb_utils.Tensor("sequence_length",
                            results.sequence_length[rows].numpy().astype(np.uint32)),
            pb_utils.Tensor("cum_log_probs",
                            results.cum_log_probs[rows].numpy().astype(np.float32)),
            pb_utils.Tensor("output_log_probs",
                            np.ascontiguousarray(
                                results.output_log_probs[rows, :, :steps].numpy(),
                                dtype=np.float32)),
        ]
        return pb_utils.InferenceResponse(output_tensors=outputs)

    def finalize(self):
        device = getattr(getattr(self, "model", None), "device", None)
        self.model = None
        if device is not None and device.type == "cuda":
            torch.cuda.empty_cache()
