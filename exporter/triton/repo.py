"""Assemble the Triton model repository: `<repo>/{<model>, preprocessing, postprocessing, ensemble}`.

The repository is built in a temporary sibling and renamed into place when complete. Everything it needs at serving
time is copied from `templates/`, so a stock tritonserver (python backend + torch + tokenizers) serves it without
this package installed.
"""

from __future__ import annotations

import configparser
import logging
import shutil
from dataclasses import replace
from pathlib import Path

from ..ft.convert import convert_checkpoint
from ..ft.writer import AtomicDirectory
from . import render

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"
RUNTIME_FILES = ("model.py", "ft_checkpoint.py", "ft_gpt.py")


def _copy_python_model(template: str, files: tuple[str, ...], version_dir: Path) -> None:
    version_dir.mkdir(parents=True, exist_ok=True)
    for name in files:
        shutil.copy2(TEMPLATES / template / name, version_dir / name)


def _tokenizer_model(name: str, shard_dir: Path, config, repo: Path) -> None:
    version_dir = repo / name / "1"
    _copy_python_model(name, ("model.py",), version_dir)
    (version_dir / "tokenizer").mkdir()
    shutil.copy2(shard_dir / "tokenizer.json", version_dir / "tokenizer" / "tokenizer.json")
    render.write_config(config, repo / name)


def build_repository(
    repo_root: Path,
    checkpoint_path: Path,
    settings: render.ModelSettings,
    weight_data_type: str,
    processes: int = 1,
) -> Path:
    """Convert the checkpoint into `<repo_root>/<model>/1/<tp>-gpu` and write all four models; returns repo_root."""
    repo_root = Path(repo_root).resolve()
    tp = settings.tensor_para_size
    with AtomicDirectory(repo_root) as partial_repo:
        version_dir = partial_repo / settings.name / "1"
        shard_dir = convert_checkpoint(
            checkpoint_path,
            version_dir,
            tensor_parallel=tp,
            weight_data_type=weight_data_type,
            processes=processes,
            pipeline_parallel=settings.pipeline_para_size,
        )
        if settings.runtime == "python":
            _copy_python_model("ft_python", RUNTIME_FILES, version_dir)
            # Relative: resolved against the version directory, so the repository can be moved.
            model_settings = replace(settings, model_checkpoint_path=f"{tp}-gpu")
        else:
            # FT's backend wants an absolute path: where the shards will be once the repository is in place.
            model_settings = replace(settings, model_checkpoint_path=str(repo_root / settings.name / "1" / f"{tp}-gpu"))
        render.write_config(render.model_config(model_settings), partial_repo / settings.name)

        ini = configparser.ConfigParser()
        ini.read(shard_dir / "config.ini")
        end_id = ini.getint("gpt", "end_id")
        _tokenizer_model(
            "preprocessing", shard_dir, render.preprocessing_config(settings.max_batch_size, end_id), partial_repo
        )
        _tokenizer_model(
            "postprocessing", shard_dir, render.postprocessing_config(settings.max_batch_size, end_id), partial_repo
        )
        (partial_repo / "ensemble" / "1").mkdir(parents=True)
        render.write_config(render.ensemble_config(settings.name, settings.max_batch_size), partial_repo / "ensemble")
    log.info("model repository ready: %s", repo_root)
    return repo_root
