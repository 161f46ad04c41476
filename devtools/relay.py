"""A fault-injecting HTTP/1.1 relay for tests, placed between a client and a server on 127.0.0.1.

Bytes pass unchanged, so SigV4 signatures stay valid. The relay parses just enough HTTP/1.1 to
count requests and to find where each response body starts and ends (Content-Length, chunked or
until EOF; keep-alive with many requests per connection; ``100 Continue``). With that it can
answer an error status instead of the server, delay a request, cut a response body after N
bytes with a reset (RST) or a clean close (FIN, i.e. a truncated body), flip a bit of one byte of
a body (same size, other content: what only a checksum catches), or pad a body with N more bytes
(a store sending more than it declared).

It can also drop request headers before the server sees them (``drop_request_headers``): then the
server behaves as one that ignores them. That breaks the signature of a signed header, so only a
server that does not check signatures (moto) can sit behind such a relay.

It runs its own asyncio loop in its own thread, so it works under synchronous clients (boto3)::

    with FaultRelay(upstream_port) as relay:
        relay.add_fault(Fault("status", method="GET", times=2))
        client = S3Endpoint(relay.url, ...).client()
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import http
import re
import socket
import struct
import termios
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal
from xml.sax.saxutils import escape

from devtools.loopback import Server

_HEAD_LIMIT = 1 << 20
_PIECE = 1 << 16
_ERRORS = (OSError, EOFError, asyncio.LimitOverrunError, ValueError)
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[^\r]*", re.IGNORECASE)


@dataclass(frozen=True)
class Fault:
    """A fault rule, applied to the first ``times`` requests it matches and then no more.

    A request matches when every criterion given holds: ``method`` (exact), ``path_contains``
    (substring of the path with query) and ``match(method, path_with_query)``.

    Kinds:
      - ``status``: answer ``status`` with an S3-style XML error (``code``) and
        ``Connection: close``, without contacting upstream;
      - ``reset_after`` / ``close_after``: forward the request; once ``after_bytes`` bytes of the
        response body (raw, chunk framing included) reached the client, reset the connection
        (RST) or close it cleanly (FIN, a truncated body);
      - ``delay``: wait ``seconds`` before forwarding the request;
      - ``corrupt_at``: forward the request and the whole response, with one bit of the response
        body's byte at offset ``after_bytes`` flipped (bodies shorter than that pass unchanged);
      - ``pad``: forward the request and the whole response, followed by ``extra_bytes`` zero
        bytes its ``Content-Length`` counts (a body without one passes unchanged).
    """

    kind: Literal["status", "reset_after", "close_after", "delay", "corrupt_at", "pad"]
    method: str | None = None
    path_contains: str | None = None
    match: Callable[[str, str], bool] | None = None
    times: int = 1
    status: int = 503
    code: str = "SlowDown"
    after_bytes: int = 0
    extra_bytes: int = 0
    seconds: float = 0.0

    def matches(self, method: str, path: str) -> bool:
        """Whether a request with this method and path (with query) matches the rule."""
        return (
            (self.method is None or method == self.method)
            and (self.path_contains is None or self.path_contains in path)
            and (self.match is None or self.match(method, path))
        )


@dataclass
class _Rule:
    fault: Fault
    left: int


class FaultLedger:
    """What a faultable server counts and which faults it injects: the requests it received, the
    body bytes it sent, and the fault rules. Thread-safe; shared by `FaultRelay` and the in-memory
    store (devtools/memory_store.py)."""

    def __init__(self) -> None:
        self._ledger_lock = threading.Lock()
        self._requests: list[tuple[str, str]] = []
        self._body_bytes = 0
        self._rules: list[_Rule] = []

    @property
    def requests(self) -> list[tuple[str, str]]:
        """(method, path with query) of every request received so far, faulted ones included."""
        with self._ledger_lock:
            return list(self._requests)

    @property
    def response_body_bytes(self) -> int:
        """Response body bytes sent to clients (injected error bodies excluded)."""
        with self._ledger_lock:
            return self._body_bytes

    def reset_counters(self) -> None:
        """Forget the requests seen and the bytes sent."""
        with self._ledger_lock:
            self._requests.clear()
            self._body_bytes = 0

    def add_fault(self, fault: Fault) -> None:
        """Add a rule; the earliest added rule that matches a request applies to it."""
        with self._ledger_lock:
            self._rules.append(_Rule(fault, fault.times))

    def clear_faults(self) -> None:
        """Drop every rule."""
        with self._ledger_lock:
            self._rules.clear()

    def count_body_bytes(self, count: int) -> None:
        """Count ``count`` more body bytes sent (before the client can see them)."""
        with self._ledger_lock:
            self._body_bytes += count

    def take_fault(self, method: str, path: str) -> Fault | None:
        """Count a request; the fault of the earliest rule it matches that has uses left."""
        with self._ledger_lock:
            self._requests.append((method, path))
            for rule in self._rules:
                if rule.left > 0 and rule.fault.matches(method, path):
                    rule.left -= 1
                    return rule.fault
        return None


class FaultRelay(FaultLedger, Server):
    """Relay 127.0.0.1:``port`` to 127.0.0.1:``upstream_port``, counting requests, injecting faults.

    Counters and rules are thread-safe and can change while clients are connected. A context
    manager: the listening socket, every connection and the thread end on exit.
    """

    def __init__(
        self, upstream_port: int, *, drop_request_headers: frozenset[str] = frozenset()
    ) -> None:
        super().__init__()
        self.upstream_port = upstream_port
        #: Lower-case names of the request headers never forwarded upstream.
        self.drop_request_headers = drop_request_headers
        self.port = 0
        self._connections = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="FaultRelay")
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._responses_in_flight = 0
        self._response_ended = threading.Condition()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` of the relay."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def connections(self) -> int:
        """Client connections the relay accepted since it started."""
        return self._connections

    def settle(self, timeout: float = 10.0) -> None:
        """Wait until every response the relay began is relayed, or abandoned by its client, so
        that `response_body_bytes` counts all it will send; `TimeoutError` after ``timeout`` s."""
        with self._response_ended:
            if not self._response_ended.wait_for(lambda: self._responses_in_flight == 0, timeout):
                raise TimeoutError(f"{self._responses_in_flight} responses still being relayed")

    @contextlib.contextmanager
    def _relaying_a_response(self) -> Iterator[None]:
        with self._response_ended:
            self._responses_in_flight += 1
        try:
            yield
        finally:
            with self._response_ended:
                self._responses_in_flight -= 1
                self._response_ended.notify_all()

    def start(self) -> None:
        self._thread.start()
        start = asyncio.start_server(self._serve, "127.0.0.1", 0, limit=_HEAD_LIMIT)
        self._server = asyncio.run_coroutine_threadsafe(start, self._loop).result()
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        """Close the listening socket and every connection, then end the loop and its thread."""
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        self._loop.close()

    async def _close(self) -> None:
        assert self._server is not None
        self._server.close()
        while self._tasks:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def _track(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Relay one client connection, request by request."""
        task = asyncio.current_task()
        assert task is not None
        self._track(task)
        self._connections += 1
        upstream: asyncio.StreamWriter | None = None
        responses: asyncio.Task[None] | None = None
        pending: deque[tuple[str, Fault | None]] = deque()
        try:
            while (message := await _read_head(reader)) is not None:
                head, request_line, headers = message
                method, path, _ = request_line.split(" ", 2)
                fault = self.take_fault(method, path)
                if fault is not None and fault.kind == "status":
                    await _answer_error(reader, writer, fault, method, path)
                    return
                if fault is not None and fault.kind == "delay":
                    await asyncio.sleep(fault.seconds)
                if upstream is None:
                    upstream_reader, upstream = await asyncio.open_connection(
                        "127.0.0.1", self.upstream_port, limit=_HEAD_LIMIT
                    )
                    responses = asyncio.create_task(
                        self._relay_responses(upstream_reader, writer, pending)
                    )
                    self._track(responses)
                pending.append((method, fault))
                upstream.write(_without_headers(head, self.drop_request_headers))
                async for piece in _body(reader, headers, until_eof=False):
                    upstream.write(piece)
                    await upstream.drain()
                await upstream.drain()
        except _ERRORS:
            pass
        except asyncio.CancelledError:
            pass  # shutdown; ending normally stops Python 3.11's start_server logging the cancel
        finally:  # no await here: a cancel at shutdown would skip the rest
            writer.close()
            if upstream is not None:
                upstream.close()
            if responses is not None:
                responses.cancel()

    async def _relay_responses(
        self,
        upstream: asyncio.StreamReader,
        client: asyncio.StreamWriter,
        pending: deque[tuple[str, Fault | None]],
    ) -> None:
        """Relay upstream's responses to the client, cutting, damaging or padding bodies as
        faults say."""
        try:
            while (message := await _read_head(upstream)) is not None:
                head, status_line, _ = message
                status = int(status_line.split(" ", 2)[1])
                if status < 200:  # 100 Continue: the final response follows
                    client.write(head)
                    await client.drain()
                    continue
                method, fault = pending.popleft() if pending else ("", None)
                with self._relaying_a_response():
                    if not await self._relay_response(upstream, client, message, method, fault):
                        return
        except _ERRORS:
            pass
        finally:
            client.close()  # the client must not send more to a dead upstream connection

    async def _relay_response(
        self,
        upstream: asyncio.StreamReader,
        client: asyncio.StreamWriter,
        message: tuple[bytes, str, dict[str, str]],
        method: str,
        fault: Fault | None,
    ) -> bool:
        """Relay one final response (its head already read), as ``fault`` says; whether the
        connection goes on."""
        head, status_line, headers = message
        status = int(status_line.split(" ", 2)[1])
        bodiless = method == "HEAD" or status in (204, 304)
        padding = 0
        if fault is not None and fault.kind == "pad" and not bodiless:
            padding = fault.extra_bytes if "content-length" in headers else 0
        if padding:
            length = int(headers["content-length"]) + padding
            head = _CONTENT_LENGTH.sub(b"\r\nContent-Length: %d" % length, head, count=1)
        client.write(head)
        await client.drain()
        if bodiless:
            return True
        cut = fault if fault is not None and fault.kind.endswith("_after") else None
        corrupt = fault if fault is not None and fault.kind == "corrupt_at" else None
        sent = 0
        async with contextlib.aclosing(_body(upstream, headers, until_eof=True)) as body:
            async for piece in body:
                if cut is not None:
                    piece = piece[: cut.after_bytes - sent]  # noqa: PLW2901
                if corrupt is not None and 0 <= corrupt.after_bytes - sent < len(piece):
                    piece = _flip_bit(piece, corrupt.after_bytes - sent)  # noqa: PLW2901
                self.count_body_bytes(len(piece))
                client.write(piece)
                await client.drain()
                sent += len(piece)
                if cut is not None and sent >= cut.after_bytes:
                    await _cut(client, reset=cut.kind == "reset_after")
                    return False
        for offset in range(0, padding, _PIECE):
            piece = bytes(min(_PIECE, padding - offset))
            self.count_body_bytes(len(piece))
            client.write(piece)
            await client.drain()
        return True


