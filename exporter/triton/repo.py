"""Assemble the Triton model repository: `<repo>/{<model>, preprocessing, postprocessing, ensemble}`.

The repository is built in a temporary sibling and renamed into place when complete. Everything it needs at serving
time is copied from `templates/`, so a stock tritonserver (python backend + torch + tokenizers) serves it without
this package installed.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from pathlib import Path

from ..ft.convert import convert_checkpoint
from ..ft.verify import read_config
from ..atomic import AtomicDirectory
from . import render

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"
# What each python-backend model's version directory gets, as paths under templates/.
TEMPLATE_FILES = {
    "ft_python": ("ft_python/model.py", "ft_python/ft_checkpoint.py", "ft_python/ft_gpt.py",
                  "ft_python/ft_generate.py", "ft_python/ft_interface.py"),
    "preprocessing": ("preprocessing/model.py", "tokenizer_model.py"),
    "postprocessing": ("postprocessing/model.py", "tokenizer_model.py"),
}


def install_python_model(template: str, version_dir: Path) -> None:
    """Copy the template's files (flat) into a model's version directory."""
    version_dir.mkdir(parents=True, exist_ok=True)
    for relative in TEMPLATE_FILES[template]:
        shutil.copy2(TEMPLATES / relative, version_dir / Path(relative).name)


def install_tokenizer_model(repo: Path, config, tokenizer_json: Path) -> Path:
    """`<repo>/<name>/{config.pbtxt, 1/*.py, 1/tokenizer/tokenizer.json}` for preprocessing or postprocessing."""
    version_dir = repo / config.name / "1"
    install_python_model(config.name, version_dir)
    (version_dir / "tokenizer").mkdir()
    shutil.copy2(tokenizer_json, version_dir / "tokenizer" / "tokenizer.json")
    render.write_config(config, repo / config.name)
    return repo / config.name


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
            install_python_model("ft_python", version_dir)
            # Relative: resolved against the version directory, so the repository can be moved.
            model_settings = replace(settings, model_checkpoint_path=f"{tp}-gpu")
        else:
            # FT's backend wants an absolute path: where the shards will be once the repository is in place.
            model_settings = replace(settings, model_checkpoint_path=str(repo_root / settings.name / "1" / f"{tp}-gpu"))
        render.write_config(render.model_config(model_settings), partial_repo / settings.name)

        end_id = read_config(shard_dir)["end_id"]
        for config in (
            render.preprocessing_config(settings.max_batch_size, end_id, settings.max_queue_delay_microseconds),
            render.postprocessing_config(settings.max_batch_size, end_id, settings.max_queue_delay_microseconds),
        ):
            install_tokenizer_model(partial_repo, config, shard_dir / "tokenizer.json")
        (partial_repo / "ensemble" / "1").mkdir(parents=True)
        render.write_config(render.ensemble_config(settings.name, settings.max_batch_size, settings.decoupled), partial_repo / "ensemble")
    log.info("model repository ready: %s", repo_root)
    return repo_root
