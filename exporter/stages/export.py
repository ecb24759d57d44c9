"""The export stage, planned as sub-stages: `convert` (checkpoint -> FT shards -> model repository), then
`accuracy` (serve the repository with tritonserver and score LAMBADA) when enabled.

Stages only plan (`plan` returns SubStage jobs); a launcher (exporter/launch/) executes the plan, and on the node
`python -m exporter.run_substage <saved config> export <sub_stage>` runs `RUNNERS[<sub_stage>]`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from omegaconf import DictConfig

from templates.ft_python.ft_t5_checkpoint import read_config as read_t5_config

from ..arch import describe_source
from ..atomic import AtomicDirectory
from ..builtin import resolve_checkpoint
from ..config import BUILTIN_TINY_GPT2, ConfigError, Reference
from ..ft.prompt_tables import PromptTables, load_prompt_tables
from ..ft.verify import read_config
from ..jobs import SERVER_HOST, Resources, Service, Step, SubStage
from ..lazy import imports_without_gc
from ..parallel import ParallelLayout
from ..readers.source import SourceKind, source_kind
from ..runtimes import ModelKind, ModelSettings, runtime_for
from ..serve import endpoints
from ..tokenizer import SpecialTokens, find_tokenizer, has_tokenizer

if TYPE_CHECKING:
    from templates.ft_python.ft_generate import GenerationDefaults

log = logging.getLogger(__name__)

LONG_S = 600.0  # an accuracy run expected to take longer than this is announced as a warning


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


def layout_of(cfg: DictConfig) -> ParallelLayout:
    return ParallelLayout(cfg.export.model.tensor_model_parallel_size,
                          cfg.export.triton_deployment.pipeline_model_parallel_size)


def model_settings(cfg: DictConfig) -> ModelSettings:
    deploy = cfg.export.triton_deployment
    return ModelSettings(
        name=export_paths(cfg).model_name,
        runtime=deploy.runtime.value,
        max_batch_size=deploy.max_batch_size,
        layout=layout_of(cfg),
        data_type=deploy.data_type.value,
        int8_mode=deploy.int8_mode,
        enable_custom_all_reduce=deploy.enable_custom_all_reduce,
        device=deploy.device,
        instance_count=deploy.instance_count,
        decoupled=deploy.decoupled,
        max_queue_delay_microseconds=deploy.max_queue_delay_microseconds,
        max_beam_width=deploy.max_beam_width,
        admission_window_microseconds=deploy.admission_window_microseconds,
        trtllm_model_name=deploy.trtllm_model_name or None,
    )


def build_repository(repo_root: Path, checkpoint_path: Path, settings: ModelSettings, weight_data_type: str,
                     processes: int = 1, special_tokens: SpecialTokens = SpecialTokens(),
                     skip_special_tokens: bool = True, prompt_tables: PromptTables | None = None) -> Path:
    """Fill one temporary directory in order, then rename it to `repo_root` (replacing an older one) when whole:

    1. convert: the checkpoint -> FT shards in `<model>/1/<tp>-gpu` (every check passes before anything is written);
    2. the runtime installs its model: its files beside the shards and its config.pbtxt;
    3. the text models around it for the model's kind: preprocessing, postprocessing, ensemble.

    special_tokens: what the served tokenizer adds around a prompt (default: as the checkpoint's tokenizer does);
    skip_special_tokens: postprocessing leaves special tokens out of its text; prompt_tables: FT's p/prompt-tuning
    tables beside the shards, and a task name input on the ensemble (exporter/ft/prompt_tables.py).
    """
    runtime = runtime_for(settings.runtime)
    source = describe_source(checkpoint_path)
    kind = ModelKind(source.model_kind)
    repo_root = Path(repo_root).resolve()
    runtime.check_kind(kind)  # before anything is written
    if kind is ModelKind.ENCODER_DECODER:
        _check_encoder_decoder(checkpoint_path, settings)
    with imports_without_gc():  # torch, tritonclient's protobuf and grpc: here, in the sub-stage, not the launcher
        from ..ft.convert import convert_checkpoint
        from ..triton import render

    with AtomicDirectory(repo_root) as partial:
        model_dir = partial / settings.name
        shard_dir = convert_checkpoint(checkpoint_path, model_dir / "1", settings.layout, weight_data_type,
                                       processes=processes, special_tokens=special_tokens, prompt_tables=prompt_tables)
        # which of FT's models they are (an encoder-decoder's config.ini has no single section: its architecture's)
        settings = replace(settings, section=source.section if kind is ModelKind.ENCODER_DECODER
                           else read_config(shard_dir).section)
        runtime.install(model_dir / "1", settings)
        render.write_config(runtime.model_config(settings, repo_root), model_dir)
        TEXT_MODELS[kind](partial, settings, shard_dir, skip_special_tokens)
    log.info("model repository ready: %s", repo_root)
    return repo_root


def _check_encoder_decoder(checkpoint_path: Path, settings: ModelSettings) -> None:
    """What an encoder-decoder repository needs beyond the shards, refused before anything is written: a tokenizer
    for pre/postprocessing."""
    if not has_tokenizer(checkpoint_path):
        find_tokenizer(checkpoint_path)  # TokenizerError naming what was looked for


def _decoder_text_models(repository: Path, settings: ModelSettings, shard_dir: Path,
                         skip_special_tokens: bool) -> None:
    from templates.ft_python.ft_generate import GenerationDefaults  # the runtime's (torch): not in the launcher
    from ..triton.repo import add_decoder_ensemble

    ft_config, defaults = read_config(shard_dir), GenerationDefaults.read(shard_dir)
    eos_ids = defaults.eos_token_ids or (ft_config.end_id,)  # postprocessing cuts at any of them
    # A request without an output length gets HF's: generation_config.json's, else 20 new tokens in the context.
    output_length = {"max_new_tokens": defaults.max_new_tokens, "max_length": defaults.max_length,
                     "max_pos_seq_len": ft_config.max_pos_seq_len}
    add_decoder_ensemble(repository, settings.name, settings.max_batch_size, ft_config.end_id,
                         shard_dir / "tokenizer.json", settings.max_queue_delay_microseconds, settings.decoupled,
                         eos_ids=eos_ids, skip_special_tokens=skip_special_tokens, output_length=output_length,
                         prompt_tasks=ft_config.prompt_tasks, prompt_start_id=ft_config.prompt_learning_start_id,
                         trtllm_model_name=settings.trtllm_model_name)


def _encoder_decoder_text_models(repository: Path, settings: ModelSettings, shard_dir: Path,
                                 skip_special_tokens: bool) -> None:
    from templates.ft_python.ft_generate import GenerationDefaults
    from ..triton.repo import add_encoder_decoder_ensemble

    ft_config, defaults = read_t5_config(shard_dir), GenerationDefaults.read(shard_dir)
    end_id = ft_config.eos_token_id
    eos_ids = defaults.eos_token_ids or (end_id,)
    add_encoder_decoder_ensemble(repository, settings.name, settings.max_batch_size, end_id,
                                 shard_dir / "tokenizer.json", encoder_decoder_new_tokens(defaults),
                                 settings.max_queue_delay_microseconds, eos_ids=eos_ids,
                                 skip_special_tokens=skip_special_tokens, decoupled=settings.decoupled)


def encoder_decoder_new_tokens(defaults: GenerationDefaults) -> int:
    """The tokens HF's `generate` makes for an encoder-decoder model without a length (transformers 5.24's
    _prepare_generated_length): generation_config's max_new_tokens, else its max_length less the decoder's start
    token, else 20 new tokens."""
    if defaults.max_new_tokens is not None:
        return defaults.max_new_tokens
    return max(1, defaults.max_length - 1) if defaults.max_length is not None else 20


# The pre/postprocessing and ensemble that surround each kind of model.
TEXT_MODELS = {ModelKind.DECODER: _decoder_text_models, ModelKind.ENCODER_DECODER: _encoder_decoder_text_models}


def convert(cfg: DictConfig) -> Path:
    paths = export_paths(cfg)
    model, tokenizer = cfg.export.model, cfg.export.tokenizer
    checkpoint = resolve_checkpoint(model.checkpoint_path, paths.checkpoint_cache)
    return build_repository(paths.repository, checkpoint, model_settings(cfg), model.weight_data_type.value,
                            processes=model.processes,
                            special_tokens=SpecialTokens(tokenizer.add_bos_token, tokenizer.add_eos_token),
                            skip_special_tokens=tokenizer.skip_special_tokens,
                            prompt_tables=prompt_tables_of(cfg))


def prompt_tables_of(cfg: DictConfig) -> PromptTables | None:
    """export.prompt_learning's tables, read and checked against each other (None: none configured)."""
    prompt = cfg.export.prompt_learning
    return load_prompt_tables(prompt.type.value, [dict(task) for task in prompt.tasks], prompt.nemo, prompt.start_id)


