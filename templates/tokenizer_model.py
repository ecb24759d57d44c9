"""What the preprocessing and postprocessing python-backend models share; copied next to each one's model.py.

Self-contained: numpy-free, needs only tokenizers. The tokenizer is `tokenizer/tokenizer.json` next to this file.
"""

import os

from tokenizers import Tokenizer

TOKENIZER_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizer", "tokenizer.json")


class RequestError(ValueError):
    """Problem with one request's inputs; reported to that request only."""


def config_parameter(config, key):
    """A config.pbtxt parameter's string_value, or None."""
    value = config.get("parameters", {}).get(key)
    if isinstance(value, dict):
        value = value.get("string_value")
    return value if value not in (None, "") else None


def load_tokenizer_and_end_id(config):
    """The repository's tokenizer and the `end_id` parameter the exporter writes (the pad / end token)."""
    tokenizer = Tokenizer.from_file(TOKENIZER_PATH)
    raw = config_parameter(config, "end_id")
    if raw is None:
        raise ValueError("config.pbtxt parameter 'end_id' is missing")
    return tokenizer, int(raw)
