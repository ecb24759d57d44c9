"""Launchers without a cluster: the scripts they write (read line by line), job shapes, refusals, dry runs.

Golden layout: TP=8, PP=2 with the FT runtime on nodes of 8 GPUs -> the accuracy job needs 2 nodes, one
tritonserver (MPI rank) per node. Each check names the directive it is about; nothing compares a pasted blob.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from exporter.config import ConfigError, validate
from exporter.launch import LaunchError
from exporter.launch.slurm import parse_job_id, sbatch_argv
from exporter.stages import JobShapeError
from exporter.jobs import Resources
from exporter.parallel import ParallelLayout
from exporter.runtimes import runtime_for
from test_config import composed

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "nvcr.io/nvidia/tritonserver:23.04-py3"
MULTI_NODE = (
    "export.model.checkpoint_path=builtin:tiny-gpt2",  # FT's backend serves GPT-2, not the default SmolLM2 (Llama)
    "export.model.tensor_model_parallel_size=8", "export.triton_deployment.pipeline_model_parallel_size=2",
    "export.triton_deployment.runtime=fastertransformer", "cluster.gpus_per_node=8",
)


def dry_run(tmp_path: Path, monkeypatch, *overrides: str) -> Path:
    """main.run with dry_run=true from tmp_path; returns ${results_dir}."""
    from main import run

    monkeypatch.chdir(tmp_path)
    if not any(override.startswith("export.model.checkpoint_path=") for override in overrides):
        # The launch plans, not a model: the tiny built-in, which every runtime serves (the SmolLM2 default is a
        # Llama, which FT's backend cannot serve).
        overrides = ("export.model.checkpoint_path=builtin:tiny-gpt2", *overrides)
    cfg = validate(composed(f"base_results_dir={tmp_path / 'results'}", "dry_run=true", *overrides))
    run(cfg)
    return Path(cfg.export.run.results_dir)


def directives(script: Path) -> dict[str, str]:
    """#SBATCH --key=value lines -> {key: value} (value '' for a flag)."""
    found = {}
    for line in script.read_text().splitlines():
        if line.startswith("#SBATCH "):
            (option,) = shlex.split(line[len("#SBATCH "):])
            key, _, value = option.partition("=")
            assert key not in found, f"{key} given twice"
            found[key] = value
    return found


def commands(script: Path, program: str) -> list[list[str]]:
    """Every command line of `script` that starts with `program`, as argv (a trailing & kept as the last word)."""
    return [shlex.split(line) for line in script.read_text().splitlines() if line.startswith(program + " ")]


def options_before(argv: list[str], program_index: int) -> list[str]:
    return argv[1:program_index]


@pytest.fixture
def golden_bcm(tmp_path, monkeypatch) -> Path:
    return dry_run(tmp_path, monkeypatch, "cluster_type=bcm", *MULTI_NODE, "cluster.partition=batch",
                   "cluster.account=llm", f"cluster.container={IMAGE}", "cluster.container_mounts=[/data:/data]",
                   "cluster.srun_args=[--no-container-mount-home]", "cluster.job_name_prefix=team-",
                   "export.run.time_limit=0:30:00")


def test_golden_sbatch_accuracy_two_nodes(golden_bcm):
    script = golden_bcm / "accuracy" / "launcher.sh"
    found = directives(script)
    assert found["--nodes"] == "2"
    assert found["--ntasks-per-node"] == "1"  # one tritonserver per node
    assert found["--gpus-per-node"] == "8"
    assert found["--job-name"] == "team-export_gpt2_accuracy"
    assert found["--partition"] == "batch" and found["--account"] == "llm"
    assert found["--time"] == "0:30:00"
    assert "--exclusive" in found and found["--mem"] == "0"
    assert found["--output"] == str(golden_bcm / "accuracy" / "log-team-export_gpt2_accuracy_%j.out")
    assert found["--error"].endswith("accuracy/log-team-export_gpt2_accuracy_%j.err")
    assert "--gpus-per-task" not in found and "--overcommit" not in found

    server, client = commands(script, "srun")
    # The server: every node, one MPI world, in the container, in the background.
    assert server[-1] == "&"
    program = server.index("tritonserver")
    options = options_before(server, program)
    assert "--nodes=2" in options and "--ntasks-per-node=1" in options and "--mpi=pmix" in options
    assert f"--container-image={IMAGE}" in options and "--no-container-mount-home" in options
    mounts = next(o for o in options if o.startswith("--container-mounts=")).split("=", 1)[1].split(",")
    assert str(ROOT) in mounts and "/data:/data" in mounts and str(golden_bcm.parents[1]) in mounts
    assert f"--model-repository={golden_bcm / 'model_repo'}" in server
    # The client: one task on the first node (MPI rank 0), beside the server, talking to it locally.
    assert client[-1] != "&"
    program = client.index("python3")  # the container's interpreter
    options = options_before(client, program)
    assert {"--nodes=1", "--ntasks=1", "--relative=0", "--overlap"} <= set(options)
    assert "--mpi=pmix" not in options and f"--container-image={IMAGE}" in options
    assert client[program:] == ["python3", "-m", "exporter.run_substage",
                                str(golden_bcm / "accuracy" / "export_gpt2_hydra.yaml"), "export", "accuracy",
                                "--server-url", "http://127.0.0.1:8000", "--server-grpc-url", "127.0.0.1:8001"]
    text = script.read_text()
    assert "NCCL world size = TP*PP = 8*2 = 16 = 2 nodes x 8 GPUs" in text  # the MPI requirements, written out
    assert "trap 'kill $(jobs -p)" in text  # the background servers end with the job


