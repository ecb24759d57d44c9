"""Seed 003 §3.1's deployment table, row by row, on nodes of 8 GPUs with FT's backend: the sbatch and bcprun scripts
each row generates (dry runs) carry the table's nodes, tasks, GPUs and device list; layouts FT cannot run are
refused before anything is written, saying what to change; cluster refusals are explained.

The table is the seed's, written here as data (not derived from the planner): TP 1/2/4/8 on one node with CUDA
devices 0 / 0,1 / 0,1,2,3 / all; TP 8 x PP 2/3/4 on 2/3/4 nodes; TP 16 x PP 1/2 on 2/4 nodes. FT's multi-node
backend runs one tritonserver (one MPI rank, one task) per node, driving every GPU that node shows it.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import NamedTuple

import pytest

from exporter.jobs import Resources, SubStage, Step
from exporter.launch import LaunchError
from exporter.launch.interactive import local_devices
from exporter.launch.refusals import explain
from exporter.parallel import ParallelLayout
from exporter.runtimes.fastertransformer import check_world_size
from exporter.stages import JobShapeError
from test_launch import commands, directives, dry_run


class Row(NamedTuple):
    tensor_parallel: int
    pipeline_parallel: int
    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    devices: str | None  # CUDA_VISIBLE_DEVICES on each node; None: all of the node's GPUs


SEED_TABLE = (
    Row(1, 1, 1, 1, 1, "0"),
    Row(2, 1, 1, 1, 2, "0,1"),
    Row(4, 1, 1, 1, 4, "0,1,2,3"),
    Row(8, 1, 1, 1, 8, None),
    Row(8, 2, 2, 1, 8, None),
    Row(8, 3, 3, 1, 8, None),
    Row(8, 4, 4, 1, 8, None),
    Row(16, 1, 2, 1, 8, None),
    Row(16, 2, 4, 1, 8, None),
)


def row_id(row: Row) -> str:
    return f"tp{row.tensor_parallel}_pp{row.pipeline_parallel}"


def layout_overrides(row: Row) -> tuple[str, ...]:
    return ("export.triton_deployment.runtime=fastertransformer", "cluster.gpus_per_node=8",
            f"export.model.tensor_model_parallel_size={row.tensor_parallel}",
            f"export.triton_deployment.pipeline_model_parallel_size={row.pipeline_parallel}")


def exported_devices(script: Path) -> list[str]:
    """The values of every `export CUDA_VISIBLE_DEVICES=...` line of a script."""
    return [line.split("=", 1)[1].split()[0] for line in script.read_text().splitlines()
            if line.startswith("export CUDA_VISIBLE_DEVICES=")]


@pytest.mark.parametrize("row", SEED_TABLE, ids=row_id)
def test_sbatch_script_of_every_row(tmp_path, monkeypatch, row):
    results = dry_run(tmp_path, monkeypatch, "cluster_type=bcm", *layout_overrides(row))
    script = results / "accuracy" / "launcher.sh"
    found = directives(script)
    assert (found["--nodes"], found["--ntasks-per-node"], found["--gpus-per-node"]) == (
        str(row.nodes), str(row.tasks_per_node), str(row.gpus_per_node))
    assert exported_devices(script) == ([row.devices] if row.devices else [])
    steps = commands(script, "srun")
    if row.nodes == 1:  # the accuracy step starts its own tritonserver on the job's GPUs
        (client,) = steps
        assert "--nodes=1" in client and f"--ntasks-per-node={row.tasks_per_node}" in client
    else:  # one tritonserver per node, one MPI world, and the client beside rank 0
        server, client = steps
        assert f"--nodes={row.nodes}" in server and f"--ntasks-per-node={row.tasks_per_node}" in server
        assert "--mpi=pmix" in server and server[-1] == "&"
        assert {"--nodes=1", "--ntasks=1", "--relative=0"} <= set(client)
        # Rank 0's HTTP address to score through and its gRPC address for the liveness check before scoring.
        assert client[-4:] == ["--server-url", "http://127.0.0.1:8000", "--server-grpc-url", "127.0.0.1:8001"]
        world = row.tensor_parallel * row.pipeline_parallel
        assert (f"NCCL world size = TP*PP = {row.tensor_parallel}*{row.pipeline_parallel} = {world} = "
                f"{row.nodes} nodes x {row.gpus_per_node} GPUs") in script.read_text()
    # The convert job is one CPU task whatever the layout.
    convert = directives(results / "convert" / "launcher.sh")
    assert (convert["--nodes"], convert["--ntasks-per-node"]) == ("1", "1") and "--gpus-per-node" not in convert
    assert exported_devices(results / "convert" / "launcher.sh") == []


@pytest.mark.parametrize("row", SEED_TABLE, ids=row_id)
def test_bcprun_script_of_every_row(tmp_path, monkeypatch, row):
    results = dry_run(tmp_path, monkeypatch, "cluster_type=bcp", "cluster=bcp", *layout_overrides(row))
    script = results / "accuracy" / "launcher.sh"
    header = script.read_text().splitlines()[2]
    assert header.startswith(f"# {row.nodes} node(s) x {row.tasks_per_node} task(s), {row.gpus_per_node} GPU(s) per "
                             "node")
    launches = commands(script, "bcprun")
    server = launches[0]  # one node: the accuracy step itself; more: the tritonserver on every node
    assert server[1:5] == ["--nnodes", str(row.nodes), "--npernode", str(row.tasks_per_node)]
    for launch in launches:
        inner = shlex.split(launch[launch.index("--cmd") + 1])
        variables = dict(word.split("=", 1) for word in inner[1:] if "=" in word and not word.startswith("-"))
        assert variables.get("CUDA_VISIBLE_DEVICES") == row.devices
    assert len(launches) == (1 if row.nodes == 1 else 2)


@pytest.mark.parametrize("row", [row for row in SEED_TABLE if row.tensor_parallel > 8], ids=row_id)
def test_tensor_parallel_across_nodes_says_its_cost(tmp_path, monkeypatch, row):
    results = dry_run(tmp_path, monkeypatch, "cluster_type=bcm", *layout_overrides(row))
    text = (results / "accuracy" / "launcher.sh").read_text()
    assert f"# TP={row.tensor_parallel} spans 2 nodes: each layer's two tensor-parallel all-reduces" in text
    assert "InfiniBand" in text and "NVLink" in text


def test_pipeline_across_nodes_keeps_tensor_groups_inside_a_node(tmp_path, monkeypatch):
    results = dry_run(tmp_path, monkeypatch, "cluster_type=bcm", *layout_overrides(SEED_TABLE[4]))
    text = (results / "accuracy" / "launcher.sh").read_text()
    assert "# Each TP group (8 GPUs) stays inside a node (NVLink)" in text and "InfiniBand" not in text


def test_interactive_run_sees_the_rows_devices(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    results = dry_run(tmp_path, monkeypatch, *layout_overrides(SEED_TABLE[2]))  # TP 4 on one node: 0,1,2,3
    assert exported_devices(results / "accuracy" / "launcher.sh") == ["0,1,2,3"]
    assert exported_devices(results / "convert" / "launcher.sh") == []


def sub_stage_using(shape: Resources) -> SubStage:
    return SubStage(name="accuracy", stage="export", results_dir=Path("unused"), config_name="x", job_name="x",
                    time_limit="1:00:00", steps=(Step(argv=("true",)),), resources=shape)


def test_local_devices_follow_the_gpus_this_process_was_given():
    tp4 = sub_stage_using(Resources(gpus_per_node=4, visible_devices=(0, 1, 2, 3)))
    assert local_devices(tp4, None) == "0,1,2,3"
    assert local_devices(tp4, "4,5,6,7") == "4,5,6,7"  # a process given GPUs 4-7: the plan's 0-3 are those
    assert local_devices(tp4, "2, 3,5,6,7") == "2,3,5,6"
    assert local_devices(tp4, "") is None  # given no GPUs: left as it is
    with pytest.raises(LaunchError, match=r"uses 4 GPU\(s\) but this process was given 2 \(CUDA_VISIBLE_DEVICES=0,1\)"):
        local_devices(tp4, "0,1")
    whole_node = sub_stage_using(Resources(gpus_per_node=8))
    assert local_devices(whole_node, None) is None and local_devices(whole_node, "0,1,2,3,4,5,6,7,8") == \
        "0,1,2,3,4,5,6,7"
    assert local_devices(sub_stage_using(Resources()), "0,1") is None  # no GPUs asked


def test_too_few_given_gpus_refuses_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(LaunchError, match="CUDA_VISIBLE_DEVICES=0,1"):
        dry_run(tmp_path, monkeypatch, "dry_run=false", *layout_overrides(SEED_TABLE[2]))
    assert not list((tmp_path / "results").glob("**/log-*"))  # not even convert ran


@pytest.mark.parametrize(
    "shape, layout, message",
    [
        # A whole 8-GPU node shown to a TP 4 model: FT's own error, refused here with what to change.
        (Resources(gpus_per_node=8), ParallelLayout(4, 1),
         r"world_size \(8\) != tensor_para_size \* pipeline_para_size \(4 \* 1\).*listing TP\*PP / nodes = 4 GPUs"),
        (Resources(nodes=2, gpus_per_node=8), ParallelLayout(8, 1), r"world_size \(16\)"),
        (Resources(nodes=2, tasks_per_node=8, gpus_per_node=8), ParallelLayout(8, 2), "one process per node"),
    ],
)
def test_fts_world_size_rule(shape, layout, message):
    with pytest.raises(JobShapeError, match=message):
        check_world_size(shape, layout)


def test_fts_world_size_rule_holds_for_every_row():
    for row in SEED_TABLE:
        visible = tuple(int(device) for device in row.devices.split(",")) if row.devices else ()
        check_world_size(Resources(row.nodes, row.tasks_per_node, row.gpus_per_node, visible),
                         ParallelLayout(row.tensor_parallel, row.pipeline_parallel))


# What sbatch, srun, FT and CUDA print (Slurm's src/common/slurm_errno.c and sbatch's option parsing, FT's Triton
# model, the CUDA runtime), and the key each explanation must name.
REFUSED = [
    ("sbatch: error: Invalid generic resource (gres) specification", "cluster.gpus_per_node=0"),
    ("sbatch: error: invalid partition specified: gpu\nsbatch: error: Batch job submission failed: Invalid partition "
     "name specified", "cluster.partition"),
    ("sbatch: error: Batch job submission failed: No partition specified or system default partition",
     "cluster.partition"),
    ("sbatch: error: Batch job submission failed: Invalid account or account/partition combination specified",
     "cluster.account"),
    ("sbatch: error: Memory specification can not be satisfied", "cluster.mem"),
    ("sbatch: error: Batch job submission failed: Requested node configuration is not available",
     "cluster.gpus_per_node"),
    ("sbatch: error: Batch job submission failed: Node count specification invalid", "TP*PP / cluster.gpus_per_node"),
    ("sbatch: error: Batch job submission failed: Requested time limit is invalid (missing or exceeds some limit)",
     "export.run.time_limit"),
    ("sbatch: error: Invalid --time specification", "export.run.time_limit"),
    ("sbatch: error: Batch job submission failed: Job violates accounting/QOS policy (job submit limit, user's size "
     "and/or time limits)", "sacctmgr show qos"),
    ("sbatch: error: Batch job submission failed: Invalid qos specification", "SBATCH_QOS"),
    ("sbatch: error: Batch job submission failed: Requested account has breached requested QOS usage threshold",
     "cluster.account"),
    ("sbatch: error: Batch job submission failed: Required partition not available (inactive or drain)",
     "cluster.partition"),
    ("sbatch: error: Batch job submission failed: Access/permission denied", "cluster.partition"),
    ("sbatch: error: Batch job submission failed: More processors requested than permitted", "cluster.partition"),
    ("sbatch: error: Batch job submission failed: Job dependency problem", "afterok"),
    ("sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)",
     "login node"),
    ("srun: unrecognized option '--container-image=nvcr.io/nvidia/tritonserver:23.04-py3'", "cluster.container=null"),
    ("srun: error: Invalid MPI plugin name", "--mpi=pmix"),
    ("[ERROR] world_size (8) should equal to tensor_para_size_ * pipeline_para_size_ (4 * 1 here)",
     "saw 8 GPUs in all (MPI ranks x GPUs each one sees) for a TP 4 x PP 1 model"),
    ("1. Number of visible GPUs must be evenly divisble by TP * PP", "cluster.gpus_per_node"),
    ("RuntimeError: CUDA error: invalid device ordinal", "cluster.gpus_per_node is more than the GPUs"),
    ("RuntimeError: CUDA error: no CUDA-capable device is detected", "cluster.gpus_per_node=0"),
    ("RuntimeError: No CUDA GPUs are available", "cluster.gpus_per_node=0"),
]


@pytest.mark.parametrize("output, key", REFUSED, ids=[key for _, key in REFUSED])
def test_refusals_are_explained(output, key):
    explained = explain(output)
    assert explained.startswith("\nwhat this means: ") and key in explained
    assert explained.count("what this means") == 1  # one line per refusal, not per pattern that matches


def test_unknown_output_is_not_explained():
    assert explain("sbatch: error: something new\nSubmitted batch job 12") == ""
    # torch's warning on a machine without GPUs is not the failure
    assert explain("UserWarning: CUDA initialization: CUDA driver initialization failed, you might not have a CUDA "
                   "gpu. (Triggered internally at ...) no CUDA-capable device is detected") == ""


def test_tensor_groups_straddling_nodes_are_said(tmp_path, monkeypatch):
    """TP 4 x PP 3 = 12 GPUs: 6 on each of 2 nodes, so the second TP group (ranks 4-7) has GPUs on both."""
    results = dry_run(tmp_path, monkeypatch, "cluster_type=bcm", "export.triton_deployment.runtime=fastertransformer",
                      "export.model.tensor_model_parallel_size=4",
                      "export.triton_deployment.pipeline_model_parallel_size=3")
    script = results / "accuracy" / "launcher.sh"
    found = directives(script)
    assert (found["--nodes"], found["--gpus-per-node"]) == ("2", "6")
    assert exported_devices(script) == ["0,1,2,3,4,5"]
    assert "# TP groups of 4 GPUs straddle nodes of 6: each layer's two" in script.read_text()


def test_a_failed_runs_logs_are_explained(tmp_path):
    """A sub-stage run here (interactive, bcp) that fails: the error names what its logs' recognised line means."""
    from exporter.launch.common import failure

    out, err = tmp_path / "log.out", tmp_path / "log.err"
    out.write_text("loading\n[ERROR] world_size (8) should equal to tensor_para_size_ * pipeline_para_size_ (4 * 1 "
                   "here) \n" + "more\n" * 50)  # the line is further up than the tail the error shows
    err.write_text("terminate called after throwing an instance of 'std::runtime_error'\n")
    error = failure(sub_stage_using(Resources(gpus_per_node=8)), 134, out, err)
    assert "sub-stage accuracy failed (exit 134)" in str(error)
    assert "what this means: FT's backend saw 8 GPUs in all" in str(error)
