"""What the preprocessing and postprocessing python-backend models share; copied next to each one's model.py.

Self-contained: numpy-free, needs only tokenizers. The tokenizer is `tokenizer/tokenizer.json` next to this file.
Its post-processor is the served choice of special tokens (decided by the exporter), so it is used as it is.
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


def int_parameter(config, key):
    """An integer config.pbtxt parameter, or None when the exporter wrote none."""
    raw = config_parameter(config, key)
    return None if raw is None else int(raw)


def respond_each(requests, handle, model_name, pb_utils):
    """One response per request, in order; a request whose `handle` raises gets its own error response, so one bad
    request never fails the others batched with it."""
    responses = []
    for request in requests:
        try:
            responses.append(handle(request))
        except Exception as error:  # reported to that request only
            responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{model_name}: {error}")))
    return responses


def load_tokenizer_and_end_id(config):
    """The repository's tokenizer and the `end_id` parameter the exporter writes (the pad / end token)."""
    tokenizer = Tokenizer.from_file(TOKENIZER_PATH)
    raw = config_parameter(config, "end_id")
    if raw is None:
        raise ValueError("config.pbtxt parameter 'end_id' is missing")
    return tokenizer, int(raw)