def test_golden_sbatch_convert_one_task(golden_bcm):
    script = golden_bcm / "convert" / "launcher.sh"
    found = directives(script)
    assert found["--nodes"] == "1" and found["--ntasks-per-node"] == "1"
    assert "--gpus-per-node" not in found  # conversion runs on the CPU
    assert found["--job-name"] == "team-export_gpt2_convert"
    (srun,) = commands(script, "srun")
    assert srun[srun.index("python3"):] == ["python3", "-m", "exporter.run_substage",
                                            str(golden_bcm / "convert" / "export_gpt2_hydra.yaml"), "export", "convert"]
    assert "trap" not in script.read_text()


def test_golden_dependency_and_saved_configs(golden_bcm):
    convert_cmd = shlex.split((golden_bcm / "convert" / "launcher_cmd.log").read_text())
    accuracy_cmd = shlex.split((golden_bcm / "accuracy" / "launcher_cmd.log").read_text())
    assert convert_cmd == ["sbatch", "--parsable", str(golden_bcm / "convert" / "launcher.sh")]
    assert not any(word.startswith("--dependency") for word in convert_cmd)
    assert "--dependency=afterok:<job id of convert>" in accuracy_cmd  # dry run: no id exists yet
    assert accuracy_cmd[-1] == str(golden_bcm / "accuracy" / "launcher.sh")
    # Real submission: afterok on the id sbatch printed, and a failed convert cancels accuracy.
    assert sbatch_argv(Path("/r/a.sh"), ["41"]) == [
        "sbatch", "--parsable", "--dependency=afterok:41", "--kill-on-invalid-dep=yes", "/r/a.sh"]
    from omegaconf import OmegaConf

    for sub_stage in ("convert", "accuracy"):
        saved = OmegaConf.load(golden_bcm / sub_stage / "export_gpt2_hydra.yaml")
        assert saved.export.model.tensor_model_parallel_size == 8 and saved.cluster.container == IMAGE
        validate(saved)  # what the job runs from is a complete, valid config
    assert not (golden_bcm / "model_repo").exists()  # a dry run converts nothing


