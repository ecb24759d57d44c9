"""FasterTransformer's own Triton backend, for GPU clusters that have it: serves the FT shards directly, one
tritonserver per node across nodes (one MPI world). Its model types, by the shards' config.ini section: "GPT"
([gpt]: GPT-2, OPT, NeMo GPT), "GPT-J" ([gptj]) and "GPT-NeoX" ([gptneox]); Llama-family sources are refused.

Of the checkpoint's generation_config.json it applies config.ini's end_id only (the first eos id): FT's backend has
no eos set and no sampling defaults, so requests must send those inputs themselves (README "The served interface")."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from templates.ft_python.ft_checkpoint import CheckpointError

from ..jobs import JobShapeError, Resources, Step, node_share
from ..parallel import ParallelLayout
from .base import FT_MODEL_TYPES, ModelKind, ModelSettings, Require, Runtime
from .registry import register

if TYPE_CHECKING:
    from tritonclient.grpc import model_config_pb2 as pb

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
    model_kinds = (ModelKind.DECODER, ModelKind.ENCODER_DECODER)  # T5: model_type "T5"

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
        """TP*PP GPUs in all, as seed 003's table places them on nodes of `gpus_per_node` GPUs.

        One node when they fit: one tritonserver drives TP*PP GPUs; on part of a node the job sees only the first
        TP*PP devices (TP 4 on 8 GPUs: CUDA_VISIBLE_DEVICES=0,1,2,3). More: FT's multi-node backend runs one
        tritonserver (MPI rank) per node driving every GPU it sees, the same number on each node, so TP*PP is spread
        evenly over ceil(TP*PP / gpus_per_node) nodes (TP 8 x PP 3: 3 nodes of 8; TP 16: 2 nodes, its TP group
        spanning both). FT's world-size rule (`check_world_size`) holds for every shape planned here.
        """
        tensor_parallel, pipeline_parallel = layout.tensor_parallel, layout.pipeline_parallel
        world = tensor_parallel * pipeline_parallel
        if gpus_per_node < 1:
            raise JobShapeError(
                f"the fastertransformer runtime needs GPUs (TP*PP = {world}) but cluster.gpus_per_node=0"
            )
        nodes = math.ceil(world / gpus_per_node)
        if world % nodes:
            placeable = [count for count in range(1, 2 * world + gpus_per_node)
                         if count % math.ceil(count / gpus_per_node) == 0]
            lower = max(count for count in placeable if count < world)
            higher = min(count for count in placeable if count > world)
            raise JobShapeError(
                f"TP*PP = {tensor_parallel}*{pipeline_parallel} = {world} GPUs cannot be spread evenly over {nodes} "
                f"nodes of {gpus_per_node} GPUs: FT's multi-node backend runs one process per node driving the same "
                f"number of GPUs on each (world size = nodes x GPUs per node = TP*PP); choose TP*PP = {lower} or "
                f"{higher} (export.model.tensor_model_parallel_size x "
                "export.triton_deployment.pipeline_model_parallel_size), or set cluster.gpus_per_node to the nodes' "
                "real GPU count"
            )
        per_node = world // nodes
        shape = Resources(nodes=nodes, tasks_per_node=1, gpus_per_node=per_node,
                          visible_devices=node_share(per_node, gpus_per_node))
        check_world_size(shape, layout)
        return shape

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
        from ..triton import render  # the sub-stage that writes the repository loads tritonclient's protobuf

        if model_type == "T5":
            return render.encoder_decoder_model_config(settings.name, self.backend, settings.max_batch_size,
                                                       settings.instance_count, parameters)
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
                          layout: ParallelLayout) -> tuple[tuple[Step, ...], str, str]:
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
                f"NCCL world size = TP*PP = {tp}*{pp} = {tp * pp} = {shape.nodes} nodes x {shape.gpus_per_node} GPUs "
                "(global rank = node x GPUs per node + device; TP groups are consecutive ranks).",
                *tensor_parallel_cost(tp, shape.gpus_per_node),
                "Rank 0 (the first node, where this script runs) serves requests; the client below talks to it.",
            ),
        )
        return (server,), f"http://127.0.0.1:{SERVER_PORTS['http']}", f"127.0.0.1:{SERVER_PORTS['grpc']}"


def check_world_size(shape: Resources, layout: ParallelLayout) -> None:
    """FT's rule, checked before anything is submitted: world_size = MPI ranks (one per node) x GPUs each rank sees
    must equal tensor_para_size * pipeline_para_size. FT itself stops at load time with
    "world_size (8) should equal to tensor_para_size_ * pipeline_para_size_ (4 * 1 here)" (a whole 8-GPU node
    visible to a TP=4 model)."""
    tp, pp = layout.tensor_parallel, layout.pipeline_parallel
    visible = len(shape.visible_devices) or shape.gpus_per_node
    world = shape.nodes * shape.tasks_per_node * visible
    if shape.tasks_per_node != 1 or world != tp * pp:
        raise JobShapeError(
            f"FT's backend would stop with world_size ({world}) != tensor_para_size * pipeline_para_size ({tp} * "
            f"{pp}): the job gives {shape.nodes} node(s) x {shape.tasks_per_node} process(es) x {visible} visible "
            f"GPU(s); make them equal: one process per node, and CUDA_VISIBLE_DEVICES listing TP*PP / nodes = "
            f"{tp * pp / shape.nodes:g} GPUs on each node (or change TP/PP)"
        )


def tensor_parallel_cost(tensor_parallel: int, gpus_on_a_node: int) -> tuple[str, ...]:
    """Script notes on where a TP group's traffic goes: inside a node, or across nodes (TP groups are consecutive
    global ranks, rank = node x GPUs per node + device)."""
    if gpus_on_a_node % tensor_parallel == 0:
        return (f"Each TP group ({tensor_parallel} GPUs) stays inside a node (NVLink); only pipeline-stage hand-offs "
                "([batch, hidden] activations per token) cross nodes.",)
    if tensor_parallel % gpus_on_a_node == 0:
        where = f"TP={tensor_parallel} spans {tensor_parallel // gpus_on_a_node} nodes"
    else:
        where = f"TP groups of {tensor_parallel} GPUs straddle nodes of {gpus_on_a_node}"
    return (
        f"{where}: each layer's two tensor-parallel all-reduces of [batch, hidden] (after attention, after the MLP) "
        "run over NCCL across nodes,",
        "2 x layers of them per generated token, over InfiniBand (one 200 Gb/s HDR port: 25 GB/s per GPU) instead of "
        "NVLink inside a node (about 300 GB/s per direction per A100);",
        "FT's custom all-reduce (8 ranks of one node) does not apply. Prefer TP = GPUs per node and PP across nodes "
        "where the model fits.",
    )
