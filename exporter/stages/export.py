"""The export stage, planned as sub-stages: `convert` (checkpoint -> FT shards -> model repository), then
`accuracy` (serve the repository with tritonserver and score LAMBADA) when enabled.

Stages only plan (`plan` returns SubStage jobs); a launcher (exporter/launch/) executes the plan, and on the node
`python -m exporter.run_substage <saved config> export <sub_stage>` runs `RUNNERS[<sub_stage>]`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from omegaconf import DictConfig

from ..builtin import BUILTIN_CHECKPOINT, resolve_checkpoint
from ..ft.verify import read_config
from ..readers.hf import CheckpointError
from ..triton.render import ModelSettings
from ..triton.repo import build_repository
from .job import Resources, Step, SubStage, serving_resources

log = logging.getLogger(__name__)

# Ports of the multi-node server on each node (whole nodes are allocated, so the defaults are free).
SERVER_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}


@dataclass(frozen=True)
class ExportPaths:
    results_dir: Path
    model_dir: Path  # triton_deployment.triton_model_dir
    checkpoint_cache: Path  # where the built-in checkpoint is built

    @property
    def repository(self) -> Path:
        return self.model_dir.parent

    @property
    def model_name(self) -> str:
        return self.model_dir.name


def export_paths(cfg: DictConfig) -> ExportPaths:
    return ExportPaths(
        results_dir=Path(cfg.export.run.results_dir).resolve(),
        model_dir=Path(cfg.export.triton_deployment.triton_model_dir).resolve(),
        checkpoint_cache=Path(cfg.base_results_dir).resolve() / "builtin_checkpoints",
    )


def check_ft_backend(checkpoint: Path) -> None:
    """Refuse runtime=fastertransformer up front for sources FT's Triton backend cannot serve from this export."""
    from ..arch import architecture_for
    from ..readers import nemo_archive
    from ..readers.hf import HFCheckpoint

    if nemo_archive.is_nemo_source(Path(checkpoint)):
        from ..arch.nemo_gpt import ft_model_type_for

        if ft_model_type_for(nemo_archive.source_config(Path(checkpoint))) is None:
            raise CheckpointError(
                f"{checkpoint}: FT's GPT backend cannot serve this NeMo model (rotary positions, RMSNorm, SiLU or gated MLP "
                f"or grouped-query attention); serve it with export.triton_deployment.runtime=python"
            )
        return
    if not (Path(checkpoint) / "config.json").is_file():
        return  # neither HF nor NeMo: the converter refuses it with the reason
    config = HFCheckpoint(checkpoint).config
    arch = architecture_for(config)
    name = (config.get("architectures") or ["?"])[0]
    if arch.ft_model_type is None:
        raise CheckpointError(
            f"{name}: FasterTransformer has no backend for this architecture (no Llama-family model: RMSNorm, "
            f"SwiGLU, grouped-query attention); serve it with export.triton_deployment.runtime=python"
        )
    if arch.ft_model_type != "GPT":
        raise CheckpointError(
            f"{name}: FT's backend serves it as model_type {arch.ft_model_type!r} (config.ini [{arch.section}]), "
            f"but the rendered config.pbtxt declares model_type 'GPT'; serve it with "
            f"export.triton_deployment.runtime=python"
        )


def convert(cfg: DictConfig) -> Path:
    paths = export_paths(cfg)
    model, deploy = cfg.export.model, cfg.export.triton_deployment
    checkpoint = resolve_checkpoint(model.checkpoint_path, paths.checkpoint_cache)
    settings = ModelSettings(
        name=paths.model_name,
        runtime=deploy.runtime.value,
        max_batch_size=deploy.max_batch_size,
        tensor_para_size=model.tensor_model_parallel_size,
        pipeline_para_size=deploy.pipeline_model_parallel_size,
        data_type=deploy.data_type.value,
        model_checkpoint_path="",  # filled in by build_repository
        int8_mode=deploy.int8_mode,
        enable_custom_all_reduce=deploy.enable_custom_all_reduce,
        device=deploy.device,
        instance_count=deploy.instance_count,
        decoupled=deploy.decoupled,
        max_queue_delay_microseconds=deploy.max_queue_delay_microseconds,
        max_beam_width=deploy.max_beam_width,
    )
    return build_repository(
        paths.repository, checkpoint, settings, model.weight_data_type.value, processes=model.processes
    )