def accuracy(cfg: DictConfig, server_url: str | None = None, server_grpc_url: str | None = None) -> dict:
    """Score LAMBADA through tritonserver: one launched here, or (multi-node, k8s) the one already at `server_url`,
    whose gRPC host:port `server_grpc_url` the liveness check uses."""
    if (server_url is None) != (server_grpc_url is None):
        raise ConfigError("a tritonserver this step did not start needs both --server-url (HTTP, to score) and "
                          "--server-grpc-url (host:port, for the liveness check); got "
                          f"--server-url={server_url} --server-grpc-url={server_grpc_url}")
    from tokenizers import Tokenizer

    from ..evaluate import lambada

    paths = export_paths(cfg)
    acc = cfg.export.accuracy
    shard_dir = paths.model_dir / "1" / layout_of(cfg).shard_dir_name
    if not (shard_dir / "config.ini").is_file():
        raise FileNotFoundError(f"no exported model at {shard_dir}: run the convert sub-stage first")
    seq2seq = None
    if is_encoder_decoder(shard_dir):  # LAMBADA as a seq2seq task (lambada.Seq2Seq); relative positions: no table
        end_id, max_seq_len = read_t5_config(shard_dir).eos_token_id, acc.runtime.max_seq_len
        seq2seq = lambada.Seq2Seq(acc.mode_token or "")
    else:
        ft_config = read_config(shard_dir)
        end_id = ft_config.end_id
        # Context + label must fit both the requested length and the model's position table.
        max_seq_len = min(acc.runtime.max_seq_len, ft_config.max_pos_seq_len)
    batch_size = min(acc.batch_size, cfg.export.triton_deployment.max_batch_size)
    if batch_size < acc.batch_size:
        log.warning("accuracy.batch_size %d exceeds the model's max_batch_size; using %d", acc.batch_size, batch_size)

    # The server starts now, while the reference loads (transformers reading the source: 13-15 s for the default
    # SmolLM2 on 2 cores, against ~9 s for the server's start); the scoring waits for it (ready()).
    with _serving(cfg, paths, server_url, server_grpc_url) as ready:
        # The served tokenizer.json as it is (its special tokens decided at export): the ids preprocessing would send,
        # given to the served model and to the reference alike.
        tokenizer = Tokenizer.from_file(str(shard_dir / "tokenizer.json"))
        encoder = lambada.Encoder(lambda text, special: tokenizer.encode(text, add_special_tokens=special).ids)
        texts = lambada.read_texts(Path(acc.test_data), acc.limit, acc.stride)

        reference, reference_encoder, no_reference_reason = _reference(cfg, paths, end_id, seq2seq is not None)
        bounds = f"export.accuracy.limit={acc.limit} and export.accuracy.stride={acc.stride}"
        info = {"model": paths.model_name, "repository": str(paths.repository), "test_data": acc.test_data}
        tolerance = acc.tolerance
        if reference is None:
            log.warning("parity will not be checked: %s", no_reference_reason)
        else:  # a half-precision reference (on the GPU) widens the tolerance, and says so in the results
            tolerance, note = reference.placement.tolerance(acc.tolerance, len(texts))
            info.update(reference_device=reference.placement.device, reference_dtype=reference.placement.dtype)
            if note:
                info.update(tolerance_configured=acc.tolerance, tolerance_note=note)
                log.warning("%s", note)
            seconds, line = lambada.reference_cost(texts, reference_encoder or encoder, len(acc.metrics), reference,
                                                   batch_size, bounds)
            log.log(logging.WARNING if seconds > LONG_S else logging.INFO, "%s", line)

        results = lambada.evaluate(
            texts=texts,
            encoder=encoder,
            served=lambada.TritonGenerator(ready(), paths.model_name, end_id, seq2seq=seq2seq is not None),
            reference=reference,
            no_reference_reason=no_reference_reason,
            reference_encoder=reference_encoder,
            metrics=[metric.value for metric in acc.metrics],
            batch_size=batch_size,
            max_seq_len=max_seq_len,
            tolerance=tolerance,
            output_path=Path(acc.output_path),
            info=info,
            bounds=bounds,
            seq2seq=seq2seq,
        )
    print(summary(results, Path(acc.output_path)))
    return results


