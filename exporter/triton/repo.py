"""The text ends of the model repository: preprocessing (the checkpoint's tokenizer) and postprocessing (its
detokenizer) around the runtime's model, wired by an ensemble.

The export stage (exporter/stages/export.py) fills one temporary repository in order -- shards, the runtime's
model, then these -- and renames it into place when whole. Everything copied here comes from `templates/`, so a
stock tritonserver (python backend + tokenizers) serves the repository without this package installed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from . import render, trtllm

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"
# What each text model's version directory gets, as paths under templates/.
TEMPLATE_FILES = {
    "preprocessing": ("preprocessing/model.py", "tokenizer_model.py"),
    "postprocessing": ("postprocessing/model.py", "tokenizer_model.py"),
}


def copy_templates(files: tuple[str, ...], version_dir: Path) -> None:
    """Copy `files` (paths under templates/) flat into a python-backend model's version directory."""
    version_dir.mkdir(parents=True, exist_ok=True)
    for relative in files:
        shutil.copy2(TEMPLATES / relative, version_dir / Path(relative).name)


def install_tokenizer_model(repo: Path, config, tokenizer_json: Path) -> Path:
    """`<repo>/<name>/{config.pbtxt, 1/*.py, 1/tokenizer/tokenizer.json}` for preprocessing or postprocessing."""
    version_dir = repo / config.name / "1"
    copy_templates(TEMPLATE_FILES[config.name], version_dir)
    (version_dir / "tokenizer").mkdir()
    shutil.copy2(tokenizer_json, version_dir / "tokenizer" / "tokenizer.json")
    render.write_config(config, repo / config.name)
    return repo / config.name


def add_decoder_ensemble(repo: Path, model_name: str, max_batch_size: int, end_id: int, tokenizer_json: Path,
                         max_queue_delay_microseconds: int = 0, decoupled: bool = False,
                         eos_ids: tuple[int, ...] = (), skip_special_tokens: bool = True,
                         output_length: dict[str, int] | None = None, prompt_tasks: tuple = (),
                         prompt_start_id: int = 0, trtllm_model_name: str | None = None) -> None:
    """Text in, text out around a decoder-only model already in `<repo>/<model_name>`: preprocessing,
    postprocessing and the ensemble (FT's all_models/gpt layout). eos_ids: the ids postprocessing cuts the text
    at (the model's eos set; () = end_id only). output_length: the parameters that size a request without an output
    length (render.preprocessing_config). `tokenizer_json` is served as it is: its post-processor adds the
    prompt's special tokens (exporter/tokenizer.py decided them). prompt_tasks ((name, prompt_length), ...) and
    prompt_start_id: the model's prompt-learning tasks, picked by name through the ensemble. trtllm_model_name: also
    the TensorRT-LLM-compatible model of that name (exporter/triton/trtllm.py)."""
    taken = (model_name, "preprocessing", "postprocessing", "ensemble")
    if trtllm_model_name in taken:
        raise ValueError(f"trtllm_model_name={trtllm_model_name!r} clashes with a model of the repository "
                         f"({', '.join(taken)}); pick another name")
    for config in (
        render.preprocessing_config(max_batch_size, end_id, max_queue_delay_microseconds, output_length,
                                    prompt_tasks, prompt_start_id),
        render.postprocessing_config(max_batch_size, end_id, max_queue_delay_microseconds, eos_ids,
                                     skip_special_tokens),
    ):
        install_tokenizer_model(repo, config, tokenizer_json)
    (repo / "ensemble" / "1").mkdir(parents=True)
    render.write_config(render.ensemble_config(model_name, max_batch_size, decoupled, bool(prompt_tasks)),
                        repo / "ensemble")
    if trtllm_model_name:
        trtllm.add_trtllm_model(repo, trtllm.trtllm_config(
            trtllm_model_name, model_name, max_batch_size, decoupled, end_id, eos_ids, skip_special_tokens,
            output_length), tokenizer_json, TEMPLATES)


def add_encoder_decoder_ensemble(repo: Path, model_name: str, max_batch_size: int, end_id: int, tokenizer_json: Path,
                                 max_new_tokens: int, max_queue_delay_microseconds: int = 0,
                                 eos_ids: tuple[int, ...] = (), skip_special_tokens: bool = True,
                                 decoupled: bool = False) -> None:
    """Text in, text out around an encoder-decoder model (FT's T5 tensors) already in `<repo>/<model_name>`: the
    prompt, tokenized with its special tokens (T5: </s> appended), is the encoder's input; postprocessing decodes the
    generated tokens. max_new_tokens: the output length of a request without one (HF's for the checkpoint).
    decoupled: the model streams, and so does the ensemble (text so far, once per streamed response)."""
    for config in (
        render.preprocessing_config(max_batch_size, end_id, max_queue_delay_microseconds,
                                    {"max_new_tokens": max_new_tokens}),
        render.encoder_decoder_postprocessing_config(max_batch_size, end_id, max_queue_delay_microseconds, eos_ids,
                                                     skip_special_tokens),
    ):
        install_tokenizer_model(repo, config, tokenizer_json)
    (repo / "ensemble" / "1").mkdir(parents=True)
    render.write_config(render.encoder_decoder_ensemble_config(model_name, max_batch_size, decoupled),
                        repo / "ensemble")
