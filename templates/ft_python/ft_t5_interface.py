"""The served T5 model's request interface: FasterTransformer's T5 Triton backend tensors (all_models/t5/
fastertransformer/config.pbtxt), in its order, as ft_interface's Tensor entries.

Copied flat into generated Triton model directories next to model_t5.py and ft_interface.py; numpy only, so the
exporter's config.pbtxt rendering and the clients can read it too. The sampling options are the GPT interface's
entries (same names, defaults, bounds); T5 differs in the required inputs (sequence_length = encoder input lengths,
max_output_len) and in the outputs (INT32, output_ids holds the generated tokens only: FT's T5Decoding drops the
decoder start token and its sequence_length does not count it).
"""

from __future__ import annotations

try:  # imported as templates.ft_python.ft_t5_interface inside the project
    from . import ft_interface
except ImportError:  # imported as a top-level module inside a Triton model directory
    import ft_interface

Tensor = ft_interface.Tensor
_GPT = ft_interface.BY_NAME


INPUTS = (
    Tensor("input_ids", "UINT32", (-1,), field="input_ids"),  # [B, L] right-padded encoder inputs
    Tensor("sequence_length", "UINT32", (1,), scalar=True, field="input_lengths"),  # [B] encoder input lengths
    *(_GPT[name] for name in ("runtime_top_k", "runtime_top_p", "beam_search_diversity_rate", "temperature",
                              "len_penalty", "repetition_penalty", "random_seed", "is_return_log_probs")),
    Tensor("max_output_len", "UINT32", (1,), scalar=True, field="max_new_tokens"),  # [B] decoder tokens to generate
    # start_id: the row's first decoder token (default config.ini [decoder] decoder_start_token_id, as FT's T5)
    *(_GPT[name] for name in ("beam_width", "start_id", "end_id", "bad_words_list", "stop_words_list",
                              "top_p_decay", "top_p_min", "top_p_reset_ids")),
)
# FT's T5 config.pbtxt also lists these optional inputs; the python runtime does not serve them and refuses a
# request that sends one (prompt learning for the encoder, soft prompts, IA3 adapters).
UNSERVED_INPUTS = ("prompt_learning_task_name_ids", "request_prompt_lengths", "request_prompt_embedding",
                   "ia3_tasks")
OUTPUTS = (
    Tensor("output_ids", "INT32", (-1, -1)),  # [batch, beam, max_output_len]: generated tokens, end_id padded
    Tensor("sequence_length", "INT32", (-1,)),  # [batch, beam]: generated tokens (a final end_id counts)
    Tensor("cum_log_probs", "FP32", (-1,)),  # [batch, beam]
    Tensor("output_log_probs", "FP32", (-1, -1)),  # [batch, beam, max_output_len]
    # Added when decoupled, as GPT's (ft_interface.STREAMING_OUTPUTS): prompt_lengths [batch, 1] is 0 (output_ids
    # holds no prompt), is_final [batch, 1] false for per-step responses, true for the final one.
    *(_GPT[name] for name in ("prompt_lengths", "is_final")),
)

MODEL_INPUTS = tuple(tensor for tensor in INPUTS if not tensor.optional)
SAMPLING_INPUTS = tuple(tensor for tensor in INPUTS if tensor.optional)  # ft_generate.SamplingParams fields
MODEL_OUTPUTS = tuple(tensor for tensor in OUTPUTS if not tensor.streaming)
STREAMING_OUTPUTS = tuple(tensor for tensor in OUTPUTS if tensor.streaming)
INPUTS_BY_NAME = {tensor.name: tensor for tensor in INPUTS}
OUTPUTS_BY_NAME = {tensor.name: tensor for tensor in OUTPUTS}  # sequence_length is both an input and an output
