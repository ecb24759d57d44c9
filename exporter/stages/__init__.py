"""Stages plan the work as sub-stages (exporter/jobs.py); launchers execute them.

STAGES: stage name -> plan(cfg) -> [SubStage]. RUNNERS: stage name -> {sub-stage name -> function(cfg, ...)}, what
`python -m exporter.run_substage` calls on the node.
"""

from . import export
from ..jobs import JobShapeError, Resources, Step, SubStage

STAGES = {"export": export.plan}
RUNNERS = {"export": export.RUNNERS}

__all__ = ["STAGES", "RUNNERS", "JobShapeError", "Resources", "Step", "SubStage"]
