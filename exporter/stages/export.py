"""The export stage, planned as sub-stages: `convert` (checkpoint -> FT shards -> model repository), then
`accuracy` (serve the repository with tritonserver and score LAMBADA) when enabled.

Stages only plan; a launcher (exporter/launch/) executes the plan.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig

from ..builtin import resolve_checkpoint
from ..ft.verify import read_config
from ..readers.hf import CheckpointError
from ..triton.render import ModelSettings
from ..triton.repo import build_repository

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SubStage:
    name: str
    results_dir: Path  # ${results_dir}/<name>/
    run: Callable[[], None]


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
    from ..readers.hf import HFCheckpoint

    if not (Path(checkpoint) / "config.json").is_file():
        return  # not an HF checkpoint: its reader decides
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
    if deploy.runtime.value == "fastertransformer":
        check_ft_backend(checkpoint)
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
    )
    return build_repository(
        paths.repository, checkpoint, settings, model.weight_data_type.value, processes=model.processes
    )


def accuracy(cfg: DictConfig) -> dict:
    from ..evaluate import lambada
    from ..serve.tritonserver import TritonServer, TritonServerError, find_tritonserver
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
        try:
            import transformers  # noqa: F401
        except ImportError:
            log.warning("transformers is not installed: skipping the in-process reference accuracy")
        else:
            checkpoint = resolve_checkpoint(cfg.export.model.checkpoint_path, paths.checkpoint_cache)
            reference = lambada.HFGenerator(checkpoint, end_id)

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
        results = lambada.evaluate(
            texts=texts,
            encode=lambda text: tokenizer.encode(text, add_special_tokens=False).ids,
            served=lambada.TritonGenerator(server.http_url, paths.model_name, end_id),
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


def plan(cfg: DictConfig) -> list[SubStage]:
    paths = export_paths(cfg)
    stages = [SubStage("convert", paths.results_dir / "convert", lambda: convert(cfg))]
    if cfg.export.accuracy.enabled:
        stages.append(SubStage("accuracy", paths.results_dir / "accuracy", lambda: accuracy(cfg)))
    return stages