def _without_headers(head: bytes, dropped: frozenset[str]) -> bytes:
    """A message head without the header lines named in ``dropped`` (lower-case names)."""
    if not dropped:
        return head
    kept = [
        line
        for line in head.split(b"\r\n")
        if line.partition(b":")[0].strip().lower().decode("latin-1") not in dropped
    ]
    return b"\r\n".join(kept)


def _flip_bit(piece: bytes, offset: int) -> bytes:
    """``piece`` with the lowest bit of its byte at ``offset`` flipped."""
    return piece[:offset] + bytes([piece[offset] ^ 1]) + piece[offset + 1 :]


async def _read_head(reader: asyncio.StreamReader) -> tuple[bytes, str, dict[str, str]] | None:
    """One message head: (raw bytes, start line, lower-cased headers); None at a clean EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        if e.partial:
            raise
        return None
    start_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return head, start_line, headers


async def _body(
    reader: asyncio.StreamReader, headers: dict[str, str], *, until_eof: bool
) -> AsyncGenerator[bytes, None]:
    """A message body's raw bytes (chunk framing included), piece by piece.

    Without Content-Length or chunked encoding a request has no body, a response runs to EOF.
    """
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            line = await reader.readuntil(b"\r\n")
            yield line
            size = int(line.split(b";", 1)[0], 16)
            if size == 0:
                break
            async for piece in _exactly(reader, size + 2):
                yield piece
        while line != b"\r\n":  # trailer fields, then the empty line
            line = await reader.readuntil(b"\r\n")
            yield line
    elif "content-length" in headers:
        async for piece in _exactly(reader, int(headers["content-length"])):
            yield piece
    elif until_eof:
        while piece := await reader.read(_PIECE):
            yield piece


async def _exactly(reader: asyncio.StreamReader, size: int) -> AsyncIterator[bytes]:
    while size > 0:
        piece = await reader.read(min(size, _PIECE))
        if not piece:
            raise asyncio.IncompleteReadError(b"", size)
        size -= len(piece)
        yield piece


async def _answer_error(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, fault: Fault, method: str, path: str
) -> None:
    """Answer an S3-style error and close, as a server that rejects a request would."""
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{escape(fault.code)}</Code><Message>Injected by FaultRelay</Message>"
        f"<Resource>{escape(path)}</Resource><RequestId>FAULTRELAY</RequestId></Error>"
    ).encode()
    head = (
        f"HTTP/1.1 {fault.status} {http.HTTPStatus(fault.status).phrase}\r\n"
        f"Content-Type: application/xml\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    writer.write(head if method == "HEAD" else head + body)
    await writer.drain()
    writer.write_eof()
    # Lingering close: take whatever the client still sends (a request body) until it hangs up,
    # so that closing does not reset the connection before the client read the answer.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(5):
            while await reader.read(_PIECE):
                pass


async def _cut(writer: asyncio.StreamWriter, *, reset: bool) -> None:
    """Close the client connection: cleanly (FIN), or with a reset once what was sent arrived."""
    if not reset:
        writer.close()
        return
    sock = writer.get_extra_info("socket")
    deadline = time.monotonic() + 2
    while _unsent_bytes(sock) and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _unsent_bytes(sock: Any) -> int:
    """Bytes still in the socket's send queue (not yet acknowledged by the peer)."""
    queued: int = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
    return queued
