"""What the python runtime's Triton models (model.py for decoders, model_t5.py for encoder-decoders) read alike: a
request's inputs, and the model's config.pbtxt parameters (shard directory, device, beam cap, transaction policy).

Copied into generated repositories beside them; stdlib, numpy and torch only.
"""

import json
import os

import numpy as np
import torch


def input_array(pb_utils, request, name):
    """The input as a numpy array, or None when the request does not carry it."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def per_row(array, batch, name, take_first=False):
    """A per-row value [B] from an input shaped [B], [B, 1] or broadcast from one value.

    take_first: an input [B, n] gives its first column (e.g. request_output_len: FT reads one value per row)."""
    if take_first and array.ndim == 2 and array.shape[0] == batch:
        array = array[:, :1]
    flat = np.asarray(array).reshape(-1)
    if flat.size == 1:
        return np.repeat(flat, batch)
    if flat.size != batch:
        raise ValueError(f"{name} has shape {list(np.shape(array))}, expected [{batch}] or "
                         f"[{batch}, 1] for a batch of {batch}")
    return flat


class ModelArguments:
    """The model's config (model_config JSON) and its string parameters, read once in initialize()."""

    def __init__(self, args, here):
        self.args = args
        self.config = json.loads(args["model_config"])
        self.params = {key: value.get("string_value", "")
                       for key, value in self.config.get("parameters", {}).items()}
        self.here = here

    def param(self, name):
        return self.params.get(name, "").strip()

    def shard_dir(self, default_name):
        """model_checkpoint_path (relative paths against the model's directory), else default_name(tp or 1)."""
        tp = self.param("tensor_para_size")
        path = self.param("model_checkpoint_path") or default_name(tp or 1)
        return path if os.path.isabs(path) else os.path.join(self.here, path)

    def check_tensor_para_size(self, shard_dir, config_tp):
        tp = self.param("tensor_para_size")
        if tp and int(tp) != config_tp:
            raise ValueError(f"parameter tensor_para_size={tp} but {shard_dir}/config.ini says "
                             f"tensor_para_size={config_tp}")

    def check_int8_mode(self, note=""):
        int8 = self.param("int8_mode")
        if int8 and int(int8) != 0:
            raise ValueError(f"int8_mode={int8}: the python runtime serves the shards unquantised (int8_mode 0){note}")

    def device(self):
        """Parameter device ("auto" | "cpu" | "cuda"; auto = cuda when torch sees one): the instance's device (a GPU
        instance's own device id)."""
        wanted = (self.param("device") or "auto").lower()
        if wanted not in ("auto", "cpu", "cuda"):
            raise ValueError(f"parameter device={wanted!r}: expected auto, cpu or cuda")
        cuda = wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available())
        if not cuda:
            return torch.device("cpu")
        if not torch.cuda.is_available():
            raise RuntimeError("parameter device=cuda but torch sees no CUDA device")
        index = int(self.args.get("model_instance_device_id", 0)) if self.args.get("model_instance_kind") == "GPU" else 0
        return torch.device("cuda", index)

    def max_beam_width(self, default):
        value = self.param("max_beam_width")
        width = int(value) if value else default
        if width < 1:
            raise ValueError(f"parameter max_beam_width={value}: must be >= 1")
        return width

    def admission_window(self, default_us):
        """Parameter admission_window_microseconds: how long an idle model waits for the next arrival before
        prefilling (ft_scheduler.Scheduler._gather); seconds."""
        value = self.param("admission_window_microseconds")
        micros = int(value) if value else default_us
        if micros < 0:
            raise ValueError(f"parameter admission_window_microseconds={value}: must be >= 0")
        return micros / 1e6

    @property
    def decoupled(self):
        """Read from the config itself (as pb_utils.using_decoupled_model_transaction_policy does)."""
        return bool(self.config.get("model_transaction_policy", {}).get("decoupled", False))

    @property
    def max_batch_size(self):
        return int(self.config.get("max_batch_size", 0))