def test_golden_bcprun(tmp_path, monkeypatch):
    results = dry_run(tmp_path, monkeypatch, "cluster_type=bcp", "cluster=bcp", *MULTI_NODE)
    script = results / "accuracy" / "launcher.sh"
    server, client = commands(script, "bcprun")
    assert server[:5] == ["bcprun", "--nnodes", "2", "--npernode", "1"] and server[5] == "--cmd"
    assert server[-1] == "&" and len(server) == 8
    inner = shlex.split(server[6])
    assert inner[:3] == ["env", f"--chdir={tmp_path}", f"PYTHONPATH={ROOT}"]
    assert inner[3] == "tritonserver" and f"--model-repository={results / 'model_repo'}" in inner
    assert client[:5] == ["bcprun", "--nnodes", "1", "--npernode", "1"] and client[5] == "--cmd"
    inner = shlex.split(client[6])
    assert inner[3:] == [sys.executable, "-m", "exporter.run_substage",
                         str(results / "accuracy" / "export_gpt2_hydra.yaml"), "export", "accuracy",
                         "--server-url", "http://127.0.0.1:8000", "--server-grpc-url", "127.0.0.1:8001"]
    assert "NCCL world size = TP*PP = 8*2 = 16" in script.read_text()
    (convert,) = commands(results / "convert" / "launcher.sh", "bcprun")
    assert convert[:5] == ["bcprun", "--nnodes", "1", "--npernode", "1"]
    assert shlex.split(convert[6])[-2:] == ["export", "convert"]
    assert shlex.split((results / "accuracy" / "launcher_cmd.log").read_text()) == ["bash", str(script)]


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(runtime="python", device="cpu", tensor_parallel=8, pipeline_parallel=2, gpus_per_node=8), (1, 1, 0)),
        (dict(runtime="python", device="auto", tensor_parallel=2, pipeline_parallel=1, gpus_per_node=0), (1, 1, 0)),
        (dict(runtime="python", device="auto", tensor_parallel=2, pipeline_parallel=1, gpus_per_node=8),
         (1, 1, 1, (0,))),
        (dict(runtime="fastertransformer", device="auto", tensor_parallel=4, pipeline_parallel=1, gpus_per_node=8),
         (1, 1, 4, (0, 1, 2, 3))),
        (dict(runtime="fastertransformer", device="auto", tensor_parallel=8, pipeline_parallel=2, gpus_per_node=8),
         (2, 1, 8)),
        (dict(runtime="fastertransformer", device="auto", tensor_parallel=4, pipeline_parallel=4, gpus_per_node=8),
         (2, 1, 8)),
        # 12 GPUs: 6 on each of 2 nodes (FT's world size = 2 ranks x 6 visible GPUs).
        (dict(runtime="fastertransformer", device="auto", tensor_parallel=4, pipeline_parallel=3, gpus_per_node=8),
         (2, 1, 6, (0, 1, 2, 3, 4, 5))),
    ],
)
def test_serving_shape(kwargs, expected):
    runtime = runtime_for(kwargs.pop("runtime"))
    layout = ParallelLayout(kwargs.pop("tensor_parallel"), kwargs.pop("pipeline_parallel"))
    assert runtime.serving_resources(layout, **kwargs) == Resources(*expected)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("export.model.tensor_model_parallel_size=4", "export.triton_deployment.pipeline_model_parallel_size=5",
          "cluster.gpus_per_node=8"),
         r"20 GPUs cannot be spread evenly over 3 nodes of 8 GPUs.*choose TP\*PP = 18 or 21"),
        (("export.model.tensor_model_parallel_size=2", "cluster.gpus_per_node=0"), "needs GPUs"),
        (("export.model.tensor_model_parallel_size=5", "export.triton_deployment.pipeline_model_parallel_size=2",
          "cluster.gpus_per_node=4"), r"10 GPUs cannot be spread evenly over 3 nodes of 4 GPUs.*= 9 or 12"),
    ],
)
def test_impossible_shapes_are_refused_before_anything_is_written(tmp_path, monkeypatch, overrides, message):
    with pytest.raises(JobShapeError, match=message):
        dry_run(tmp_path, monkeypatch, "cluster_type=bcm", "export.triton_deployment.runtime=fastertransformer",
                *overrides)
    assert not (tmp_path / "results").exists()


def test_cuda_on_cpu_nodes_is_refused(tmp_path, monkeypatch):
    with pytest.raises(JobShapeError, match="device=cuda"):
        dry_run(tmp_path, monkeypatch, "cluster_type=bcm", "export.triton_deployment.device=cuda",
                "cluster.gpus_per_node=0")


def test_cpu_python_runtime_is_one_task_without_gpus(tmp_path, monkeypatch):
    results = dry_run(tmp_path, monkeypatch, "cluster_type=bcm", "cluster.gpus_per_node=0",
                      "export.model.tensor_model_parallel_size=2")
    found = directives(results / "accuracy" / "launcher.sh")
    assert (found["--nodes"], found["--ntasks-per-node"]) == ("1", "1") and "--gpus-per-node" not in found
    (srun,) = commands(results / "accuracy" / "launcher.sh", "srun")
    # No container: the interpreter that ran main.py, and the accuracy code starts its own server.
    assert srun[srun.index(sys.executable):][-2:] == ["export", "accuracy"]


def test_accuracy_disabled_plans_convert_only(tmp_path, monkeypatch):
    results = dry_run(tmp_path, monkeypatch, "cluster_type=bcm", "export.accuracy.enabled=false")
    assert sorted(p.name for p in results.iterdir()) == ["convert"]


