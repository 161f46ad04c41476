"""A loopback stand-in for the routes of a vLLM server that ``vllm-lora sync`` calls, for what a
real server cannot be made to do on demand: answer oddly (an HTML error page, a redirect, metrics
that do not parse) or lose the answer of a switch it made.

It resolves ``/tokenize`` names through a real `Resolver` of ours, as the server's resolver
would: ``None`` answers 404, a refused version 400 (vLLM's answers). What the sync does against a
real server is tested in ``test_e2e_rollout.py``::

    with FakeVllmServer(server_resolver) as server:
        server.adapters["sql"] = str(server_resolver.resolve(BASE_MODEL, "sql").path)
        sync = AdapterSync(VllmServerApi(server.url), ...)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from conftest import BASE_MODEL

from devtools.loopback import ThreadedHttpServer
from vllm_lora_resolvers.errors import InvalidAdapterError
from vllm_lora_resolvers.resolver import Resolver


@dataclass(frozen=True)
class Answer:
    """What the server answers a route instead of its own answer."""

    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = (("Content-Type", "application/json"),)


@dataclass(frozen=True)
class Received:
    """A request the server received."""

    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


class FakeVllmServer(ThreadedHttpServer[ThreadingHTTPServer]):
    """``http://127.0.0.1:PORT``, a context manager. `adapters` is what it holds (name -> path),
    `in_flight` the requests its ``/metrics`` reports running, `answers` the routes
    (``"GET /metrics"``) it answers as scripted; `tokenize_status`, when set, is what
    ``/tokenize`` answers after resolving the name (the server switched, the answer is lost);
    `on_tokenize(name)`, when set, runs before ``/tokenize`` resolves (a busy server's slow
    switch)."""

    def __init__(self, resolver: Resolver | None = None) -> None:
        self.resolver = resolver
        self.adapters: dict[str, str] = {}
        self.in_flight = 0
        self.answers: dict[str, Answer] = {}
        self.tokenize_status: int | None = None
        self.on_tokenize: Callable[[str], None] | None = None
        self.received: list[Received] = []
        super().__init__(ThreadingHTTPServer, self._handler())

    def routes_called(self) -> list[str]:
        """``"METHOD /path"`` of every request received, in order."""
        return [f"{request.method} {request.path}" for request in self.received]

    def answer(self, method: str, path: str, body: dict[str, Any]) -> Answer:
        """The answer to one request: the scripted one, else vLLM's."""
        scripted = self.answers.get(f"{method} {path}")
        if scripted is not None:
            return scripted
        if (method, path) == ("GET", "/v1/models"):
            cards = [{"id": BASE_MODEL, "root": BASE_MODEL, "parent": None}]
            cards += [
                {"id": name, "root": root, "parent": BASE_MODEL}
                for name, root in self.adapters.items()
            ]
            return Answer(200, json.dumps({"object": "list", "data": cards}).encode())
        if (method, path) == ("GET", "/metrics"):
            lines = [
                "# TYPE vllm:num_requests_running gauge",
                f'vllm:num_requests_running{{model_name="{BASE_MODEL}"}} {self.in_flight}',
                "# TYPE vllm:num_requests_waiting gauge",
                f'vllm:num_requests_waiting{{model_name="{BASE_MODEL}"}} 0',
            ]
            return Answer(200, "\n".join(lines).encode() + b"\n", (("Content-Type", "text/plain"),))
        if (method, path) == ("POST", "/v1/unload_lora_adapter"):
            return Answer(200 if self.adapters.pop(body["lora_name"], None) else 404)
        if (method, path) == ("POST", "/v1/load_lora_adapter"):
            self.adapters[body["lora_name"]] = body["lora_path"]
            return Answer(200)
        if (method, path) == ("POST", "/tokenize"):
            if self.on_tokenize is not None:
                self.on_tokenize(body["model"])
            status = self._resolve(body["model"])
            return Answer(self.tokenize_status or status)
        return Answer(404)

    def _resolve(self, name: str) -> int:
        if name in self.adapters:
            return 200
        if self.resolver is None:
            return 404
        try:
            resolved = self.resolver.resolve(BASE_MODEL, name)
        except InvalidAdapterError:
            return 400
        if resolved is None:
            return 404
        self.adapters[name] = str(resolved.path)
        return 200

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._answer()

            def do_POST(self) -> None:
                self._answer()

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else {}
                server.received.append(
                    Received(self.command, self.path, dict(self.headers.items()), body)
                )
                answer = server.answer(self.command, self.path, body)
                self.send_response(answer.status)
                for header, value in answer.headers:
                    self.send_header(header, value)
                self.send_header("Content-Length", str(len(answer.body)))
                self.end_headers()
                self.wfile.write(answer.body)

        return Handler
