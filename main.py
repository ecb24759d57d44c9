"""Entry point: compose the Hydra config, validate it, and run each stage in `stages` with the cluster's launcher.

    python main.py                                   # built-in tiny GPT-2: export, serve, LAMBADA, here
    python main.py export.model.checkpoint_path=/path/to/hf-gpt2 export.model.tensor_model_parallel_size=2
    python main.py cluster_type=bcm cluster.partition=batch   # one Slurm job per sub-stage
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # the first sub-stage's interpreter starts importing now, beside Hydra's work below
    from exporter import prestart

    prestart.start(sys.argv[1:])

import logging  # noqa: E402

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from exporter.config import ConfigError, validate  # noqa: E402
from exporter.errors import USER_ERRORS  # noqa: E402
from exporter.launch import LAUNCHERS, LaunchError  # noqa: E402
from exporter.quick_exit import quick_exit  # noqa: E402
from exporter.stages import STAGES, JobShapeError  # noqa: E402

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
    try:
        main()  # an error exits inside (sys.exit), the ordinary way
    finally:
        prestart.discard()  # not taken (no sub-stage ran here): it must not outlive us
    quick_exit(0)  # done: skip the interpreter's teardown (with EXPORTER_FORK=1 it holds torch: 0.5 s)