def test_interactive_refuses_multi_node_before_running_anything(tmp_path, monkeypatch):
    from main import run

    monkeypatch.chdir(tmp_path)
    cfg = composed(f"base_results_dir={tmp_path / 'results'}", *MULTI_NODE)
    with pytest.raises(LaunchError, match="needs 2 nodes; cluster_type=interactive"):
        run(cfg)
    assert not list((tmp_path / "results").glob("**/log-*"))  # not even convert ran


def test_interactive_dry_run_prints_the_commands(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), f"base_results_dir={tmp_path}", "dry_run=true"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = tmp_path / "gpt2" / "export_tp1_pp1_fp32_fp32"
    printed = [line for line in done.stdout.splitlines() if line.startswith("[dry run]")]
    assert len(printed) == 2
    assert printed[0].endswith(shlex.join([sys.executable, "-m", "exporter.run_substage",
                                           str(results / "convert" / "export_gpt2_hydra.yaml"), "export", "convert"]))
    assert (results / "accuracy" / "launcher.sh").is_file() and not (results / "model_repo").exists()


def test_missing_sbatch_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, no bcprun
    for cluster_type, tool in (("bcm", "sbatch"), ("bcp", "bcprun")):
        with pytest.raises(LaunchError, match=f"needs `{tool}` on PATH"):
            dry_run(tmp_path, monkeypatch, f"cluster_type={cluster_type}", "dry_run=false")


def test_parse_job_id():
    assert parse_job_id("1234\n") == "1234"
    assert parse_job_id("77;cluster-a\n") == "77"
    with pytest.raises(LaunchError, match="expected a job id"):
        parse_job_id("sbatch: error: Batch job submission failed")


@pytest.mark.parametrize(
    "overrides, key",
    [
        (("cluster_type=slurm",), "cluster_type"),
        (("cluster.mem=lots",), "cluster.mem"),
        (("cluster.gpus_per_node=-1",), "cluster.gpus_per_node"),
        (("cluster.gpus_per_task=0",), "cluster.gpus_per_task"),
        (("cluster.srun_args=[overlap]",), "cluster.srun_args[0]"),
        (('cluster.container_mounts=["/a:/a,/b:/b"]',), "cluster.container_mounts[0]"),
        (("cluster.partition=",), "cluster.partition"),
        (("cluster_type=bcp", "cluster.container=img"), "cluster.container"),
        (("cluster_type=interactive", "cluster.container=img"), "cluster.container"),
        (("cluster.exclusive=maybe",), "cluster.exclusive"),
        (("dry_run=perhaps",), "dry_run"),
    ],
)
def test_bad_cluster_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as error:
        validate(composed(*overrides))
    assert str(error.value).startswith(key)


@pytest.mark.parametrize("group", ["bcm", "bcp"])
def test_every_cluster_group_composes_and_validates(group):
    cfg = validate(composed(f"cluster={group}", f"cluster_type={group}"))
    assert cfg.cluster.gpus_per_node == 8 and cfg.cluster.job_name_prefix == "ft-exporter-"


def sub_stage_runner(results: Path, cwd: Path):
    """Runs a dry run's sub-stage as its job does: `python -m exporter.run_substage <saved config> export <name> ...`."""
    import os

    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def run(name: str, *extra: str) -> subprocess.CompletedProcess:
        config = results / name / "export_gpt2_hydra.yaml"
        return subprocess.run([sys.executable, "-m", "exporter.run_substage", str(config), "export", name, *extra],
                              cwd=cwd, env=env, capture_output=True, text=True, timeout=600)

    return run