def is_encoder_decoder(shard_dir: Path) -> bool:
    """Whether the shards are an encoder-decoder's (config.ini [encoder] / [decoder], ft_t5_checkpoint.py)."""
    import configparser

    parser = configparser.ConfigParser()
    parser.read(shard_dir / "config.ini")
    return parser.has_section("encoder")


def _reference(cfg: DictConfig, paths: ExportPaths, end_id: int, seq2seq: bool = False):
    """(greedy generator, encoder, '') for the source checkpoint with HF transformers: its model and its own
    tokenizer loaded as `tok = AutoTokenizer.from_pretrained(checkpoint)` (with export.tokenizer's overrides), encoding
    with `tok(text)`; or (None, None, why there is no reference)."""
    from ..evaluate import lambada
    from ..evaluate.gguf_reference import gguf_parsed_once
    from ..evaluate.placement import reference_placement

    if cfg.export.accuracy.reference != Reference.hf:
        return None, None, "accuracy.reference=none"
    checkpoint = resolve_checkpoint(cfg.export.model.checkpoint_path, paths.checkpoint_cache)
    if source_kind(checkpoint) is SourceKind.NEMO:
        # No independent NeMo forward pass here (nemo_toolkit is optional): the exported shards are checked against
        # NeMo's own outputs by the tests; this run reports the served accuracy alone.
        return None, None, (f"{checkpoint} is a NeMo checkpoint, which transformers cannot load "
                            "(set accuracy.reference=none to say so)")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return None, None, "transformers is not installed"
    overrides = {key: value for key, value in cfg.export.tokenizer.items()
                 if key in ("add_bos_token", "add_eos_token") and value is not None}
    if source_kind(checkpoint) is SourceKind.GGUF:  # transformers reads the tokenizer from the file's metadata
        overrides.update(pretrained_model_name_or_path=str(checkpoint.parent), gguf_file=checkpoint.name)
    else:
        overrides.update(pretrained_model_name_or_path=str(checkpoint))
    placement = reference_placement(checkpoint, cfg.export.accuracy.reference_device)
    # A GGUF file is parsed once for the tokenizer and the model (transformers parses it three times otherwise).
    with gguf_parsed_once() if source_kind(checkpoint) is SourceKind.GGUF else contextlib.nullcontext():
        try:
            tokenizer = AutoTokenizer.from_pretrained(**overrides)
        except (OSError, ValueError) as error:  # the model loads, its tokenizer not: it scores the served ids
            log.warning("HF transformers cannot load %s's tokenizer (%s): the reference scores the served tokenizer's "
                        "ids", checkpoint, str(error).splitlines()[0] if str(error) else type(error).__name__)
            return lambada.HFGenerator(checkpoint, end_id, placement, seq2seq), None, ""
        encoder = lambada.Encoder(lambda text, special: tokenizer(text, add_special_tokens=special).input_ids)
        return lambada.HFGenerator(checkpoint, end_id, placement, seq2seq), encoder, ""


