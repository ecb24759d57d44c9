"""Errors that describe a problem with the user's input or environment: reported as one line, no traceback."""

from templates.ft_python.ft_checkpoint import CheckpointError

from .atomic import NoSpaceError
from .evaluate.lambada import AccuracyMismatch
from .parallel import ShardingError
from .serve.tritonserver import TritonServerError
from .tokenizer import TokenizerError

USER_ERRORS = (
    AccuracyMismatch,
    CheckpointError,
    ShardingError,
    TokenizerError,
    TritonServerError,
    FileNotFoundError,
    NoSpaceError,
)
