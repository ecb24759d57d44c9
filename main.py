"""Entry point: compose the Hydra config, validate it, and run each stage in `stages` with the cluster's launcher.

    python main.py                                   # built-in tiny GPT-2: export, serve, LAMBADA, here
    python main.py export.model.checkpoint_path=/path/to/hf-gpt2 export.model.tensor_model_parallel_size=2
    python main.py cluster_type=bcm cluster.partition=batch   # one Slurm job per sub-stage
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from exporter.config import ConfigError, validate
from exporter.errors import USER_ERRORS
from exporter.launch import LAUNCHERS, LaunchError
from exporter.quick_exit import quick_exit
from exporter.stages import STAGES, JobShapeError

log = logging.getLogger("exporter")


def run(cfg: DictConfig) -> None:
    cfg = validate(cfg)
    launcher = LAUNCHERS[cfg.cluster_type.value]
    plans = [STAGES[stage](cfg) for stage in cfg.stages]  # every job shape is checked before anything runs
    for sub_stages in plans:
        launcher(cfg, sub_stages)


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except ConfigError as error:
        log.error("configuration error: %s", error)
        sys.exit(2)
    except (JobShapeError, LaunchError) as error:
        log.error("%s", error)
        sys.exit(1)
    except USER_ERRORS as error:
        log.error("%s: %s", type(error).__name__, error)
        sys.exit(1)


if __name__ == "__main__":
    main()  # an error exits inside (sys.exit), the ordinary way
    quick_exit(0)  # done: skip the interpreter's teardown (with EXPORTER_FORK=1 it holds torch: 0.5 s)
