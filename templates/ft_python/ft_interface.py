"""The served GPT model's request interface as one table: every Triton input and output, with its decoding meaning.

The tensors are those of FasterTransformer's GPT Triton backend (all_models/gpt/fastertransformer/config.pbtxt),
in the order config.pbtxt lists them. Read by the exporter's config.pbtxt rendering (exporter/triton/render.py),
the python runtime (model.py, ft_generate.py) and the clients (exporter/clients). Copied flat into generated Triton
model directories next to model.py, so it needs only numpy and imports nothing from the project.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Triton data type (config.pbtxt's TYPE_<name>, the clients' dtype string) -> numpy dtype on the wire.
NUMPY_DTYPES = {"UINT32": np.uint32, "UINT64": np.uint64, "INT32": np.int32, "FP32": np.float32, "BOOL": np.bool_}


@dataclass(frozen=True)
class Bounds:
    """Values every row must take: from low to high (None = unbounded), each end open or closed.

    No ends at all means finite. NaN is never inside.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def allows(self, values) -> bool:
        """Whether every value (array-like, e.g. a CPU tensor) is inside."""
        values = np.asarray(values)
        if self.low is None and self.high is None:
            return bool(np.isfinite(values).all())
        inside = np.ones(values.shape, dtype=bool)
        if self.low is not None:
            inside &= values > self.low if self.low_open else values >= self.low
        if self.high is not None:
            inside &= values < self.high if self.high_open else values <= self.high
        return bool(inside.all())

    def problem(self, name: str, values) -> str | None:
        """None when every value is inside, else the message naming the input (intervals also show the values)."""
        if self.allows(values):
            return None
        if self.low is None and self.high is None:
            return f"{name} must be finite"
        if self.high is None:
            return f"{name} must be {'>' if self.low_open else '>='} {self.low}"
        interval = f"{'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        return f"{name} must be in {interval}, got {values.tolist()}"


FINITE = Bounds()
POSITIVE = Bounds(low=0, low_open=True)
UNIT = Bounds(low=0, high=1)  # [0, 1]
UNIT_POSITIVE = Bounds(low=0, high=1, low_open=True)  # (0, 1]


@dataclass(frozen=True)
class Tensor:
    """One tensor of the interface.

    dims are per row (the batch dimension is implied), as config.pbtxt declares them.
    scalar: dims [1] reshaped to a per-row scalar, as FT's backend declares them.
    default: the decoding value of a row that does not send the input (see ft_generate.SamplingParams).
    bounds: what ft_generate.check_inputs accepts for every row (None: no simple bound, or one that depends on the
      model, e.g. ids inside the vocabulary).
    field: the decoding name (ft_generate.SamplingParams field, or check_inputs argument for the required inputs).
    option: the clients' name (exporter/clients: sampling option and CLI flag), None when clients do not set it so.
    streaming: an output only a decoupled (streaming) model sends.
    """

    name: str
    triton_dtype: str
    dims: tuple[int, ...]
    scalar: bool = False
    optional: bool = False
    default: object = None
    bounds: Bounds | None = None
    field: str | None = None
    option: str | None = None
    streaming: bool = False

    @property
    def numpy_dtype(self):
        return NUMPY_DTYPES[self.triton_dtype]


_FIELD = object()  # _option's default: the clients' option is named as the field


def _option(name, dtype, default, field, option=_FIELD, bounds=None):
    """An optional per-row scalar input (dims [1] reshaped to []); option None: the clients do not set it."""
    return Tensor(name, dtype, (1,), scalar=True, optional=True, default=default, bounds=bounds, field=field,
                  option=field if option is _FIELD else option)