@contextlib.contextmanager
def _serving(cfg: DictConfig, paths: ExportPaths, server_url: str | None,
             server_grpc_url: str | None) -> Iterator[Callable[[], str]]:
    """Yield `ready()`, which returns the URL of a ready tritonserver on the repository: `server_url`'s, or one
    started (and stopped) here. The one started here is spawned on entry and waited for at the first `ready()`, so
    that the caller's work in between (the reference loading) overlaps its start."""
    from ..serve import health
    from ..serve.tritonserver import TritonServer, find_tritonserver

    acc = cfg.export.accuracy
    if server_url is not None:
        address = server_url.split("://", 1)[-1]  # host:port, as tritonclient takes it

        def ready_external() -> str:
            log.info("using the tritonserver at %s (started by the job, not by this step)", address)
            _wait_until_ready(address, paths.repository, acc.server_timeout_s)
            _refuse_unhealthy(server_grpc_url.split("://", 1)[-1], address)
            return address

        yield functools.cache(ready_external)
        return
    install = find_tritonserver(acc.tritonserver)
    runtime_for(cfg.export.triton_deployment.runtime).check_server(install.backend_dir, install.binary)
    log_path = paths.results_dir / "accuracy" / "tritonserver.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    server = TritonServer(paths.repository, log_path, install=install, startup_timeout_s=acc.server_timeout_s)
    server.spawn()

    def ready() -> str:
        server.wait_ready()
        # Ready is not proof of a live stub (exporter/serve/health.py): every model answers one tiny request first.
        for problem in health.ensure_healthy(server):
            log.warning("restarted tritonserver: %s", problem)
        log.info("tritonserver ready at http://%s (log: %s)", server.http_url, log_path)
        return server.http_url

    try:
        yield functools.cache(ready)
    finally:
        server.stop()


