"""OpenAI request bodies -> one checked GenerationRequest; results -> OpenAI response bodies and stream chunks.

Only what the served model can honour is accepted: a parameter it cannot (logprobs, echo, penalties, tools, ...)
is refused with an OpenAI-style error naming it, never silently ignored.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat: up to the context length
MAX_STOP_STRINGS = 4  # as OpenAI

# Parameters accepted but without effect on the output (bookkeeping for the caller).
IGNORED = {"user", "metadata", "store", "service_tier"}
COMMON = {"model", "max_tokens", "temperature", "top_p", "seed", "n", "stop", "stream", "stream_options"} | IGNORED
COMPLETION_KEYS = COMMON | {"prompt"}
CHAT_KEYS = COMMON | {"messages", "max_completion_tokens"}
# Accepted at their neutral values only.
NEUTRAL = {"presence_penalty": 0, "frequency_penalty": 0, "logprobs": (None, False), "echo": False, "best_of": 1,
           "top_logprobs": None, "logit_bias": None, "suffix": None, "tools": None, "tool_choice": None,
           "response_format": None, "parallel_tool_calls": None}


class OpenAIError(Exception):
    """An error answered as OpenAI does: HTTP status and {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 error_type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.error_type = status, message, param, code, error_type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param, code)


@dataclass
class GenerationRequest:
    """What to generate: prompts (text or token ids, or chat messages) and the decoding options."""

    kind: str  # "completion" | "chat"
    model: str
    prompts: list = field(default_factory=list)  # completion: str or list[int] per prompt
    messages: list = field(default_factory=list)  # chat
    max_tokens: int | None = None  # None: up to the context length
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage


def _number(body: dict, key: str, default, low: float, high: float, integer: bool = False):
    value = body.get(key, default)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise bad_request(f"{key} must be {'an integer' if integer else 'a number'}, got {value!r}", key)
    if not low <= value <= high:
        raise bad_request(f"{key} must be in [{low}, {high}], got {value!r}", key)
    return value


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad_request(f"stop must be a non-empty string or a list of them, got {stop!r}", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}", "stop")
    return stops


def _prompts(prompt) -> list:
    """A string, a list of strings, a list of token ids or a list of such lists -> one entry per prompt."""
    def is_ids(value):
        return isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value)

    if isinstance(prompt, str):
        return [prompt]
    if is_ids(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or is_ids(p) for p in prompt):
        return list(prompt)
    raise bad_request("prompt must be a string, a list of strings, a list of token ids or a list of such lists",
                      "prompt")


def _messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", "messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise bad_request(f"messages[{index}] must be an object with a role", f"messages[{index}]")
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text ones can be rendered
            if not all(isinstance(part, dict) and part.get("type") == "text" for part in content):
                raise bad_request(f"messages[{index}].content: only text parts are supported",
                                  f"messages[{index}].content")
        elif not isinstance(content, str) and content is not None:
            raise bad_request(f"messages[{index}].content must be a string or a list of text parts",
                              f"messages[{index}].content")
    return [_flatten_text_parts(message) for message in messages]


def _flatten_text_parts(message: dict) -> dict:
    """[{"type": "text", "text": ...}, ...] content -> one string (what text-only chat templates expect)."""
    if isinstance(message.get("content"), list):
        return {**message, "content": "".join(part.get("text", "") for part in message["content"])}
    return message


def parse(kind: str, body, served_models: set[str]) -> GenerationRequest:
    """A checked GenerationRequest from a /v1/completions (kind "completion") or /v1/chat/completions body."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    allowed = COMPLETION_KEYS if kind == "completion" else CHAT_KEYS
    for key, value in body.items():
        if key in NEUTRAL:
            neutral = NEUTRAL[key]
            if value not in (neutral if isinstance(neutral, tuple) else (neutral,)):
                raise bad_request(f"{key}={value!r} is not supported by this server", key, "unsupported_parameter")
        elif key not in allowed:
            raise bad_request(f"unrecognized request argument: {key}", key, "unsupported_parameter")
    model = body.get("model")
    if not isinstance(model, str):
        raise bad_request("model is required", "model")
    if model not in served_models:
        raise OpenAIError(404, f"The model `{model}` does not exist; served: {sorted(served_models)}", "model",
                          "model_not_found")
    request = GenerationRequest(kind=kind, model=model)
    if kind == "completion":
        if "prompt" not in body:
            raise bad_request("prompt is required", "prompt")
        request.prompts = _prompts(body["prompt"])
        request.max_tokens = _number(body, "max_tokens", COMPLETION_DEFAULT_MAX_TOKENS, 1, 1 << 31, integer=True)
    else:
        request.messages = _messages(body.get("messages"))
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        request.max_tokens = _number(body, key, None, 1, 1 << 31, integer=True)
    request.temperature = float(_number(body, "temperature", 1.0, 0.0, 2.0))
    request.top_p = float(_number(body, "top_p", 1.0, 0.0, 1.0))
    if request.top_p == 0.0:
        raise bad_request("top_p must be greater than 0", "top_p")
    request.seed = _number(body, "seed", None, 0, (1 << 64) - 1, integer=True)
    request.n = _number(body, "n", 1, 1, 128, integer=True)
    request.stop = _stop(body)
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise bad_request(f"stream must be a boolean, got {stream!r}", "stream")
    request.stream = bool(stream)
    options = body.get("stream_options")
    if options is not None:
        if not request.stream:
            raise bad_request("stream_options is only allowed when stream is true", "stream_options")
        if not isinstance(options, dict):
            raise bad_request("stream_options must be an object", "stream_options")
        request.include_usage = bool(options.get("include_usage", False))
    return request


@dataclass
class Choice:
    """One generated sequence: its text (cut at a stop string), token count and why it ended."""

    index: int
    text: str
    completion_tokens: int
    finish_reason: str | None  # "stop" | "length" | None while streaming


def response_id(kind: str) -> str:
    return ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response_body(request: GenerationRequest, identifier: str, choices: list[Choice], prompt_tokens: int) -> dict:
    created = int(time.time())
    completion_tokens = sum(choice.completion_tokens for choice in choices)
    if request.kind == "completion":
        items = [{"index": c.index, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
                 for c in choices]
        kind = "text_completion"
    else:
        items = [{"index": c.index, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                  "finish_reason": c.finish_reason} for c in choices]
        kind = "chat.completion"
    return {"id": identifier, "object": kind, "created": created, "model": request.model, "choices": items,
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk_body(request: GenerationRequest, identifier: str, index: int, text: str | None,
               finish_reason: str | None, role: bool = False) -> dict:
    """One stream chunk: a text delta (or, role=True, chat's first delta with the assistant role)."""
    if request.kind == "completion":
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        kind = "text_completion"
    else:
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        kind = "chat.completion.chunk"
    body = {"id": identifier, "object": kind, "created": int(time.time()), "model": request.model,
            "choices": [choice]}
    if request.include_usage:
        body["usage"] = None
    return body


def usage_chunk(request: GenerationRequest, identifier: str, prompt_tokens: int, completion_tokens: int) -> dict:
    kind = "text_completion" if request.kind == "completion" else "chat.completion.chunk"
    return {"id": identifier, "object": kind, "created": int(time.time()), "model": request.model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}
