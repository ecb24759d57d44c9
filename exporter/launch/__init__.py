"""Launchers execute the sub-stages a stage planned; they never know what a stage does.

Each takes (cfg, [SubStage]) and, per sub-stage, writes ${results_dir}/<sub_stage>/ with launcher.sh, the resolved
config (<run.name>_hydra.yaml), launcher_cmd.log and the logs (k8s: a Helm chart and its rendered manifests instead
of launcher.sh); `dry_run=true` writes everything and runs nothing.
"""

from .bcp import run_bcp
from .common import LaunchError
from .interactive import run_interactive
from .k8s import run_k8s
from .slurm import run_slurm

LAUNCHERS = {"bcm": run_slurm, "bcp": run_bcp, "interactive": run_interactive, "k8s": run_k8s}

__all__ = ["LAUNCHERS", "LaunchError"]
