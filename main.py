"""Entry point: compose the Hydra config, validate it, and run each stage in `stages` with the cluster's launcher.

    python main.py                                   # built-in tiny GPT-2: export, serve, LAMBADA
    python main.py export.model.checkpoint_path=/path/to/hf-gpt2 export.model.tensor_model_parallel_size=2
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from exporter.config import ConfigError, validate
from exporter.errors import USER_ERRORS
from exporter.launch import LAUNCHERS
from exporter.stages import STAGES

log = logging.getLogger("exporter")


def run(cfg: DictConfig) -> None:
    cfg = validate(cfg)
    launcher = LAUNCHERS[cfg.cluster_type.value]
    for stage in cfg.stages:
        launcher(cfg, STAGES[stage](cfg))


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except ConfigError as error:
        log.error("configuration error: %s", error)
        sys.exit(2)
    except USER_ERRORS as error:
        log.error("%s: %s", type(error).__name__, error)
        sys.exit(1)


if __name__ == "__main__":
    main()