def accuracy(cfg: DictConfig, server_url: str | None = None) -> dict:
    """Score LAMBADA through tritonserver: one launched here, or (multi-node) the one already at `server_url`."""
    from ..evaluate import lambada
    from ..tokenizer import load_tokenizer

    paths = export_paths(cfg)
    acc = cfg.export.accuracy
    shard_dir = paths.model_dir / "1" / f"{cfg.export.model.tensor_model_parallel_size}-gpu"
    if not (shard_dir / "config.ini").is_file():
        raise FileNotFoundError(f"no exported model at {shard_dir}: run the convert sub-stage first")
    ft_config = read_config(shard_dir)
    end_id = ft_config["end_id"]
    # Context + label must fit both the requested length and the model's position table.
    max_seq_len = min(acc.runtime.max_seq_len, ft_config["max_pos_seq_len"])
    batch_size = min(acc.batch_size, cfg.export.triton_deployment.max_batch_size)
    if batch_size < acc.batch_size:
        log.warning("accuracy.batch_size %d exceeds the model's max_batch_size; using %d", acc.batch_size, batch_size)

    tokenizer = load_tokenizer(shard_dir)
    texts = lambada.read_texts(Path(acc.test_data), acc.limit)

    reference = None
    if acc.reference.value == "hf":
        from ..readers import nemo_archive

        checkpoint = resolve_checkpoint(cfg.export.model.checkpoint_path, paths.checkpoint_cache)
        try:
            import transformers  # noqa: F401
        except ImportError:
            log.warning("transformers is not installed: skipping the in-process reference accuracy")
        else:
            if nemo_archive.is_nemo_source(Path(checkpoint)):
                # No independent NeMo forward pass here (nemo_toolkit is optional): the exported shards are checked
                # against NeMo's own outputs by the tests; this run reports the served accuracy alone.
                log.warning("accuracy.reference=hf: %s is a NeMo checkpoint, which transformers cannot load; "
                            "reporting the served accuracy without a reference (set accuracy.reference=none "
                            "to silence this)", checkpoint)
            else:
                reference = lambada.HFGenerator(checkpoint, end_id)

    with _serving(cfg, paths, server_url) as url:
        results = lambada.evaluate(
            texts=texts,
            encode=lambda text: tokenizer.encode(text, add_special_tokens=False).ids,
            served=lambada.TritonGenerator(url, paths.model_name, end_id),
            reference=reference,
            metrics=[metric.value for metric in acc.metrics],
            batch_size=batch_size,
            max_seq_len=max_seq_len,
            tolerance=acc.tolerance,
            output_path=Path(acc.output_path),
            info={"model": paths.model_name, "repository": str(paths.repository), "test_data": acc.test_data},
        )
    print(summary(results, Path(acc.output_path)))
    return results


@contextlib.contextmanager
def _serving(cfg: DictConfig, paths: ExportPaths, server_url: str | None) -> Iterator[str]:
    """Yield the URL of a ready tritonserver on the repository: `server_url`'s, or one started (and stopped) here."""
    from ..serve.tritonserver import TritonServer, TritonServerError, find_tritonserver

    acc = cfg.export.accuracy
    if server_url is not None:
        address = server_url.split("://", 1)[-1]  # host:port, as tritonclient takes it
        log.info("using the tritonserver at %s (MPI rank 0 of the multi-node server)", address)
        _wait_until_ready(address, paths.repository, acc.server_timeout_s)
        yield address
        return
    install = find_tritonserver(acc.tritonserver)
    backend = cfg.export.triton_deployment.runtime.value
    if backend == "fastertransformer" and install.backend_dir is not None:
        if not (install.backend_dir / "fastertransformer").is_dir():
            raise TritonServerError(
                f"the fastertransformer runtime needs a tritonserver with FT's backend; {install.binary} has "
                f"none in {install.backend_dir} (use NVIDIA's FasterTransformer Triton container, set "
                f"export.accuracy.tritonserver, or serve with export.triton_deployment.runtime=python)"
            )
    log_path = paths.results_dir / "accuracy" / "tritonserver.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with TritonServer(paths.repository, log_path, install=install, startup_timeout_s=acc.server_timeout_s) as server:
        log.info("tritonserver ready at http://%s (log: %s)", server.http_url, log_path)
        yield server.http_url


