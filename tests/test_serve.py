"""tritonserver launcher + the preprocessing/postprocessing python-backend templates, against a real server.

Server tests are marked `triton`: they start the stock tritonserver (CPU is enough) found by
`find_tritonserver` (the nvidia-pytriton wheel's binary when nothing else is configured).
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import numpy as np
import pytest

from exporter.serve.tritonserver import (
    TritonInstall,
    TritonServer,
    TritonServerError,
    find_tritonserver,
    port_is_free,
    process_group_alive,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
GPT2_TOKENIZER = Path(os.environ.get("GPT2_TOKENIZER_DIR", REPO_ROOT / "exporter" / "data" / "gpt2-tokenizer"))
END_ID = 50256

PROMPTS = [
    "Hello world",
    "  The quick brown fox jumps over the lazy dog.\nNew line\ttab",
    "héllo wörld — naïve café 🤗 日本語",
    "a<|endoftext|>b",
    "x",
]


def prepost_configs(max_batch_size: int = 8):
    """Rendered by exporter.triton.render; preprocessing batches with a delay so concurrent requests share execute()."""
    from exporter.triton import render

    pre = render.preprocessing_config(max_batch_size, END_ID)
    pre.dynamic_batching.max_queue_delay_microseconds = 200_000
    return pre, render.postprocessing_config(max_batch_size, END_ID)


def add_tokenizer_model(repo: Path, config, tokenizer: Path) -> Path:
    """repo/<name>/{config.pbtxt, 1/*.py, 1/tokenizer/tokenizer.json} from templates/, as the exporter installs it."""
    from exporter.triton.repo import install_tokenizer_model

    return install_tokenizer_model(repo, config, tokenizer)


# -- fixtures ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def reference_tokenizer():
    """transformers' GPT-2 tokenizer built from vocab.json/merges.txt: the independent reference."""
    transformers = pytest.importorskip("transformers")
    if not (GPT2_TOKENIZER / "vocab.json").is_file():
        pytest.skip(f"no GPT-2 vocab at {GPT2_TOKENIZER}")
    return transformers.GPT2TokenizerFast(
        vocab=str(GPT2_TOKENIZER / "vocab.json"), merges=str(GPT2_TOKENIZER / "merges.txt")
    )


@pytest.fixture(scope="session")
def tokenizer_json(tmp_path_factory) -> Path:
    """A GPT-2 style byte-level BPE tokenizer.json built with `tokenizers` from vocab.json + merges.txt."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if not (GPT2_TOKENIZER / "vocab.json").is_file():
        pytest.skip(f"no GPT-2 vocab at {GPT2_TOKENIZER}")
    tok = Tokenizer(models.BPE.from_file(str(GPT2_TOKENIZER / "vocab.json"), str(GPT2_TOKENIZER / "merges.txt")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="session")
def backend_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("triton-cache")


@pytest.fixture(scope="session")
def install(backend_cache) -> TritonInstall:
    try:
        return find_tritonserver(os.environ.get("FT_TRITONSERVER") or None, cache_dir=backend_cache)
    except TritonServerError as e:
        pytest.skip(f"no tritonserver: {e}")


def add_python_model(repo: Path, name: str, model_py: str, config: str) -> Path:
    """repo/<name>/{config.pbtxt, 1/model.py} from source text."""
    version = repo / name / "1"
    version.mkdir(parents=True)
    (version / "model.py").write_text(model_py)
    (repo / name / "config.pbtxt").write_text(config)
    return repo / name


@pytest.fixture(scope="session")
def prepost_repo(tmp_path_factory, tokenizer_json) -> Path:
    repo = tmp_path_factory.mktemp("repo") / "model_repo"
    for config in prepost_configs():
        add_tokenizer_model(repo, config, tokenizer_json)
    return repo


@pytest.fixture(scope="module")
def server(prepost_repo, install, tmp_path_factory):
    log = tmp_path_factory.mktemp("results") / "tritonserver.log"
    with TritonServer(prepost_repo, log, install=install, startup_timeout_s=180) as s:
        yield s
    assert log.is_file() and log.stat().st_size > 0


@pytest.fixture
def client(server):
    import tritonclient.http as httpclient

    c = httpclient.InferenceServerClient(server.http_url, concurrency=4)
    yield c
    c.close()


# -- helpers ----------------------------------------------------------------------------------------------------
def _tensor(httpclient, name, array, dtype):
    t = httpclient.InferInput(name, list(array.shape), dtype)
    t.set_data_from_numpy(array)
    return t


def preprocess_inputs(texts_or_bytes, out_len):
    import tritonclient.http as httpclient

    query = np.array([[t.encode("utf-8") if isinstance(t, str) else t] for t in texts_or_bytes], dtype=object)
    req_out = np.array([[n] for n in out_len], dtype=np.uint32)
    return [_tensor(httpclient, "QUERY", query, "BYTES"), _tensor(httpclient, "REQUEST_OUTPUT_LEN", req_out, "UINT32")]


def postprocess_inputs(tokens, seq_len, in_len):
    import tritonclient.http as httpclient

    return [
        _tensor(httpclient, "TOKENS_BATCH", np.asarray(tokens, dtype=np.uint32), "UINT32"),
        _tensor(httpclient, "SEQUENCE_LENGTH", np.asarray(seq_len, dtype=np.uint32), "UINT32"),
        _tensor(httpclient, "INPUT_LENGTHS", np.asarray(in_len, dtype=np.uint32).reshape(-1, 1), "UINT32"),
    ]


# -- find_tritonserver (no server started) ----------------------------------------------------------------------
def test_find_configured_missing_is_clear_error(tmp_path):
    with pytest.raises(TritonServerError, match="not an executable"):
        find_tritonserver(str(tmp_path / "nope" / "tritonserver"))


def test_find_prefers_configured_then_path(tmp_path, monkeypatch):
    root = tmp_path / "opt" / "tritonserver"
    (root / "bin").mkdir(parents=True)
    (root / "backends").mkdir()
    fake = root / "bin" / "tritonserver"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    got = find_tritonserver(str(root))  # an install root is accepted too
    assert (got.source, got.binary, got.backend_dir) == ("configured", fake, (root / "backends").resolve())
    monkeypatch.setenv("PATH", f"{root / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    got = find_tritonserver(None)
    assert got.source == "path" and got.binary == fake


def test_embedded_backend_dir_prepared_once(tmp_path, monkeypatch):
    pytest.importorskip("pytriton")
    monkeypatch.setenv("PATH", "/nonexistent")  # no tritonserver on PATH -> the wheel's binary
    first = find_tritonserver(None, cache_dir=tmp_path)
    assert first.source == "pytriton"
    assert (first.backend_dir / "python" / "triton_python_backend_stub").is_file()
    assert (first.backend_dir / "python" / "libtriton_python.so").is_file()
    stamp = (first.backend_dir / "python" / "triton_python_backend_stub").stat().st_mtime_ns
    second = find_tritonserver(None, cache_dir=tmp_path)
    assert second.backend_dir == first.backend_dir
    assert (second.backend_dir / "python" / "triton_python_backend_stub").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.backend_dir.name]  # no temp leftovers
    env = first.env({"PATH": "/usr/bin"}, Path("/venv/bin"))
    assert env["PATH"].split(os.pathsep)[0] == "/venv/bin"
    assert any(Path(d).name == "nvidia_pytriton.libs" for d in env["LD_LIBRARY_PATH"].split(os.pathsep))


# -- preprocessing / postprocessing on a real server -------------------------------------------------------------
@pytest.mark.triton
def test_server_urls_and_models_ready(server):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    assert server.running
    with httpclient.InferenceServerClient(server.http_url) as c:
        assert c.is_model_ready("preprocessing") and c.is_model_ready("postprocessing")
    g = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        assert g.is_server_ready()
    finally:
        g.close()


@pytest.mark.triton
def test_preprocessing_matches_reference_tokenizer(client, reference_tokenizer):
    out_len = [5, 1, 32, 7, 100]
    result = client.infer("preprocessing", preprocess_inputs(PROMPTS, out_len))
    ids, in_len, req_out = (result.as_numpy(n) for n in ("INPUT_ID", "REQUEST_INPUT_LEN", "REQUEST_OUTPUT_LEN"))
    assert ids.dtype == np.uint32 and in_len.dtype == np.uint32 and req_out.dtype == np.uint32
    expected = [reference_tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    assert ids.shape == (len(PROMPTS), max(len(e) for e in expected))
    assert in_len.shape == (len(PROMPTS), 1) and req_out.shape == (len(PROMPTS), 1)
    for b, exp in enumerate(expected):
        assert in_len[b, 0] == len(exp)
        assert ids[b, : len(exp)].tolist() == exp, PROMPTS[b]
        assert (ids[b, len(exp) :] == END_ID).all()  # right padding with end_id
    assert req_out[:, 0].tolist() == out_len


@pytest.mark.triton
@pytest.mark.parametrize(
    "bad, message",
    [("", "empty"), (b"\xff\xfe not utf-8", "utf-8")],
    ids=["empty", "not-utf8"],
)
def test_preprocessing_bad_request_fails_alone(client, bad, message):
    from tritonclient.utils import InferenceServerException

    # Sent together so the dynamic batcher may hand both to one execute(); the good one must still succeed.
    bad_req = client.async_infer("preprocessing", preprocess_inputs([bad], [4]))
    good_req = client.async_infer("preprocessing", preprocess_inputs(["Hello world"], [4]))
    with pytest.raises(InferenceServerException, match=message):
        bad_req.get_result()
    assert good_req.get_result().as_numpy("INPUT_ID").tolist() == [[15496, 995]]


@pytest.mark.triton
def test_postprocessing_returns_generated_text_only(client, reference_tokenizer):
    prompts = ["The capital of France is", "Once upon a time"]
    gens = [[[6342, 13, 632], [257, 1402, 1748, 13]], [[11, 612, 373, END_ID], [262]]]
    prompt_ids = [reference_tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    t_max = max(len(p) + len(g) for p, row in zip(prompt_ids, gens) for g in row) + 3
    tokens = np.full((2, 2, t_max), END_ID, dtype=np.uint32)
    seq_len = np.zeros((2, 2), dtype=np.uint32)
    for b, (p, row) in enumerate(zip(prompt_ids, gens)):
        for k, g in enumerate(row):
            tokens[b, k, : len(p) + len(g)] = p + g
            seq_len[b, k] = len(p) + len(g)  # an emitted end_id counts in sequence_length
    result = client.infer("postprocessing", postprocess_inputs(tokens, seq_len, [len(p) for p in prompt_ids]))
    out = result.as_numpy("OUTPUT")
    assert out.shape == (2, 2)
    for b, row in enumerate(gens):
        for k, g in enumerate(row):
            text_ids = [t for t in g if t != END_ID]
            assert out[b, k].decode("utf-8") == reference_tokenizer.decode(text_ids), (b, k)
            assert prompts[b] not in out[b, k].decode("utf-8")
    assert out[1, 0].decode() == reference_tokenizer.decode([11, 612, 373])  # end token stripped


@pytest.mark.triton
def test_postprocessing_empty_generation_is_empty_string(client):
    tokens = np.array([[[15496, 995, END_ID]]], dtype=np.uint32)
    out = client.infer("postprocessing", postprocess_inputs(tokens, [[2]], [2])).as_numpy("OUTPUT")
    assert out.tolist() == [[b""]]


@pytest.mark.triton
@pytest.mark.parametrize(
    "tokens, seq_len, in_len, message",
    [
        ([[[15496, 995, 11]]], [[5]], [1], "sequence_length"),  # longer than T
        ([[[15496, 995, 11]]], [[1]], [2], "input_length"),  # shorter than the prompt
    ],
    ids=["seq-too-long", "seq-before-prompt"],
)
def test_postprocessing_bad_request_fails_alone(client, tokens, seq_len, in_len, message):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match=message):
        client.infer("postprocessing", postprocess_inputs(tokens, seq_len, in_len))
    good = client.infer("postprocessing", postprocess_inputs([[[15496, 995]]], [[2]], [1]))
    assert good.as_numpy("OUTPUT").tolist() == [[b" world"]]


@pytest.mark.triton
def test_postprocessing_drops_an_id_outside_the_vocabulary(client, reference_tokenizer):
    """Regression: an id the tokenizer cannot decode (a padded vocabulary row) failed the whole request with
    "outside the vocabulary"; it has no text and is left out."""
    out = client.infer("postprocessing", postprocess_inputs([[[15496, 999999, 995]]], [[3]], [0]))
    assert out.as_numpy("OUTPUT").tolist() == [[reference_tokenizer.decode([15496, 995]).encode()]]


# -- lifecycle ---------------------------------------------------------------------------------------------------
def _assert_stopped(pid: int, ports: list[int]) -> None:
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped: not even a zombie
    assert not process_group_alive(pid)  # python backend stubs (same process group) gone too
    for port in ports:
        assert port_is_free(port), port


@pytest.mark.triton
@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_server_stopped_when_body_raises(prepost_repo, install, tmp_path, exc):
    log = tmp_path / "tritonserver.log"
    with pytest.raises(exc, match="boom"):
        with TritonServer(prepost_repo, log, install=install) as s:
            pid, ports = s.process.pid, [s.http_port, s.grpc_port, s.metrics_port]
            raise exc("boom")
    assert not s.running and s.process is None
    _assert_stopped(pid, ports)
    assert "successfully loaded 'preprocessing'" in log.read_text()


@pytest.mark.triton
def test_stop_cleans_up_after_killed_server(prepost_repo, install, tmp_path):
    import signal

    with TritonServer(prepost_repo, tmp_path / "tritonserver.log", install=install) as s:
        pid, ports, prefix = s.process.pid, [s.http_port, s.grpc_port, s.metrics_port], s._shm_prefix()
        assert list(Path("/dev/shm").glob(prefix + "*"))  # the python stubs' regions
        os.kill(pid, signal.SIGKILL)  # stubs outlive a SIGKILLed server; stop() must reap them
    _assert_stopped(pid, ports)
    assert not list(Path("/dev/shm").glob(prefix + "*"))


@pytest.mark.triton
def test_port_taken_meanwhile_is_retried(prepost_repo, install, tmp_path, monkeypatch):
    import socket

    import exporter.serve.tritonserver as ts

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy = taken.getsockname()[1]
    real_free_port, calls = ts.free_port, []

    def racy_free_port(host="127.0.0.1"):  # the first pick gets taken by "someone else" before the server binds
        calls.append(host)
        return busy if len(calls) == 1 else real_free_port(host)

    monkeypatch.setattr(ts, "free_port", racy_free_port)
    try:
        with TritonServer(prepost_repo, tmp_path / "tritonserver.log", install=install) as s:
            assert s.running and busy not in (s.http_port, s.grpc_port, s.metrics_port)
    finally:
        taken.close()
    assert "already in use" in (tmp_path / "tritonserver.log").read_text()



@pytest.mark.triton
def test_spawn_returns_at_once_and_wait_ready_waits(prepost_repo, install, tmp_path):
    """What the accuracy sub-stage relies on to load its reference while the server starts."""
    import tritonclient.http as httpclient

    server = TritonServer(prepost_repo, tmp_path / "tritonserver.log", install=install)
    try:
        assert server.spawn() is server
        assert server.process is not None and server.process.poll() is None  # running, not waited for
        client = httpclient.InferenceServerClient(server.http_url)
        try:
            ready_at_once = client.is_server_ready()
        except Exception:  # not listening yet
            ready_at_once = False
        assert not ready_at_once  # models take seconds to load: spawn() did not wait for them
        assert server.wait_ready() is server and server.running
        assert client.is_model_ready("preprocessing") and client.is_model_ready("postprocessing")
        client.close()
    finally:
        server.stop()
    _assert_stopped(server.last_pid, [server.http_port, server.grpc_port, server.metrics_port])


@pytest.mark.triton
def test_interrupted_wait_ready_stops_the_spawned_server(prepost_repo, install, tmp_path, monkeypatch):
    server = TritonServer(prepost_repo, tmp_path / "tritonserver.log", install=install)
    server.spawn()
    pid = server.process.pid

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(server, "_wait_ready", interrupted)
    with pytest.raises(KeyboardInterrupt):
        server.wait_ready()
    assert server.process is None
    _assert_stopped(pid, [server.http_port, server.grpc_port, server.metrics_port])

BROKEN_MODEL = textwrap.dedent(
    """
    class TritonPythonModel:
        def initialize(self, args):
            raise RuntimeError("tokenizer exploded: marker-7f3a")

        def execute(self, requests):
            return []
    """
)

BROKEN_CONFIG = """
name: "broken"
backend: "python"
max_batch_size: 4
input [ { name: "X" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ -1 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""


@pytest.mark.triton
@pytest.mark.parametrize("extra_args", [[], ["--exit-on-error=false"]], ids=["server-exits", "server-stays-up"])
def test_broken_model_fails_startup_with_its_error(tmp_path, install, tokenizer_json, extra_args):
    repo = tmp_path / "repo"
    add_tokenizer_model(repo, prepost_configs()[1], tokenizer_json)
    add_python_model(repo, "broken", BROKEN_MODEL, BROKEN_CONFIG)
    server = TritonServer(
        repo, tmp_path / "tritonserver.log", install=install, startup_timeout_s=180, extra_args=extra_args
    )
    with pytest.raises(TritonServerError) as info:
        with server:
            pytest.fail("server must not come up with a broken model")
    message = str(info.value)
    assert "marker-7f3a" in message and "broken" in message
    assert server.process is None
    _assert_stopped(server.last_pid, [server.http_port, server.grpc_port, server.metrics_port])


@pytest.mark.triton
@pytest.mark.parametrize("timeout_s", [0.0, 0.5], ids=["at-once", "while-loading"])
def test_startup_timeout_stops_server(prepost_repo, install, tmp_path, timeout_s):
    # 0.0: SIGTERM lands before the server installs its handlers; its stubs are orphaned and must still go.
    server = TritonServer(prepost_repo, tmp_path / "tritonserver.log", install=install, startup_timeout_s=timeout_s)
    with pytest.raises(TritonServerError, match="not ready after"):
        server.start()
    assert server.process is None
    _assert_stopped(server.last_pid, [server.http_port, server.grpc_port, server.metrics_port])