def _refuse_unhealthy(grpc_address: str, address: str) -> None:
    """Fail fast when a model of a server we did not start fails the inferring liveness check (a dead stub is
    "ready"); that server is not ours to restart, so the error says who can."""
    from ..serve import health
    from ..serve.tritonserver import TritonServerError

    problems = health.check(grpc_address, timeout_s=LIVENESS_TIMEOUT_S)
    if problems:
        found = "; ".join(str(problem).rstrip(".") for problem in problems)
        raise TritonServerError(
            f"tritonserver at {address} reports ready, but the liveness check (one tiny inference per model over "
            f"gRPC at {grpc_address}) failed: {found}. This step did not start that server, so it cannot restart "
            "it: restart the server (its job or pod) and run the accuracy sub-stage again")


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
    if results["parity"] == "not checked":
        lines.append(f"  parity: not checked (no reference: {results['parity_note']})")
    else:
        lines.append("  parity: " + ("passed" if results["passed"] else "FAILED"))
    return "\n".join(lines)


def openai(cfg: DictConfig) -> None:
    """Serve the repository with tritonserver and the OpenAI API in front of it until interrupted (or the job ends).

    The tritonserver binary and readiness timeout are accuracy's keys; a decoupled export answers every request
    through its stream."""
    from ..openai.server import make_server, serve
    from ..serve.tritonserver import TritonServer, find_tritonserver

    paths, settings, front = export_paths(cfg), model_settings(cfg), cfg.export.openai
    install = find_tritonserver(cfg.export.accuracy.tritonserver)
    log_path = paths.results_dir / "openai" / "tritonserver.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with TritonServer(paths.repository, log_path, install=install,
                      startup_timeout_s=cfg.export.accuracy.server_timeout_s) as server:
        plain, stream = (None, settings.name) if settings.decoupled else (settings.name, None)
        serve(make_server(paths.repository, server.http_url, plain, host=front.host, port=front.port,
                          grpc_url=server.grpc_url, stream_model=stream, served_name=front.served_model_name))


RUNNERS: dict[str, Callable[..., object]] = {"convert": convert, "accuracy": accuracy, "openai": openai}


