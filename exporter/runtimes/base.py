"""What a serving runtime is: the one interface the rest of the exporter talks to.

A runtime serves the middle model of the ensemble (preprocessing -> model -> postprocessing). Every runtime takes
the same tensors (templates/ft_python/ft_interface.py) and reads the same FT shards; they differ in which Triton
backend runs the model, what goes into the model's version directory, its config.pbtxt, the job shape it needs,
and what it must check before serving. Nothing outside exporter/runtimes/ names a runtime: the rest asks the
registry (exporter/runtimes/__init__.py) for the configured one and calls these methods.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar

from templates.ft_python.ft_checkpoint import CheckpointError

from ..parallel import ParallelLayout
from ..jobs import Resources, Step

if TYPE_CHECKING:  # tritonclient's protobuf is loaded by exporter/triton/render.py, where configs are built
    from tritonclient.grpc import model_config_pb2 as pb

# require(condition, dotted config key, message): raises the configuration error naming the key when false.
Require = Callable[[bool, str, str], None]


class ModelKind(enum.Enum):
    """What the converter produced, and so which ensemble surrounds the model: decoder-only GPT models (FT's GPT
    layout), or encoder-decoder models (T5, UL2: FT's T5 layout, templates/ft_python/ft_t5_checkpoint.py). The
    values are the architectures' `model_kind` (exporter/arch/base.py)."""

    DECODER = "decoder"
    ENCODER_DECODER = "encoder-decoder"


@dataclass(frozen=True)
class ModelSettings:
    """How the middle model is served: the config.pbtxt settings every runtime shares (some ignore a few)."""

    name: str
    runtime: str  # a registered runtime's name (exporter/runtimes/__init__.py)
    max_batch_size: int
    layout: ParallelLayout
    data_type: str  # compute type: fp32 | fp16 | bf16
    int8_mode: int = 0  # 0 off, 1 weight-only int8 (FT quantises at load), 2 SmoothQuant (refused: see runtimes)
    enable_custom_all_reduce: bool = False
    device: str = "auto"
    instance_count: int = 1
    max_queue_delay_microseconds: int = 0
    # Streaming: the model answers each request with one response per generated token, then a final one.
    decoupled: bool = False
    max_beam_width: int = 4  # largest beam_width a request may ask for, where the runtime enforces one
    # How long an idle model waits for the next request before prefilling, where the runtime schedules (python).
    admission_window_microseconds: int = 5000
    # The TensorRT-LLM-compatible model beside the ensemble (exporter/triton/trtllm.py); None: none.
    trtllm_model_name: str | None = "trtllm"
    # The config.ini section of the shards (which of FT's models they are: FT_MODEL_TYPES), known once converted.
    section: str = "gpt"


# FT's Triton backend model_type for each config.ini section: the backend's ModelFactory (fastertransformer_backend
# src/libfastertransformer.cc) builds ParallelGpt for "GPT", GptJ for "GPT-J", GptNeoX for "GPT-NeoX", whose
# loaders read the [gpt], [gptj] and [gptneox] sections, and T5TritonModel for "T5" (an encoder-decoder export, whose
# config.ini has [encoder] / [decoder]: "t5" is its architecture's section name). The [llama] section has none.
FT_MODEL_TYPES = {"gpt": "GPT", "gptj": "GPT-J", "gptneox": "GPT-NeoX", "t5": "T5"}


class Runtime:
    """One serving runtime; subclasses register themselves with `exporter.runtimes.register`."""

    name: ClassVar[str]
    backend: ClassVar[str]  # the Triton backend that runs the model
    model_kinds: ClassVar[tuple[ModelKind, ...]] = (ModelKind.DECODER,)
    streams: ClassVar[bool] = False  # can serve decoupled (one response per generated token)

    def validate(self, cfg, require: Require) -> None:
        """Check the runtime's part of the validated config (`cfg` = the root DictConfig)."""

    def check_source(self, checkpoint: Path, settings: ModelSettings | None = None) -> None:
        """Refuse, before anything is written or submitted, a source this runtime cannot serve (CheckpointError),
        or cannot serve with `settings` (when given)."""

    def serving_resources(self, layout: ParallelLayout, device: str, gpus_per_node: int) -> Resources:
        """The shape of the job that serves the model (raises JobShapeError when it cannot be placed)."""
        raise NotImplementedError

    def install(self, version_dir: Path, settings: ModelSettings) -> None:
        """Put what the runtime needs beside the shards in `<model>/1/` (the shards are already there)."""

    def model_config(self, settings: ModelSettings, repository: Path) -> pb.ModelConfig:
        """The model's config.pbtxt; `repository` is where the finished repository will be."""
        raise NotImplementedError

    def check_server(self, backend_dir: Path | None, binary: Path) -> None:
        """Refuse a tritonserver that cannot run this runtime's backend (TritonServerError)."""

    def multi_node_server(self, repository: Path, tritonserver: str, shape: Resources,
                          layout: ParallelLayout) -> tuple[tuple[Step, ...], str, str]:
        """The steps that start the server on every node of a multi-node serving job (`shape`), and the HTTP URL
        and gRPC host:port at which the job's first node reaches it."""
        raise NotImplementedError(f"the {self.name} runtime serves on one node")

    def common_parameters(self, settings: ModelSettings, checkpoint_path: str) -> dict[str, object]:
        """The parameters FT's backend reads for the shards' model type, in the order of its all_models/<model>
        config.pbtxt; every runtime renders them. `model_type` is absent where FT has no model for the section;
        `int8_mode` is left out for GPT-J, GPT-NeoX and T5, whose factories do not read it (only "GPT"'s does)."""
        model_type = FT_MODEL_TYPES.get(settings.section)
        return {
            "tensor_para_size": settings.layout.tensor_parallel,
            "pipeline_para_size": settings.layout.pipeline_parallel,
            "data_type": settings.data_type,
            **({"model_type": model_type} if model_type else {}),
            "model_checkpoint_path": checkpoint_path,
            **({"int8_mode": settings.int8_mode} if model_type not in ("GPT-J", "GPT-NeoX", "T5") else {}),
            "enable_custom_all_reduce": settings.enable_custom_all_reduce,
        }

    def check_kind(self, kind: ModelKind) -> None:
        """Refuse, before converting, a kind of model this runtime does not serve (CheckpointError)."""
        from .registry import runtime_for, runtime_names

        if kind not in self.model_kinds:
            serving = [name for name in runtime_names() if kind in runtime_for(name).model_kinds]
            raise CheckpointError(f"the {self.name} runtime does not serve {kind.value} models; runtimes that do: "
                                  f"{serving or 'none yet'} (export.triton_deployment.runtime)")

    @staticmethod
    def shard_path(settings: ModelSettings, repository: Path) -> Path:
        """Where the model's shards are once the repository is in place: <repository>/<model>/1/<tp>-gpu."""
        return Path(repository) / settings.name / "1" / settings.layout.shard_dir_name
