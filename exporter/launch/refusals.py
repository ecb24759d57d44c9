"""What a cluster's refusal means and which key changes it: sbatch's one-line errors, srun's, and the failures
(FT's world-size check, CUDA device errors) a job's logs end with.

sbatch answers a job it cannot place with a bare line ("sbatch: error: Invalid generic resource (gres)
specification"); the launchers add the line below it that says what it means here. The texts are Slurm's own
(src/common/slurm_errno.c, and sbatch's option parsing), FT's (its Triton models' NCCL set-up) and CUDA's. bcprun
adds no documented messages of its own: its failures are the commands' own, found in their logs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Refusal:
    pattern: str  # a regular expression searched for in the output; its named groups fill `meaning`
    meaning: str

    def match(self, text: str) -> str | None:
        found = re.search(self.pattern, text)
        return None if found is None else self.meaning.format(**found.groupdict())


CPU_ONLY = ("On CPU-only nodes set cluster.gpus_per_node=0: the export then asks for no GPUs (a runtime that can "
            "serve on CPU does; one that needs GPUs is refused before anything is submitted)")

REFUSALS: tuple[Refusal, ...] = (
    # Slurm, at submission (sbatch).
    Refusal(r"Invalid generic resource \(gres\) specification",
            "Slurm refused the job's GPU request (--gpus-per-node): this cluster or partition has no GPUs configured "
            f"as a generic resource (gres), so any GPU request is invalid. {CPU_ONLY}. If the nodes have GPUs, choose "
            "their partition (cluster.partition) or ask the admins for GresTypes=gpu and Gres=gpu:N in slurm.conf."),
    Refusal(r"(?i)invalid partition",
            "cluster.partition names no partition of this cluster: `sinfo -s` lists them (null: the cluster's "
            "default partition)."),
    Refusal(r"No partition specified or system default partition",
            "this cluster has no default partition: set cluster.partition (`sinfo -s` lists them)."),
    Refusal(r"Invalid account or account/partition combination specified",
            "cluster.account is not an account of yours on this partition: `sacctmgr show associations user=$USER "
            "format=account,partition` lists them; set cluster.account (and cluster.partition) to one."),
    Refusal(r"Memory specification can not be satisfied",
            "no node of the partition has the memory cluster.mem asks (0: all of each node's memory; null: not "
            "asked); `sinfo -N -o '%P %N %m'` shows each node's."),
    Refusal(r"Requested node configuration is not available",
            "no node of the partition has what one node of this job asks (its GPUs per node, memory, tasks): check "
            "the nodes with `sinfo -N -o '%P %N %c %m %G'` and set cluster.gpus_per_node (the GPUs one node has; "
            "0: CPU-only), cluster.mem and cluster.partition to match."),
    Refusal(r"Node count specification invalid",
            "the partition has fewer nodes than the job asks (TP*PP / cluster.gpus_per_node), or limits them "
            "(MaxNodes): use a smaller layout, or a partition with more nodes (cluster.partition)."),
    Refusal(r"Requested time limit is invalid",
            "export.run.time_limit exceeds the partition's limit (`sinfo -o '%P %l'` shows it): lower it."),
    Refusal(r"Invalid --time specification",
            "export.run.time_limit is not a Slurm time: minutes, MM:SS, HH:MM:SS or D-HH:MM:SS."),
    Refusal(r"Job violates accounting/QOS policy",
            "a limit of your association or QOS (jobs, nodes, GPUs or wall time allowed) refuses the job: "
            "`sacctmgr show associations user=$USER` and `sacctmgr show qos` show them; lower export.run.time_limit "
            "or the layout's nodes, or submit under another cluster.account."),
    Refusal(r"Invalid qos specification",
            "the QOS the job runs under (SBATCH_QOS in your environment, else your account's default) is not "
            "allowed for cluster.account: unset SBATCH_QOS or set it to one `sacctmgr show associations "
            "user=$USER format=account,qos` lists."),
    Refusal(r"Requested account has breached requested QOS usage threshold",
            "your account has used up its QOS allowance: wait for it to recover, or use another cluster.account."),
    Refusal(r"Required partition not available \(inactive or drain\)|Requested partition configuration not "
            r"available now",
            "cluster.partition is down, drained, or its limits refuse this job now: `sinfo -s` shows its state; "
            "choose another cluster.partition."),
    Refusal(r"Access/permission denied|User's group not permitted to use this partition",
            "you may not submit to cluster.partition (or under cluster.account): choose ones you have access to."),
    Refusal(r"More processors requested than permitted",
            "the job's tasks ask more CPUs than the partition allows per job: choose another cluster.partition."),
    Refusal(r"Job dependency problem",
            "the job this one waits for (afterok) is unknown to Slurm, or has already ended: submit the plan again."),
    Refusal(r"Unable to contact slurm controller",
            "slurmctld does not answer: submit from a login node of the cluster (`scontrol ping` checks it)."),
    # Slurm, inside the job (srun).
    Refusal(r"unrecognized option '--(?:no-)?container-",
            "srun has no pyxis plugin on this cluster, so it knows no --container-* option: set "
            "cluster.container=null and cluster.container_mounts=[] and remove pyxis options from "
            "cluster.srun_args (the job then runs in the environment main.py ran in), or use a cluster with pyxis."),
    Refusal(r"Invalid MPI plugin name|Couldn't find the specified plugin name for mpi",
            "this Slurm has no PMIx plugin, which the multi-node server step needs (srun --mpi=pmix starts one "
            "tritonserver per node as one MPI world): `srun --mpi=list` shows the plugins it has; ask the admins "
            "for PMIx."),
    # FT's backend and CUDA, in the job's logs.
    Refusal(r"world_size \((?P<world>\d+)\) should equal to tensor_para_size_ \* pipeline_para_size_ "
            r"\((?P<tp>\d+) \* (?P<pp>\d+)",
            "FT's backend saw {world} GPUs in all (MPI ranks x GPUs each one sees) for a TP {tp} x PP {pp} model. "
            "The plan sets CUDA_VISIBLE_DEVICES to TP*PP / nodes GPUs on each node; something gave the server "
            "other GPUs: cluster.gpus_per_node must be the GPUs one node has, and nothing else (srun_args, your "
            "environment) may set CUDA_VISIBLE_DEVICES."),
    Refusal(r"Number of visible GPUs must be evenly divisi?ble by TP \* PP",
            "FT's backend saw a number of GPUs that TP*PP does not divide: cluster.gpus_per_node must be the GPUs "
            "one node has, so the plan can set CUDA_VISIBLE_DEVICES to the TP*PP GPUs the model uses."),
    Refusal(r"CUDA error: invalid device ordinal",
            "CUDA_VISIBLE_DEVICES names a GPU the node does not have: cluster.gpus_per_node is more than the GPUs "
            "one node has (`nvidia-smi -L` on a node lists them)."),
    # The errors, not the warning a CUDA build of torch prints on a machine without GPUs.
    Refusal(r"CUDA error: no CUDA-capable device is detected|No CUDA GPUs are available",
            f"the job's processes see no GPU. {CPU_ONLY}; else check the job was given GPUs (cluster.partition)."),
)


def explain(output: str) -> str:
    """One 'what this means' line for each refusal recognised in a command's output ('' for none)."""
    meanings = dict.fromkeys(meaning for refusal in REFUSALS if (meaning := refusal.match(output)) is not None)
    return "".join(f"\nwhat this means: {meaning}" for meaning in meanings)