def plan(cfg: DictConfig) -> list[SubStage]:
    """convert: one task, no GPUs. accuracy (when enabled): the runtime's serving shape, after convert.

    Raises JobShapeError (before anything is written or submitted) when the layout does not fit the nodes, and
    CheckpointError when the checkpoint is damaged, of an unknown architecture, or one the runtime cannot serve.
    """
    paths = export_paths(cfg)
    run, deploy = cfg.export.run, cfg.export.triton_deployment
    runtime = runtime_for(deploy.runtime)
    if cfg.export.model.checkpoint_path != BUILTIN_TINY_GPT2:
        # Here, not in the convert job: refused before anything is written or submitted (a missing built-in SmolLM2
        # package too; the built-in GPT-2, built by the convert job, is served by every runtime).
        checkpoint = resolve_checkpoint(cfg.export.model.checkpoint_path, paths.checkpoint_cache)
        if checkpoint.exists():  # else it may exist only where the convert job runs (a cluster's file system)
            # damaged files, unknown architecture: one CheckpointError, nothing written
            if ModelKind(describe_source(checkpoint).model_kind) is ModelKind.ENCODER_DECODER:
                runtime.check_kind(ModelKind.ENCODER_DECODER)
                _check_encoder_decoder(checkpoint, model_settings(cfg))
                if cfg.export.openai.enabled:
                    raise ConfigError("export.openai.enabled: the OpenAI front end serves decoder models only; "
                                      "set it false for an encoder-decoder (T5) checkpoint")
        runtime.check_source(checkpoint, model_settings(cfg))
    prompt = cfg.export.prompt_learning
    if all(Path(path).exists() for path in [task.path for task in prompt.tasks] + ([prompt.nemo] if prompt.nemo
                                                                                    else [])):
        prompt_tables_of(cfg)  # unreadable or inconsistent tables: refused here, before any job exists

    def sub_stage(name: str, steps: tuple[Step, ...], **kwargs) -> SubStage:
        return SubStage(name=name, stage="export", results_dir=paths.results_dir / name, config_name=run.name,
                        job_name=f"{run.name}_{name}", time_limit=run.time_limit, steps=steps, **kwargs)

    stages = [sub_stage("convert", (Step(entry=("export", "convert")),), resources=Resources())]
    if not (cfg.export.accuracy.enabled or cfg.export.openai.enabled):
        return stages
    layout = layout_of(cfg)
    shape = runtime.serving_resources(layout, deploy.device, cfg.cluster.gpus_per_node)
    if cfg.export.accuracy.enabled:
        stages.append(_accuracy_sub_stage(cfg, sub_stage, paths, shape, layout))
    if cfg.export.openai.enabled:  # last: it serves until the job ends
        if shape.nodes != 1:
            raise ConfigError(f"export.openai.enabled serves on one node; this layout needs {shape.nodes} nodes")
        after = ("convert", "accuracy") if cfg.export.accuracy.enabled else ("convert",)
        stages.append(sub_stage("openai", (Step(entry=("export", "openai")),), resources=shape, depends_on=after))
    return stages


LIVENESS_TIMEOUT_S = 30  # one tiny inference; longer than a busy batch step, so a working model is not killed


def _accuracy_sub_stage(cfg: DictConfig, sub_stage, paths, shape, layout) -> SubStage:
    runtime = runtime_for(cfg.export.triton_deployment.runtime)
    binary = cfg.export.accuracy.tritonserver or "tritonserver"  # NVIDIA's Triton containers have it on PATH
    if shape.nodes == 1:
        # One node: the accuracy code launches tritonserver itself, next to the client.
        steps: tuple[Step, ...] = (Step(entry=("export", "accuracy")),)
        servers: tuple[Step, ...] = (Step(argv=endpoints.server_argv(binary, paths.repository)),)
    else:
        servers, url, grpc_url = runtime.multi_node_server(paths.repository, binary, shape, layout)
        steps = (*servers, Step(entry=("export", "accuracy", "--server-url", url, "--server-grpc-url", grpc_url)))
    # The same job as a server and its client, for launchers that run the server as its own workload (k8s).
    ports = dict(endpoints.PORTS)
    client = Step(entry=("export", "accuracy", "--server-url", f"http://{SERVER_HOST}:{ports['http']}",
                         "--server-grpc-url", f"{SERVER_HOST}:{ports['grpc']}"))
    # Liveness that infers (a dead python-backend stub leaves the server "ready"), run inside the server's pod.
    liveness = ("-m", "exporter.serve.health", "--url", f"127.0.0.1:{ports['grpc']}",
                "--timeout", str(LIVENESS_TIMEOUT_S))
    service = Service(servers=servers, ports=endpoints.PORTS, ready_path=endpoints.READY_PATH, client=(client,),
                      liveness=liveness)
    return sub_stage("accuracy", steps, resources=shape, depends_on=("convert",), service=service)
