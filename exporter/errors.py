"""Errors that describe a problem with the user's input or environment: reported as one line, no traceback."""

from .evaluate.lambada import AccuracyMismatch
from .ft.sharding import ShardingError
from .readers.hf import CheckpointError
from .serve.tritonserver import TritonServerError
from .tokenizer import TokenizerError
from templates.ft_python.ft_checkpoint import CheckpointError as ShardCheckpointError

USER_ERRORS = (
    AccuracyMismatch,
    CheckpointError,
    ShardCheckpointError,
    ShardingError,
    TokenizerError,
    TritonServerError,
    FileNotFoundError,
)
