"""Prompt-learning tables -> FT's p/prompt-tuning files beside the shards, and their config.ini keys.

What FT does with them (FasterTransformer, read from its sources; this project copies none of it):
- config.ini: `prompt_learning_type` in the model's section (0 none, 1 soft prompt, 2 prefix prompt, 3 p/prompt
  tuning), `prompt_learning_start_id` (default end_id + 1), `num_tasks`, and one `[task_<i>]` section per task with
  `task_name` and `prompt_length`; task i is the id a request sends (triton_backend/multi_gpu_gpt/
  ParallelGptTritonModel.cc).
- files: with type 3, `model.prompt_table.<task_name>.weight.bin`, [prompt_length, hidden] in weight_data_type, one
  whole table in the shard directory that every rank reads (models/multi_gpu_gpt/ParallelGptWeight.cc). Type 2 reads
  `model.prefix_prompt.<task_name>.weight.<rank>.bin` ([prompt_length, 2 * layers * hidden / tp]: per-layer key and
  value prefixes); type 1 loads nothing (its embeddings come in each request, `request_prompt_embedding`).
- serving: the request's input_ids already hold the virtual tokens (`prompt_learning_start_id + j`, where the
  request wants them) and input_lengths count them; `prompt_learning_task_name_ids` [batch] picks each row's table,
  and the embedding lookup takes row `id - prompt_learning_start_id` of that table for every id >= the start id,
  adding the position embedding of the token's place as for any token (models/multi_gpu_gpt/ParallelGpt.cc,
  kernels/gpt_kernels.cu `start_id_embedding_position_lookups_kernel`). templates/ft_python/ft_gpt.py does the same.
- NeMo: FT's converter (examples/pytorch/gpt/utils/nemo_ckpt_convert.py, `prompt_convert`) reads a
  MegatronGPTPromptLearningModel .nemo as `model_config.yaml` `task_templates` (`taskname`, `total_virtual_tokens`)
  and `model_weights.ckpt`, a torch.save dict whose "prompt_table" entry maps
  `prompt_table.<taskname>.prompt_embeddings.weight` to the task's [total_virtual_tokens, hidden] table; it writes
  type 3 with start id 50257. NeMo adds a p-tuning task's encoder output to that table when training ends, so
  prompt tuning and p-tuning read alike. Later NeMo releases (nemo/collections/nlp/modules/common/prompt_encoder.py)
  save a p-tuning model's encoder instead, under "prompt_encoder": its cached output ("prompt_table", the same key
  names; zeros until the model first ran in eval mode), "embeddings" ({"weight": [P, h]}) and the encoder's head;
  with no cached output the table is the encoder's output, computed here for encoder_type `embedding` (the
  embeddings) and `mlp` (nn.Sequential of Linear layers with ReLU between them, "mlp_head" = its state dict); `lstm`
  and `tpmlp` encoders are refused.

Soft prompts trained by prompt tuning are such tables too: FT serves them as type 3. Type 1 (embeddings in every
request) and type 2 (per-layer prefixes, which this export has no source for) are refused, each naming why.
"""

from __future__ import annotations

import logging
import re
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from templates.ft_python.ft_checkpoint import P_PROMPT_TUNING, CheckpointError, FTConfig

from ..lazy import torch
from ..readers import nemo_archive
from ..readers.pickles import load_state_dict

log = logging.getLogger(__name__)

# config choice -> FT's prompt_learning_type, and why the others are refused.
TYPES = {"p_prompt_tuning": P_PROMPT_TUNING}
REFUSED_TYPES = {
    "soft_prompt": "FT's type 1 takes the prompt embeddings in every request (request_prompt_embedding) and loads no "
                   "table from the shards; a prompt-tuning table is served as p_prompt_tuning",
    "prefix_prompt": "FT's type 2 needs per-layer key/value prefixes (model.prefix_prompt.<task>.weight.<rank>.bin), "
                     "which a [prompt_length, hidden] table does not give",
}
_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
NEMO_WEIGHTS = "model_weights.ckpt"
NEMO_TABLE_KEY = "prompt_table"  # MegatronGPTPromptLearningModel's state-dict entry for its PromptTable
NEMO_ENCODER_KEY = "prompt_encoder"  # later releases: the p-tuning encoder (module docstring)


