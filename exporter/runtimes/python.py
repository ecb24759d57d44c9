"""The embedded default: Triton's python backend running templates/ft_python/, which reads the FT shards with
PyTorch on CPU or GPU. It is how everything is served on machines without FT's backend, and how the shards are
proven right."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from ..jobs import JobShapeError, Resources, node_share
from ..parallel import ParallelLayout
from ..triton import PYTHON_BACKEND
from .base import ModelKind, ModelSettings, Require, Runtime
from .registry import register

if TYPE_CHECKING:
    from tritonclient.grpc import model_config_pb2 as pb

# Copied flat into the model's version directory, beside the shards: the python backend's model.py and the modules
# it imports (stdlib + numpy + torch only), so a stock tritonserver serves the repository without this package.
FILES = ("ft_python/model.py", "ft_python/ft_checkpoint.py", "ft_python/ft_gpt.py", "ft_python/ft_rotary.py",
         "ft_python/ft_generate.py", "ft_python/ft_interface.py", "ft_python/ft_metrics.py",
         "ft_python/ft_scheduler.py", "ft_python/ft_request.py", "ft_python/ft_imports.py")
# An encoder-decoder (T5 shards, config.ini section "t5"): model_t5.py is installed as the backend's model.py.
T5_SECTION = "t5"
T5_MODEL = "ft_python/model_t5.py"
T5_FILES = ("ft_python/ft_checkpoint.py", "ft_python/ft_generate.py", "ft_python/ft_interface.py",
            "ft_python/ft_t5.py", "ft_python/ft_t5_checkpoint.py", "ft_python/ft_t5_interface.py",
            "ft_python/ft_metrics.py", "ft_python/ft_scheduler.py", "ft_python/ft_request.py",
            "ft_python/ft_imports.py")


@register
class PythonRuntime(Runtime):
    name = "python"
    backend = PYTHON_BACKEND
    streams = True
    model_kinds = (ModelKind.DECODER, ModelKind.ENCODER_DECODER)

    def validate(self, cfg, require: Require) -> None:
        require(
            cfg.export.triton_deployment.int8_mode == 0,
            "export.triton_deployment.int8_mode",
            "the python runtime serves the shards unquantised (fp32/fp16/bf16 compute); weight-only int8 "
            "(int8_mode=1) needs export.triton_deployment.runtime=fastertransformer",
        )

    def serving_resources(self, layout: ParallelLayout, device: str, gpus_per_node: int) -> Resources:
        """One process serves every rank on one device -> 1 node, 1 task, 1 GPU (none on CPU): device 0 of a node
        with more."""
        if device == "cuda" and gpus_per_node == 0:
            raise JobShapeError("triton_deployment.device=cuda but cluster.gpus_per_node=0 (CPU-only nodes)")
        gpus = 0 if device == "cpu" or gpus_per_node == 0 else 1
        return Resources(nodes=1, tasks_per_node=1, gpus_per_node=gpus, visible_devices=node_share(gpus, gpus_per_node))

    def install(self, version_dir: Path, settings: ModelSettings) -> None:
        from ..triton import render  # here, not at the top: the launcher imports this module, the sub-stage installs
        from ..triton.repo import TEMPLATES, copy_templates

        if settings.section == T5_SECTION:
            copy_templates(T5_FILES, version_dir)
            shutil.copy2(TEMPLATES / T5_MODEL, version_dir / "model.py")
            return
        copy_templates(FILES, version_dir)
        render.write_warmup_files(version_dir.parent)  # the model_warmup request's inputs

    def model_config(self, settings: ModelSettings, repository: Path) -> pb.ModelConfig:
        from ..triton import render

        # The python backend hands every request's tensors to execute() separately, so requests with different
        # prompt (and word-list) lengths share a dynamic batch without padding: every -1 input is ragged. No
        # BATCH_ITEM_SHAPE batch input is needed (tritonserver 2.51's python backend accepts one in the config but
        # never provides the tensor).
        parameters = self.common_parameters(settings, settings.layout.shard_dir_name)  # relative: movable repository
        parameters["device"] = settings.device
        parameters["max_beam_width"] = settings.max_beam_width
        parameters["admission_window_microseconds"] = settings.admission_window_microseconds
        if settings.section == T5_SECTION:  # FT's T5 tensors (model_t5.py); no warm-up request: GPT's tensors
            return render.encoder_decoder_model_config(
                settings.name, self.backend, settings.max_batch_size, settings.instance_count, parameters,
                ragged=True, decoupled=settings.decoupled,
                max_queue_delay_microseconds=settings.max_queue_delay_microseconds)
        return render.decoder_model_config(
            settings.name, self.backend, settings.max_batch_size, settings.instance_count, parameters,
            ragged=True, decoupled=settings.decoupled,
            max_queue_delay_microseconds=settings.max_queue_delay_microseconds, warmup=True,
        )
