"""FasterTransformer's own Triton backend, for GPU clusters that have it: serves the FT shards directly, one
tritonserver per node across nodes (one MPI world). Its model types, by the shards' config.ini section: "GPT"
([gpt]: GPT-2, OPT, NeMo GPT), "GPT-J" ([gptj]) and "GPT-NeoX" ([gptneox]); Llama-family sources are refused.

Of the checkpoint's generation_config.json it applies config.ini's end_id only (the first eos id): FT's backend has
no eos set and no sampling defaults, so requests must send those inputs themselves (README "The served interface")."""

from __future__ import annotations

import math
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as pb

from templates.ft_python.ft_checkpoint import CheckpointError

from ..jobs import JobShapeError, Resources, Step
from ..parallel import ParallelLayout
from ..triton import render
from .base import FT_MODEL_TYPES, ModelSettings, Require, Runtime
from .registry import register

# Ports of the multi-node server on each node (whole nodes are allocated, so the defaults are free).
SERVER_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}


def check_model_type(model_type: str, settings: ModelSettings) -> None:
    """Refuse settings FT's backend would not honour for `model_type` (CheckpointError). Its ModelFactory
    (fastertransformer_backend src/libfastertransformer.cc) reads int8_mode for "GPT" only, and builds GPT-NeoX as
    GptNeoXTritonModel<half> for data_type fp16 and <float> for anything else (no bf16)."""
    if settings.int8_mode and model_type != "GPT":
        raise CheckpointError(
            f"FT's backend quantises model_type 'GPT' only (GPT-2, OPT, NeMo GPT); a {model_type} model would be "
            f"served unquantised: set export.triton_deployment.int8_mode=0"
        )
    if model_type == "GPT-NeoX" and settings.data_type == "bf16":
        raise CheckpointError(
            "FT's backend runs GPT-NeoX in fp16 or fp32 only (data_type bf16 would silently compute in fp32): set "
            "export.triton_deployment.data_type=fp16 or fp32"
        )