@dataclass(frozen=True)
class PromptTables:
    """Checked tables, in task-id order: names[i] is task i, tables[i] its [prompt_length, hidden] float32 array."""

    names: tuple[str, ...]
    tables: tuple[np.ndarray, ...]
    learning_type: int = P_PROMPT_TUNING
    start_id: int | None = None  # None: the model's vocab_size (the first id no token has)

    @property
    def hidden(self) -> int:
        return int(self.tables[0].shape[1])

    def check(self, params: FTConfig) -> None:
        """Before anything is written: every table is as wide as the model, and the virtual ids lie past the
        vocabulary."""
        wrong = [f"{name} [{t.shape[0]}, {t.shape[1]}]" for name, t in zip(self.names, self.tables)
                 if t.shape[1] != params.hidden_size]
        if wrong:
            raise CheckpointError(f"export.prompt_learning: prompt tables {wrong} do not match the model's hidden size "
                                  f"{params.hidden_size} ([prompt_length, hidden] expected)")
        if self.start_id is not None and self.start_id < params.vocab_size:
            raise CheckpointError(f"export.prompt_learning.start_id: {self.start_id} is inside the vocabulary "
                                  f"(vocab_size {params.vocab_size}); virtual token ids must be >= {params.vocab_size}")

    def config(self, config: FTConfig) -> FTConfig:
        """`config` with the prompt-learning keys and task sections."""
        start = config.vocab_size if self.start_id is None else self.start_id
        return replace(config, prompt_learning_type=self.learning_type, prompt_learning_start_id=start,
                       prompt_tasks=tuple((name, int(t.shape[0])) for name, t in zip(self.names, self.tables)))

    def write(self, shard_dir: Path, weight_data_type: str) -> None:
        """One file per task in the shard directory, in the weights' type (FT reads them as model_file_type)."""
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[weight_data_type]
        for name, table in zip(self.names, self.tables):
            data = torch.from_numpy(np.ascontiguousarray(table)).to(dtype)
            raw = data.view(torch.int16) if dtype == torch.bfloat16 else data  # numpy has no bfloat16
            raw.numpy().tofile(Path(shard_dir) / f"model.prompt_table.{name}.weight.bin")


def load_prompt_tables(learning_type: str, tasks, nemo: str | None = None, start_id: int | None = None,
                       key: str = "export.prompt_learning") -> PromptTables | None:
    """The tables the config names (`tasks`: [{name, path}], `nemo`: a prompt-learning .nemo), read and checked
    against each other; None when it names none. Raises CheckpointError naming the key."""
    tasks = list(tasks or [])
    if not tasks and not nemo:
        return None
    if learning_type in REFUSED_TYPES:
        raise CheckpointError(f"{key}.type: {learning_type} is not supported: {REFUSED_TYPES[learning_type]}")
    if learning_type not in TYPES:
        raise CheckpointError(f"{key}.type: {learning_type!r} is not one of {sorted(TYPES) + sorted(REFUSED_TYPES)}")
    names, tables = [], []
    if nemo:
        for name, table in read_nemo_prompt_tables(Path(nemo), f"{key}.nemo"):
            names.append(name)
            tables.append(table)
    for index, task in enumerate(tasks):
        where = f"{key}.tasks[{index}]"
        name, path = task.get("name"), task.get("path")
        if not name or not path:
            raise CheckpointError(f"{where}: needs a name and a path, got {dict(task)}")
        names.append(str(name))
        tables.append(read_table_file(Path(path), where))
    bad = [name for name in names if not _TASK_NAME.match(name)]
    if bad:
        raise CheckpointError(f"{key}.tasks: task names {bad} must be letters, digits, '_', '.' or '-' (FT makes "
                              "file names of them)")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise CheckpointError(f"{key}.tasks: task names {repeated} appear more than once (the .nemo's included)")
    widths = sorted({int(t.shape[1]) for t in tables})
    if len(widths) > 1:
        raise CheckpointError(f"{key}.tasks: the tables differ in width {widths}: one model has one hidden size")
    if start_id is not None and start_id < 0:
        raise CheckpointError(f"{key}.start_id: must be >= 0 or null, got {start_id}")
    return PromptTables(tuple(names), tuple(tables), TYPES[learning_type], start_id)


def read_table_file(path: Path, where: str) -> np.ndarray:
    """A [prompt_length, hidden] table from a .npy or .safetensors file (one tensor) as float32."""
    if not path.is_file():
        raise CheckpointError(f"{where}.path: no file {path}")
    if path.suffix == ".npy":
        try:
            table = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as error:
            raise CheckpointError(f"{where}.path: {path} is no readable .npy file: {error}") from None
    elif path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"{where}.path: {path} is no readable safetensors file: {error}") from None
        if len(tensors) != 1:
            raise CheckpointError(f"{where}.path: {path} holds {len(tensors)} tensors {sorted(tensors)}; one "
                                  "[prompt_length, hidden] table expected")
        table = next(iter(tensors.values())).float().numpy()
    else:
        raise CheckpointError(f"{where}.path: {path} is neither .npy nor .safetensors")
    return _checked_table(table, f"{where}.path: {path}")