@pytest.mark.triton
def test_accuracy_client_uses_a_server_it_did_not_start(tmp_path, monkeypatch, tiny_gpt2):
    """The multi-node client step (`--server-url`): it waits for a running server and scores through it.

    The server here is one tritonserver (no MPI); what is tested is the client side of that step, run as the
    job runs it: `python -m exporter.run_substage <saved config> export accuracy --server-url ...`.
    """
    from exporter.serve.tritonserver import TritonServer

    results = dry_run(tmp_path, monkeypatch, f"export.model.checkpoint_path={tiny_gpt2}", "export.accuracy.limit=8",
                      "export.accuracy.batch_size=4", "export.triton_deployment.max_batch_size=4")
    sub_stage = sub_stage_runner(results, tmp_path)
    converted = sub_stage("convert")
    assert converted.returncode == 0, converted.stdout[-2000:] + converted.stderr[-2000:]
    with TritonServer(results / "model_repo", tmp_path / "server.log") as server:
        scored = sub_stage("accuracy", "--server-url", f"http://{server.http_url}", "--server-grpc-url",
                           server.grpc_url)
    assert scored.returncode == 0, scored.stdout[-2000:] + scored.stderr[-2000:]
    assert f"using the tritonserver at {server.http_url}" in scored.stdout
    assert not (results / "accuracy" / "tritonserver.log").exists()  # it started none of its own
    from conftest import read_json

    evaluation = read_json(results / "eval_output.json")
    assert evaluation["examples"] == 8 and evaluation["passed"] is True
    for entry in evaluation["metrics"].values():  # served through that server == HF transformers in-process
        assert entry["prediction_agreement"] == 1.0


@pytest.mark.triton
def test_accuracy_client_refuses_a_server_whose_stub_is_dead(tmp_path, monkeypatch, tiny_gpt2):
    """Bug pinned: the client step of a server it did not start (`--server-url`, multi-node / k8s) only waited for
    readiness, which a dead python-backend stub does not change (tests/test_health.py), so it scored through a zombie
    whose every request fails. Now the inferring liveness check at `--server-grpc-url` refuses first, naming the dead
    model and saying that the server is not this step's to restart."""
    import os
    import signal

    from test_health import stub_pids

    from exporter.serve.tritonserver import TritonServer

    results = dry_run(tmp_path, monkeypatch, f"export.model.checkpoint_path={tiny_gpt2}", "export.accuracy.limit=4",
                      "export.accuracy.batch_size=2", "export.triton_deployment.max_batch_size=2",
                      "export.accuracy.reference=none")
    sub_stage = sub_stage_runner(results, tmp_path)
    converted = sub_stage("convert")
    assert converted.returncode == 0, converted.stdout[-2000:] + converted.stderr[-2000:]
    with TritonServer(results / "model_repo", tmp_path / "server.log") as server:
        (stub,) = stub_pids(server, "gpt2")
        os.kill(stub, signal.SIGKILL)  # what an OOM kill does; the server and the model stay "ready"
        scored = sub_stage("accuracy", "--server-url", f"http://{server.http_url}", "--server-grpc-url",
                           server.grpc_url)
        assert server.process.poll() is None  # not restarted or stopped by the client: not its server
    assert scored.returncode == 1, scored.stdout[-2000:] + scored.stderr[-2000:]
    (error,) = [line for line in scored.stdout.splitlines() if "TritonServerError" in line]
    assert f"tritonserver at {server.http_url} reports ready, but the liveness check" in error
    assert "gpt2: Stub process 'gpt2_0_0' is not healthy" in error
    assert "did not start that server, so it cannot restart it" in error
    assert not (results / "eval_output.json").exists()  # nothing scored


def test_run_substage_refuses_unknown_sub_stage(tmp_path, monkeypatch):
    from exporter.run_substage import main as run_substage

    results = dry_run(tmp_path, monkeypatch)
    config = results / "convert" / "export_gpt2_hydra.yaml"
    assert run_substage([str(config), "export", "deploy"]) == 2
    assert run_substage([str(tmp_path / "missing.yaml"), "export", "convert"]) == 2


def test_run_substage_refuses_a_server_url_without_its_grpc_address(tmp_path, monkeypatch, caplog):
    """A server this step did not start is checked over gRPC before scoring; an HTTP URL alone is refused before
    anything runs (exit 2), not scored unchecked."""
    from exporter.run_substage import main as run_substage

    results = dry_run(tmp_path, monkeypatch)
    config = str(results / "accuracy" / "export_gpt2_hydra.yaml")
    assert run_substage([config, "export", "accuracy", "--server-url", "http://127.0.0.1:8000"]) == 2
    assert "needs both --server-url (HTTP, to score) and --server-grpc-url" in caplog.text
    assert not (results / "eval_output.json").exists()


def test_bcm_group_has_nemo_launcher_keys():
    cluster = composed().cluster  # the default group, conf/cluster/bcm.yaml
    for key in ("partition", "account", "exclusive", "gpus_per_task", "gpus_per_node", "mem", "overcommit",
                "job_name_prefix", "srun_args", "container", "container_mounts"):
        assert key in cluster, f"cluster.{key}"
