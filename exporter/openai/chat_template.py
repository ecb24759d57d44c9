"""The checkpoint's chat template, rendered as transformers' `apply_chat_template` renders it.

The template is `chat_template.jinja` beside the tokenizer, else tokenizer_config.json's `chat_template` (a string,
or a list of {"name", "template"} of which "default" is used). The environment is transformers': a sandbox with
trim_blocks, lstrip_blocks and the loopcontrols extension; globals raise_exception, strftime_now, dict and
namespace; `tojson` without HTML escaping. The variables are `messages`, `add_generation_prompt`, `tools`,
`documents` and the tokenizer's special tokens (bos_token, eos_token, ...), as transformers passes them. The rendered
text is tokenized without adding special tokens (the template writes them).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatTemplateError(ValueError):
    """The template refused the conversation (raise_exception) or failed to render."""


def _token_text(value) -> str | None:
    """tokenizer_config.json writes a special token as a string or as an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _environment():
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[jinja2.ext.loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    environment.globals["dict"] = dict
    environment.globals["namespace"] = jinja2.utils.Namespace
    return environment


class ChatTemplate:
    """One compiled template and the special-token variables it is rendered with."""

    def __init__(self, source: str, special_tokens: dict[str, str]):
        self.source = source
        self.special_tokens = special_tokens
        self._template = _environment().from_string(source)

    @classmethod
    def load(cls, directory: Path) -> "ChatTemplate | None":
        """The template of the tokenizer files in `directory`; None when the checkpoint has none."""
        directory = Path(directory)
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        special_map_path = directory / "special_tokens_map.json"
        special = json.loads(special_map_path.read_text(encoding="utf-8")) if special_map_path.is_file() else {}
        special_tokens = {}
        for key in SPECIAL_TOKEN_KEYS:  # tokenizer_config.json wins over the legacy special_tokens_map.json
            text = _token_text(config.get(key, special.get(key)))
            if text is not None:
                special_tokens[key] = text
        jinja_file = directory / "chat_template.jinja"
        source = jinja_file.read_text(encoding="utf-8") if jinja_file.is_file() else config.get("chat_template")
        if isinstance(source, list):  # named templates: [{"name": "default", "template": ...}, ...]
            source = {item.get("name"): item.get("template") for item in source}.get("default")
        if not source:
            return None
        return cls(source, special_tokens)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        import jinja2

        try:
            return self._template.render(messages=messages, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except jinja2.exceptions.TemplateError as error:
            raise ChatTemplateError(f"chat template: {error}") from None