@register
class FasterTransformerRuntime(Runtime):
    name = "fastertransformer"
    backend = "fastertransformer"

    def validate(self, cfg, require: Require) -> None:
        deploy = cfg.export.triton_deployment
        require(
            not deploy.decoupled,
            "export.triton_deployment.decoupled",
            "streaming through the ensemble needs the python runtime (FT's backend's streamed responses lack the "
            "prompt lengths postprocessing needs)",
        )
        require(
            deploy.int8_mode != 2,
            "export.triton_deployment.int8_mode",
            "2 (SmoothQuant) makes FT load int8 weight files and per-channel scales calibrated on activations, which "
            "this export does not produce; use 1 (weight-only int8, quantised by FT at load from these shards) or 0",
        )
        require(
            not (deploy.int8_mode == 1 and deploy.data_type.value == "fp32"),
            "export.triton_deployment.int8_mode",
            "1 (weight-only int8) does not run with fp32 compute in FT (ParallelGptDecoderLayerWeight refuses it); "
            "set export.triton_deployment.data_type=fp16 or bf16 (the shards' weight_data_type may be any)",
        )

    def check_source(self, checkpoint: Path, settings: ModelSettings | None = None) -> None:
        """Refuse up front the sources FT's Triton backend cannot serve from this export (read from configs only),
        and, given `settings`, the settings its model type cannot be served with."""
        from ..arch import describe_source
        from ..readers.source import SourceKind, source_kind

        try:
            source_kind(checkpoint)
        except CheckpointError:
            return  # no checkpoint this project reads: the converter refuses it with the reason
        source = describe_source(checkpoint)
        if source.ft_model_type is None and source.kind is SourceKind.NEMO:
            raise CheckpointError(
                f"{checkpoint}: FT's GPT backend cannot serve this NeMo model (rotary positions, RMSNorm, SiLU or "
                f"gated MLP or grouped-query attention); serve it with export.triton_deployment.runtime=python"
            )
        if source.ft_model_type is None:
            raise CheckpointError(
                f"{source.name}: FasterTransformer has no backend for this architecture (no Llama-family model: "
                f"RMSNorm, SwiGLU, grouped-query attention); serve it with export.triton_deployment.runtime=python"
            )
        if source.ft_unsupported:
            raise CheckpointError(
                f"{source.name}: FT's backend (model_type {source.ft_model_type!r}) would not compute this model: "
                f"{source.ft_unsupported}; serve it with export.triton_deployment.runtime=python"
            )
        if settings is not None:
            check_model_type(source.ft_model_type, settings)

    def serving_resources(self, layout: ParallelLayout, device: str, gpus_per_node: int) -> Resources:
        """TP*PP GPUs in all. On one node, one tritonserver uses them all. Across nodes, FT's Triton backend runs one
        tritonserver (one MPI rank) per node driving all of that node's GPUs, and keeps a tensor-parallel group
        inside a node: nodes = TP*PP / gpus_per_node whole nodes, TP dividing gpus_per_node."""
        tensor_parallel, pipeline_parallel = layout.tensor_parallel, layout.pipeline_parallel
        world = tensor_parallel * pipeline_parallel
        if gpus_per_node < 1:
            raise JobShapeError(
                f"the fastertransformer runtime needs GPUs (TP*PP = {world}) but cluster.gpus_per_node=0"
            )
        if world <= gpus_per_node:
            return Resources(nodes=1, tasks_per_node=1, gpus_per_node=world)
        nodes = math.ceil(world / gpus_per_node)
        if tensor_parallel > gpus_per_node or gpus_per_node % tensor_parallel:
            raise JobShapeError(
                f"TP={tensor_parallel} does not fit inside one node of {gpus_per_node} GPUs: FT's multi-node Triton "
                f"backend keeps each tensor-parallel group within a node (use TP dividing {gpus_per_node}, and "
                "pipeline parallelism across nodes)"
            )
        if world != nodes * gpus_per_node:
            raise JobShapeError(
                f"TP*PP = {tensor_parallel}*{pipeline_parallel} = {world} GPUs does not fill whole nodes of "
                f"{gpus_per_node} GPUs ({nodes} nodes have {nodes * gpus_per_node}): FT's multi-node Triton backend "
                "runs one process per node using every GPU of it"
            )
        return Resources(nodes=nodes, tasks_per_node=1, gpus_per_node=gpus_per_node)

    def model_config(self, settings: ModelSettings, repository: Path) -> pb.ModelConfig:
        if settings.decoupled:
            raise ValueError("decoupled (streaming) serving needs the python runtime")
        # FT's backend wants the absolute path of the shards: where they will be once the repository is in place.
        # It manages its GPUs itself (KIND_CPU instances) and is rendered without ragged inputs or dynamic batching.
        model_type = FT_MODEL_TYPES.get(settings.section)
        if model_type is None:
            raise CheckpointError(f"FT's backend has no model for config.ini section [{settings.section}]; "
                                  "serve it with export.triton_deployment.runtime=python")
        check_model_type(model_type, settings)
        parameters = self.common_parameters(settings, str(self.shard_path(settings, repository)))
        return render.decoder_model_config(settings.name, self.backend, settings.max_batch_size,
                                           settings.instance_count, parameters)

    def check_server(self, backend_dir: Path | None, binary: Path) -> None:
        from ..serve.tritonserver import TritonServerError

        if backend_dir is not None and not (backend_dir / self.backend).is_dir():
            raise TritonServerError(
                f"the fastertransformer runtime needs a tritonserver with FT's backend; {binary} has "
                f"none in {backend_dir} (use NVIDIA's FasterTransformer Triton container, set "
                f"export.accuracy.tritonserver, or serve with export.triton_deployment.runtime=python)"
            )

    def multi_node_server(self, repository: Path, tritonserver: str, shape: Resources,
                          layout: ParallelLayout) -> tuple[tuple[Step, ...], str]:
        """One tritonserver per node as one MPI world (FT's multi-node backend); clients talk to rank 0."""
        tp, pp = layout.tensor_parallel, layout.pipeline_parallel
        server = Step(
            argv=(tritonserver, f"--model-repository={repository}",
                  *(f"--{name}-port={port}" for name, port in SERVER_PORTS.items())),
            every_node=True,
            mpi=True,
            notes=(
                f"FT backend, multi-node: {shape.nodes} MPI ranks, one tritonserver per node, each driving its "
                f"{shape.gpus_per_node} GPUs;",
                f"NCCL world size = TP*PP = {tp}*{pp} = {tp * pp} = {shape.nodes} nodes x {shape.gpus_per_node} GPUs; "
                "TP groups stay inside a node, PP spans nodes.",
                "Rank 0 (the first node, where this script runs) serves requests; the client below talks to it.",
            ),
        )
        return (server,), f"http://127.0.0.1:{SERVER_PORTS['http']}"
