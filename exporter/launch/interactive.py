"""Run sub-stages here, one after the other, keeping the resolved config next to their outputs."""

from __future__ import annotations

import logging
import time
from typing import Sequence

from omegaconf import DictConfig, OmegaConf

from ..stages.export import SubStage

log = logging.getLogger(__name__)


def run_interactive(cfg: DictConfig, sub_stages: Sequence[SubStage]) -> None:
    for sub_stage in sub_stages:
        sub_stage.results_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, sub_stage.results_dir / f"{cfg.export.run.name}_hydra.yaml")
        log.info("== %s ==", sub_stage.name)
        started = time.monotonic()
        sub_stage.run()
        log.info("== %s done in %.1fs ==", sub_stage.name, time.monotonic() - started)