INPUTS = (
    Tensor("input_ids", "UINT32", (-1,), field="input_ids"),  # [B, L] right-padded prompts
    Tensor("input_lengths", "UINT32", (1,), scalar=True, field="input_lengths"),  # [B]; absent: L for every row
    Tensor("request_output_len", "UINT32", (-1,), field="max_new_tokens"),  # [B, n]: FT reads the first per row
    # Token choice: top_k 0/1 with top_p 0 = greedy.
    _option("runtime_top_k", "UINT32", 0, "top_k", bounds=Bounds(low=0)),
    _option("runtime_top_p", "FP32", 0.0, "top_p", bounds=UNIT),
    _option("beam_search_diversity_rate", "FP32", 0.0, "beam_search_diversity_rate", option="diversity_rate",
            bounds=FINITE),
    _option("temperature", "FP32", 1.0, "temperature", bounds=POSITIVE),
    _option("len_penalty", "FP32", 0.0, "len_penalty", bounds=FINITE),
    _option("repetition_penalty", "FP32", 1.0, "repetition_penalty", bounds=POSITIVE),
    _option("random_seed", "UINT64", 0, "random_seed", option="seed"),  # FT seeds with 0 when none is given
    _option("is_return_log_probs", "BOOL", True, "is_return_log_probs", option="return_log_probs"),
    _option("beam_width", "UINT32", 1, "beam_width"),  # in [1, the model's max_beam_width]
    # None: the model's end_id (config.ini); both must be inside the vocabulary.
    _option("start_id", "UINT32", None, "start_id"),
    _option("end_id", "UINT32", None, "end_id"),
    # FT's word-list format per row: [2, len], row 0 the ids of all words concatenated, row 1 the cumulative end
    # offset of each word, both padded with -1 (see templates/preprocessing/model.py). Clients send words as text
    # to the ensemble instead. None: no words.
    Tensor("bad_words_list", "INT32", (2, -1), optional=True, field="bad_words_list"),
    Tensor("stop_words_list", "INT32", (2, -1), optional=True, field="stop_words_list"),
    # FT's decaying nucleus for rows with top_p > 0.
    _option("top_p_decay", "FP32", 1.0, "top_p_decay", bounds=UNIT_POSITIVE),
    _option("top_p_min", "FP32", 1e-6, "top_p_min", bounds=UNIT_POSITIVE),
    _option("top_p_reset_ids", "UINT32", -1, "top_p_reset_ids"),  # -1 = none, else inside the vocabulary
    # FT's p/prompt tuning: the row's task id (config.ini [task_<id>]); the virtual tokens are ids >= config.ini's
    # prompt_learning_start_id inside input_ids (counted in input_lengths), embedded from that task's table.
    # -1 (also 2^32 - 1 on the wire) = none. Clients name tasks through the ensemble (PROMPT_TASK_NAME) instead.
    _option("prompt_learning_task_name_ids", "UINT32", -1, "prompt_task_id", option=None),
)
OUTPUTS = (
    Tensor("output_ids", "UINT32", (-1, -1)),  # [batch, beam, prompt + generated]
    Tensor("sequence_length", "UINT32", (-1,)),  # [batch, beam]
    Tensor("cum_log_probs", "FP32", (-1,)),  # [batch, beam]
    Tensor("output_log_probs", "FP32", (-1, -1)),  # [batch, beam, request_output_len]
    # Added by the python runtime when decoupled. Triton lets an ensemble step downstream of a decoupled model take
    # tensors from that model only (not from preprocessing or the ensemble's inputs), so the streamed responses
    # carry what postprocessing needs besides the ids: the prompt lengths and whether the response is the final one.
    Tensor("prompt_lengths", "UINT32", (1,), streaming=True),  # [batch, 1] = input_lengths
    Tensor("is_final", "BOOL", (1,), streaming=True),  # [batch, 1]: false for per-token responses, true at the end
)

MODEL_INPUTS = tuple(tensor for tensor in INPUTS if not tensor.optional)
SAMPLING_INPUTS = tuple(tensor for tensor in INPUTS if tensor.optional)  # per row; ft_generate.SamplingParams
WORD_LIST_INPUTS = tuple(tensor for tensor in SAMPLING_INPUTS if not tensor.scalar)
MODEL_OUTPUTS = tuple(tensor for tensor in OUTPUTS if not tensor.streaming)
STREAMING_OUTPUTS = tuple(tensor for tensor in OUTPUTS if tensor.streaming)
BY_NAME = {tensor.name: tensor for tensor in INPUTS + OUTPUTS}
BY_FIELD = {tensor.field: tensor for tensor in INPUTS}
