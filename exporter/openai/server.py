"""`ft-exporter-openai`: the OpenAI API (/v1/models, /v1/completions, /v1/chat/completions) over a served repository.

A stdlib ThreadingHTTPServer (one thread per connection); streamed answers are server-sent events ending with
`data: [DONE]`. Every failure is an OpenAI-style error body with its status; the server keeps serving.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from . import protocol
from .backend import ModelFiles, TritonBackend, choices, tokenizer_directory
from .protocol import OpenAIError

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 16 << 20
ROUTES = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}


class OpenAIServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, backend: TritonBackend, served_name: str):
        super().__init__(address, Handler)
        self.backend, self.served_name, self.created = backend, served_name, int(time.time())

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"


class Handler(BaseHTTPRequestHandler):
    server: OpenAIServer

    def log_message(self, format, *args):  # the stdlib writes every request to stderr; keep it at debug
        log.debug("%s " + format, self.address_string(), *args)

    def _send_json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, error: OpenAIError) -> None:
        self._send_json(error.status, error.body())

    def do_GET(self):
        path = self.path.split("?")[0].rstrip("/")
        if path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [self._model_card()]})
        elif path == f"/v1/models/{self.server.served_name}":
            self._send_json(200, self._model_card())
        elif path.startswith("/v1/models/"):
            self._send_error(OpenAIError(404, f"The model `{path[len('/v1/models/'):]}` does not exist", "model",
                                         "model_not_found"))
        elif path in ("/health", "/v1/health"):
            self._send_json(200, {"status": "ok"})
        else:
            self._send_error(OpenAIError(404, f"no route {self.path}", code="not_found"))

    def _model_card(self) -> dict:
        return {"id": self.server.served_name, "object": "model", "created": self.server.created,
                "owned_by": "ft-exporter"}

    def do_POST(self):
        path = self.path.split("?")[0].rstrip("/")
        kind = ROUTES.get(path)
        if kind is None:
            self._send_error(OpenAIError(404, f"no route POST {self.path}", code="not_found"))
            return
        try:
            request = protocol.parse(kind, self._json_body(), {self.server.served_name})
            if request.stream:
                self._stream(request)
            else:
                self._answer(request)
        except OpenAIError as error:
            self._send_error(error)
        except (BrokenPipeError, ConnectionResetError):  # the client left mid-answer (a dropped stream)
            log.info("client %s disconnected", self.address_string())
        except Exception as error:  # a bug must not take the server down: answer it and log it
            log.exception("request failed")
            self._send_error(OpenAIError(500, f"internal error: {type(error).__name__}: {error}",
                                         error_type="server_error"))

    def _json_body(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            raise OpenAIError(413, f"request body over {MAX_BODY_BYTES} bytes")
        try:
            return json.loads(self.rfile.read(length) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise protocol.bad_request(f"the body is not valid JSON: {error}") from None

    def _answer(self, request: protocol.GenerationRequest) -> None:
        backend = self.server.backend
        prompts = backend.prompt_ids(request)
        rows = backend.generate(request, prompts)
        prompt_tokens = sum(map(len, prompts))
        body = protocol.response_body(request, protocol.response_id(request.kind), choices(rows), prompt_tokens)
        self._send_json(200, body)

    def _stream(self, request: protocol.GenerationRequest) -> None:
        backend = self.server.backend
        prompts = backend.prompt_ids(request)  # refused (a plain error response) before the stream starts
        backend.check(request, prompts)
        identifier = protocol.response_id(request.kind)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        lock = threading.Lock()

        def event(body) -> None:
            with lock:
                data = body if isinstance(body, str) else json.dumps(body)
                self.wfile.write(f"data: {data}\n\n".encode("utf-8"))
                self.wfile.flush()

        if request.kind == "chat":
            for index in range(len(prompts) * request.n):
                event(protocol.chunk_body(request, identifier, index, None, None, role=True))
        try:
            rows = backend.generate(request, prompts, on_delta=lambda row, delta: event(
                protocol.chunk_body(request, identifier, row.index, delta, row.finish_reason)))
        except OpenAIError as error:  # the status is sent: the error goes in the stream, as OpenAI does
            event(error.body())
        else:
            if request.include_usage:
                event(protocol.usage_chunk(request, identifier, sum(map(len, prompts)),
                                           sum(row.tokens for row in rows)))
        event("[DONE]")


def make_server(repository: Path, http_url: str, model: str | None, *, host: str = "127.0.0.1", port: int = 8080,
                grpc_url: str | None = None, stream_model: str | None = None,
                served_name: str | None = None) -> OpenAIServer:
    """A bound (not yet serving) server; the model's max_batch_size comes from the running tritonserver.

    model None: only `stream_model` (a decoupled export) is served, and answers plain requests too."""
    import tritonclient.http as http

    name = model or stream_model
    if name is None:
        raise ValueError("give the plain model, the decoupled stream model, or both")
    files = ModelFiles.load(tokenizer_directory(Path(repository), name))
    client = http.InferenceServerClient(http_url)
    try:
        max_batch_size = int(client.get_model_config(name).get("max_batch_size", 1)) or 1
    finally:
        client.close()
    backend = TritonBackend(files, http_url, model, max_batch_size, grpc_url, stream_model)
    return OpenAIServer((host, port), backend, served_name or name)


def serve(server: OpenAIServer) -> None:
    """Serve until interrupted (Ctrl-C, or the job's end), then close the socket."""
    log.info("OpenAI API on %s (model %s)", server.url, server.served_name)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ft-exporter-openai", description=__doc__.splitlines()[0])
    parser.add_argument("repository", type=Path, help="the model repository tritonserver serves (model_repo/)")
    parser.add_argument("--triton-url", default="127.0.0.1:8000", help="tritonserver's HTTP host:port")
    parser.add_argument("--triton-grpc-url", default="127.0.0.1:8001",
                        help="tritonserver's gRPC host:port (streaming through --stream-model)")
    parser.add_argument("--model", default="gpt2",
                        help="the Triton model answering FT's tensor interface (\"\": none, --stream-model only)")
    parser.add_argument("--stream-model", default=None,
                        help="a decoupled export of the same model for token-by-token streaming (absent: a streamed "
                             "request gets its whole text in one chunk)")
    parser.add_argument("--served-model-name", default=None, help="the OpenAI model id (default: --model)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = make_server(args.repository, args.triton_url, args.model or None, host=args.host, port=args.port,
                         grpc_url=args.triton_grpc_url, stream_model=args.stream_model,
                         served_name=args.served_model_name)
    serve(server)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
