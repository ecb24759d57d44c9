"""Run one planned sub-stage from its saved, resolved config: what every launcher's job executes.

    python -m exporter.run_substage <results_dir>/<sub_stage>/<run.name>_hydra.yaml export convert
    python -m exporter.run_substage <...>_hydra.yaml export accuracy \
        [--server-url http://127.0.0.1:8000 --server-grpc-url 127.0.0.1:8001]

Exit codes as main.py: 2 for a configuration error, 1 for a problem with the input or environment (one line).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from omegaconf import OmegaConf

from .config import ConfigError, validate
from .errors import USER_ERRORS
from .lazy import openmp_threads_sleep_when_idle

log = logging.getLogger("exporter")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m exporter.run_substage", description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, help="the resolved Hydra config the launcher saved")
    parser.add_argument("stage")
    parser.add_argument("sub_stage")
    parser.add_argument("--server-url", help="accuracy: use this running tritonserver (multi-node rank 0, k8s)")
    parser.add_argument("--server-grpc-url", help="accuracy: that server's gRPC host:port, for the liveness check")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> object:
    from .stages import RUNNERS

    if not args.config.is_file():
        raise ConfigError(f"{args.config}: no such config file")
    cfg = validate(OmegaConf.load(args.config))
    runners = RUNNERS.get(args.stage)
    if runners is None or args.sub_stage not in runners:
        raise ConfigError(f"no sub-stage {args.stage}/{args.sub_stage}; known: "
                          + ", ".join(f"{s}/{n}" for s, subs in RUNNERS.items() for n in subs))
    kwargs = {key: value for key in ("server_url", "server_grpc_url") if (value := getattr(args, key))}
    return runners[args.sub_stage](cfg, **kwargs)


def main(argv: list[str] | None = None) -> int:
    # The format of main.py's Hydra job logging (hydra/job_logging: stdout), so all logs of a run read alike.
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    args = parse_args(argv)
    openmp_threads_sleep_when_idle()  # before the sub-stage loads torch (templates/ft_python/ft_imports.py)
    try:
        run(args)
    except ConfigError as error:
        log.error("configuration error: %s", error)
        return 2
    except USER_ERRORS as error:
        log.error("%s: %s", type(error).__name__, error)
        return 1
    return 0


if __name__ == "__main__":
    from .quick_exit import quick_exit

    quick_exit(main())  # the work is done: skip torch's 0.5 s of interpreter teardown