def _wait_until_ready(address: str, repository: Path, timeout_s: float) -> None:
    """Poll a tritonserver we did not start (host:port) until it and every model of `repository` are ready."""
    import tritonclient.http as httpclient

    from ..serve.tritonserver import TritonServerError

    models = sorted(p.name for p in repository.iterdir() if (p / "config.pbtxt").is_file())
    client = httpclient.InferenceServerClient(address, connection_timeout=5.0, network_timeout=10.0)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if client.is_server_ready() and all(client.is_model_ready(model) for model in models):
                return
        except Exception:  # noqa: BLE001  not listening yet: connection refused / reset
            pass
        if time.monotonic() > deadline:
            raise TritonServerError(f"tritonserver at {address} not ready with models {models} after {timeout_s:g}s")
        time.sleep(2.0)


def summary(results: dict, output_path: Path) -> str:
    lines = [f"LAMBADA ({results['examples']} examples) -> {output_path}"]
    for metric, entry in results["metrics"].items():
        served = entry["served"]
        line = f"  {metric:<10} served {served['accuracy']:.4f} ({served['correct']}/{served['total']})"
        if "reference" in entry:
            line += (
                f"  reference {entry['reference']['accuracy']:.4f}  difference {entry['difference']:+.4f}"
                f"  same predictions {100 * entry['prediction_agreement']:.1f}%"
            )
        line += f"  [{entry['served_examples_per_second']} examples/s served]"
        lines.append(line)
    lines.append("  parity: " + ("passed" if results["passed"] else "FAILED"))
    return "\n".join(lines)


RUNNERS: dict[str, Callable[..., object]] = {"convert": convert, "accuracy": accuracy}


def plan(cfg: DictConfig) -> list[SubStage]:
    """convert: one task, no GPUs. accuracy (when enabled): the serving shape of the parallel layout, after convert.

    Raises JobShapeError (before anything is written or submitted) when the layout does not fit the nodes, and
    CheckpointError when runtime=fastertransformer is asked for a model FT's backend cannot serve.
    """
    paths = export_paths(cfg)
    run, deploy = cfg.export.run, cfg.export.triton_deployment
    if deploy.runtime.value == "fastertransformer" and cfg.export.model.checkpoint_path != BUILTIN_CHECKPOINT:
        # Here, not in the convert job: refused before anything is written or submitted (the built-in GPT-2 is
        # within FT's GPT).
        check_ft_backend(Path(cfg.export.model.checkpoint_path).expanduser())

    def sub_stage(name: str, steps: tuple[Step, ...], **kwargs) -> SubStage:
        return SubStage(name=name, stage="export", results_dir=paths.results_dir / name, config_name=run.name,
                        job_name=f"{run.name}_{name}", time_limit=run.time_limit, steps=steps, **kwargs)

    stages = [sub_stage("convert", (Step(entry=("export", "convert")),), resources=Resources())]
    if not cfg.export.accuracy.enabled:
        return stages
    tp, pp = cfg.export.model.tensor_model_parallel_size, deploy.pipeline_model_parallel_size
    shape = serving_resources(runtime=deploy.runtime.value, device=deploy.device, tensor_parallel=tp,
                              pipeline_parallel=pp, gpus_per_node=cfg.cluster.gpus_per_node)
    if shape.nodes == 1:
        # One node: the accuracy code launches tritonserver itself, next to the client.
        steps: tuple[Step, ...] = (Step(entry=("export", "accuracy")),)
    else:
        steps = _multi_node_serving(cfg, paths, tp, pp, shape)
    stages.append(sub_stage("accuracy", steps, resources=shape, depends_on=("convert",)))
    return stages


def _multi_node_serving(cfg: DictConfig, paths: ExportPaths, tp: int, pp: int, shape: Resources) -> tuple[Step, ...]:
    """One tritonserver per node as one MPI world (FT's multi-node backend); the client talks to rank 0."""
    binary = cfg.export.accuracy.tritonserver or "tritonserver"  # NVIDIA's Triton container has it on PATH
    server = Step(
        argv=(binary, f"--model-repository={paths.repository}",
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
    client = Step(entry=("export", "accuracy", "--server-url", f"http://127.0.0.1:{SERVER_PORTS['http']}"))
    return server, client
