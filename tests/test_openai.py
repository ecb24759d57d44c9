"""The OpenAI-compatible front end (`ft-exporter-openai`) driven by the official `openai` client.

A tiny seeded GPT-2 with a chat template (chat_template.jinja) is exported (plain + decoupled model) and
served by tritonserver; the front end runs in this process. Expected texts and token counts come from HF
transformers: `apply_chat_template` + `generate` (greedy) and the HF tokenizer.
"""

from __future__ import annotations

import json
import shutil
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from serving_fixtures import MODEL, STREAM_MODEL, build_serving_repository, tritonserver_or_skip

pytestmark = pytest.mark.triton
transformers = pytest.importorskip("transformers")
openai = pytest.importorskip("openai")

# ChatML-like, with indented block tags (trim_blocks / lstrip_blocks matter), raise_exception and bos_token.
CHAT_TEMPLATE = """{{ bos_token }}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role: ' + message['role']) }}
    {% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
PROMPT = "Thank you for"


@pytest.fixture(scope="module")
def chat_checkpoint(tiny_gpt2, tmp_path_factory):
    directory = tmp_path_factory.mktemp("chat-gpt2") / "checkpoint"
    shutil.copytree(tiny_gpt2, directory)
    config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
              "unk_token": "<|endoftext|>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    # As transformers >= 4.43 saves it; the export must carry the file into the repository.
    (directory / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return directory


@pytest.fixture(scope="module")
def hf(chat_checkpoint):
    tokenizer = transformers.AutoTokenizer.from_pretrained(chat_checkpoint)
    model = transformers.GPT2LMHeadModel.from_pretrained(chat_checkpoint).eval()
    return tokenizer, model


@dataclass(frozen=True)
class FrontEnd:
    url: str  # the OpenAI API's base URL (http://host:port/v1)
    server: object  # exporter.openai.server.OpenAIServer
    repository: Path
    triton_http: str
    triton_grpc: str


@pytest.fixture(scope="module")
def front_end(chat_checkpoint, tmp_path_factory):
    """tritonserver over the exported repository + the OpenAI server on a free port (both always stopped)."""
    from exporter.openai.server import make_server
    from exporter.serve.tritonserver import TritonServer

    install = tritonserver_or_skip()
    root = tmp_path_factory.mktemp("openai-serving")
    repository = build_serving_repository(root, chat_checkpoint)
    with TritonServer(repository, root / "tritonserver.log", install=install, startup_timeout_s=240) as triton:
        server = make_server(repository, triton.http_url, MODEL, port=0, grpc_url=triton.grpc_url,
                             stream_model=STREAM_MODEL, served_name="tiny-chat")
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield FrontEnd(server.url, server, repository, triton.http_url, triton.grpc_url)
        finally:
            server.shutdown()
            server.server_close()


@pytest.fixture(scope="module")
def client(front_end):
    return openai.OpenAI(base_url=front_end.url, api_key="unused", max_retries=0)


def hf_greedy(hf, ids: list[int], max_new_tokens: int) -> list[int]:
    tokenizer, model = hf
    with torch.inference_mode():
        output = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.eos_token_id)
    return output[0, len(ids):].tolist()


def hf_chat_ids(hf) -> list[int]:
    tokenizer, _ = hf
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def test_models_lists_the_served_model(client):
    assert [model.id for model in client.models.list().data] == ["tiny-chat"]
    assert client.models.retrieve("tiny-chat").id == "tiny-chat"


def test_completion_is_hf_greedy_text_and_counts(client, hf):
    tokenizer, _ = hf
    prompt_ids = tokenizer(PROMPT).input_ids
    expected = hf_greedy(hf, prompt_ids, 12)
    response = client.completions.create(model="tiny-chat", prompt=PROMPT, max_tokens=12, temperature=0)
    assert response.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)
    assert response.choices[0].finish_reason == "length"
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (len(prompt_ids), len(expected))
    assert response.usage.total_tokens == len(prompt_ids) + len(expected)


def test_chat_is_hf_apply_chat_template_and_generate(client, hf):
    tokenizer, _ = hf
    prompt_ids = hf_chat_ids(hf)
    assert prompt_ids[0] == tokenizer.bos_token_id  # bos_token rendered, encoded as the special token
    expected = hf_greedy(hf, prompt_ids, 10)
    response = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=10, temperature=0)
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == tokenizer.decode(expected, skip_special_tokens=True)
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (len(prompt_ids), len(expected))


def test_chat_stream_deltas_join_to_the_hf_text(client, hf):
    tokenizer, _ = hf
    prompt_ids = hf_chat_ids(hf)
    expected = hf_greedy(hf, prompt_ids, 10)
    chunks = list(client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == tokenizer.decode(expected, skip_special_tokens=True)
    assert sum(1 for d in deltas if d) > 1  # token by token, not one block
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == len(expected)
    assert chunks[-1].usage.prompt_tokens == len(prompt_ids)


def test_completion_stream_joins_to_the_plain_text(client):
    plain = client.completions.create(model="tiny-chat", prompt=PROMPT, max_tokens=8, temperature=0)
    chunks = list(client.completions.create(model="tiny-chat", prompt=PROMPT, max_tokens=8, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_cuts_the_text_and_the_count(client, hf, stream):
    tokenizer, _ = hf
    prompt_ids = tokenizer(PROMPT).input_ids
    expected = hf_greedy(hf, prompt_ids, 16)
    full = tokenizer.decode(expected, skip_special_tokens=True)
    stop = full[len(full) // 2: len(full) // 2 + 2]
    cut = full[:full.find(stop)]
    # The tokens generated until the stop string first appears in the decoded text.
    tokens = next(k for k in range(1, len(expected) + 1) if stop in tokenizer.decode(expected[:k]))
    if stream:
        chunks = list(client.completions.create(model="tiny-chat", prompt=PROMPT, max_tokens=16, temperature=0,
                                                stop=[stop], stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == cut
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
        assert chunks[-1].usage.completion_tokens == tokens
    else:
        response = client.completions.create(model="tiny-chat", prompt=PROMPT, max_tokens=16, temperature=0,
                                             stop=stop)
        assert response.choices[0].text == cut
        assert response.choices[0].finish_reason == "stop"
        assert response.usage.completion_tokens == tokens


def test_n_samples_with_a_seed_are_reproducible(client):
    def sample():
        response = client.completions.create(model="tiny-chat", prompt=PROMPT, max_tokens=8, temperature=1.0,
                                             top_p=0.9, seed=7, n=3)
        return [choice.text for choice in sorted(response.choices, key=lambda c: c.index)]

    first = sample()
    assert len(first) == 3 and len(set(first)) > 1  # the n samples differ
    assert sample() == first  # the same seed samples the same again


def test_a_decoupled_only_repository_answers_plain_requests_through_its_stream(client, front_end):
    from exporter.openai.server import make_server

    streaming_only = make_server(front_end.repository, front_end.triton_http, None, port=0,
                                 grpc_url=front_end.triton_grpc, stream_model=STREAM_MODEL, served_name="tiny-chat")
    thread = threading.Thread(target=streaming_only.serve_forever, daemon=True)
    thread.start()
    try:
        other = openai.OpenAI(base_url=streaming_only.url, api_key="unused", max_retries=0)
        expected = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=6, temperature=0)
        answer = other.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=6, temperature=0)
        assert answer.choices[0].message.content == expected.choices[0].message.content
        assert answer.usage == expected.usage
    finally:
        streaming_only.shutdown()
        streaming_only.server_close()


def test_errors_are_openai_shaped_and_the_server_keeps_serving(client, front_end):
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=2)
    assert missing.value.status_code == 404 and missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="tiny-chat", prompt=PROMPT, max_tokens=2, temperature=5)
    assert bad.value.status_code == 400 and bad.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as unsupported:
        client.completions.create(model="tiny-chat", prompt=PROMPT, max_tokens=2, logprobs=2)
    assert unsupported.value.param == "logprobs"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model="tiny-chat", prompt=PROMPT, max_tokens=10_000)
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as role:  # the template's raise_exception
        client.chat.completions.create(model="tiny-chat", messages=[{"role": "tool", "content": "x"}], max_tokens=2)
    assert "unknown role: tool" in role.value.message
    request = urllib.request.Request(f"{front_end.url}/completions", data=b"{not json",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as raw:
        urllib.request.urlopen(request, timeout=30)
    assert raw.value.code == 400
    assert set(json.loads(raw.value.read())["error"]) == {"message", "type", "param", "code"}
    with client.completions.create(model="tiny-chat", prompt=PROMPT, max_tokens=40, temperature=0,
                                   stream=True) as dropped:  # a client leaving mid-stream
        next(iter(dropped))
    response = client.completions.create(model="tiny-chat", prompt=PROMPT, max_tokens=2, temperature=0)
    assert response.usage.completion_tokens == 2


def test_the_command_serves_the_repository(front_end, client):
    """`ft-exporter-openai` as installed ([project.scripts]) and run as a process, until terminated."""
    import socket
    import subprocess
    import sys
    import time

    from test_clients import declared_scripts

    assert declared_scripts()["ft-exporter-openai"] == "exporter.openai.server:main"
    root = Path(__file__).resolve().parents[1]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "exporter.openai.server", str(front_end.repository),
                                "--model", MODEL, "--triton-url", front_end.triton_http, "--port", str(port),
                                "--served-model-name", "tiny-chat"], cwd=root)
    try:
        other = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        deadline = time.monotonic() + 60
        while True:
            try:
                other.models.list()
                break
            except openai.APIConnectionError:
                assert process.poll() is None and time.monotonic() < deadline, "the command did not start serving"
                time.sleep(0.5)
        request = dict(model="tiny-chat", prompt=PROMPT, max_tokens=5, temperature=0)
        expected = client.completions.create(**request).choices[0].text
        assert other.completions.create(**request).choices[0].text == expected
    finally:
        process.terminate()
        process.wait(timeout=30)