def read_nemo_prompt_tables(path: Path, where: str) -> list[tuple[str, np.ndarray]]:
    """[(taskname, table)] of a MegatronGPTPromptLearningModel .nemo (the layout FT's converter reads: module
    docstring), in task_templates order."""
    if not path.exists():
        raise CheckpointError(f"{where}: no file {path}")
    config = nemo_archive.source_config(path)
    templates = config.get("task_templates")
    if not isinstance(templates, list) or not templates:
        raise CheckpointError(f"{where}: {path} has no task_templates in model_config.yaml: not a prompt-learning "
                              "(MegatronGPTPromptLearningModel) checkpoint")
    with tempfile.TemporaryDirectory(prefix=".nemo-prompt-") as staging:
        weights = Path(staging) / NEMO_WEIGHTS
        if path.is_dir():
            weights = path / NEMO_WEIGHTS
        else:
            archive = nemo_archive.NemoArchive(path)
            try:
                archive.copy_out(NEMO_WEIGHTS, weights)
            finally:
                archive.close()
        state = load_state_dict(weights)
        state = state if isinstance(state, dict) else {}
        table_state, encoder_state = state.get(NEMO_TABLE_KEY), state.get(NEMO_ENCODER_KEY)
        if not isinstance(table_state, dict) and not isinstance(encoder_state, dict):
            raise CheckpointError(f"{where}: {path}'s {NEMO_WEIGHTS} has neither a '{NEMO_TABLE_KEY}' nor a "
                                  f"'{NEMO_ENCODER_KEY}' entry (found {sorted(state)})")
        result = []
        for template in templates:
            name, length = template.get("taskname"), template.get("total_virtual_tokens")
            key = f"prompt_table.{name}.prompt_embeddings.weight"
            tensor = (table_state or {}).get(key)
            if tensor is None and isinstance(encoder_state, dict):
                tensor = _encoder_table(encoder_state, key, config, f"{where}: task {name!r}")
            if tensor is None:
                raise CheckpointError(
                    f"{where}: task {name!r} has no {key} in {path}: a p-tuning task whose encoder output was never "
                    "added to the prompt table (NeMo adds it when training ends); tables present: "
                    f"{sorted(table_state or {})}")
            table = _checked_table(tensor.float().numpy(), f"{where}: task {name!r}")
            if length is not None and int(length) != table.shape[0]:
                raise CheckpointError(f"{where}: task {name!r} says total_virtual_tokens={length} but its table has "
                                      f"{table.shape[0]} rows")
            result.append((str(name), table))
    return result


def _encoder_table(encoder_state: dict, key: str, config: dict, where: str) -> torch.Tensor | None:
    """A p-tuning encoder's table: its cached output when NeMo filled it, else the encoder's output (module
    docstring); None when the encoder holds no embeddings."""
    cached = (encoder_state.get("prompt_table") or {}).get(key)
    if cached is not None and bool(cached.any()):
        return cached
    embeddings = (encoder_state.get("embeddings") or {}).get("weight")  # [P, h]
    if embeddings is None:
        return None
    kind = str((config.get("p_tuning") or {}).get("encoder_type", "mlp")).lower()
    if kind == "embedding":
        return embeddings
    if kind != "mlp":
        raise CheckpointError(f"{where}: its p-tuning encoder ({kind}) left no cached output; only embedding and mlp "
                              "encoders are computed here: run the model once in NeMo (eval) and save it again")
    head = encoder_state.get("mlp_head") or {}
    indices = sorted({int(name.split(".")[0]) for name in head})  # Linear layers of the Sequential, ReLU between
    hidden = embeddings.float()
    for position, index in enumerate(indices):
        bias = head.get(f"{index}.bias")
        hidden = torch.nn.functional.linear(hidden, head[f"{index}.weight"].float(),
                                            None if bias is None else bias.float())
        if position < len(indices) - 1:
            hidden = torch.relu(hidden)
    return hidden


def _checked_table(table: np.ndarray, where: str) -> np.ndarray:
    if table.ndim != 2 or table.shape[0] < 1 or table.shape[1] < 1:
        raise CheckpointError(f"{where}: shape {list(table.shape)}; a [prompt_length, hidden] table expected")
    if table.dtype.kind != "f":
        raise CheckpointError(f"{where}: dtype {table.dtype}; floating-point embeddings expected")
    table = table.astype(np.float32)
    if not np.isfinite(table).all():
        raise CheckpointError(f"{where}: holds NaN or infinite values")
    return table
