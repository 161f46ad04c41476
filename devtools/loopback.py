"""What the loopback servers of devtools share: a lifecycle as a context manager (`Server`), a
threaded `http.server` (`ThreadedHttpServer`), an emulator subprocess (`Emulator`), free ports."""

from __future__ import annotations

import socket
import subprocess
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from http.server import ThreadingHTTPServer
from socketserver import BaseRequestHandler
from types import TracebackType
from typing import IO, ClassVar, Generic, Self, TypeVar

_HttpServer = TypeVar("_HttpServer", bound=ThreadingHTTPServer)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Server(ABC):
    """A server used as a context manager: entering starts it, leaving stops it."""

    @abstractmethod
    def start(self) -> None:
        """Start the server; return once it answers."""

    @abstractmethod
    def stop(self) -> None:
        """Stop the server and free what it holds."""

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class ThreadedHttpServer(Server, Generic[_HttpServer]):
    """An `http.server` (``server_class``, answering with ``handler``) on 127.0.0.1:``port``
    (0: a free one, bound at once), served by a thread of its own between start and stop."""

    def __init__(
        self,
        server_class: type[_HttpServer],
        handler: Callable[..., BaseRequestHandler],
        port: int = 0,
    ) -> None:
        self._server = server_class(("127.0.0.1", port), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,))

    @property
    def port(self) -> int:
        """The port the server listens on."""
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


class Emulator(Server):
    """A storage emulator program on a free port of 127.0.0.1, keeping its data in memory: started,
    it is asked whether it answers until it does; stopped, it is killed (nothing to flush)."""

    #: The program's name, in the error raised when it does not start.
    name: ClassVar[str]

    def __init__(self, startup_timeout: float) -> None:
        self.port = free_port()
        self.startup_timeout = startup_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @abstractmethod
    def _launch(self, log: IO[bytes]) -> subprocess.Popen[bytes]:
        """Start the program, its log going to ``log``."""

    @abstractmethod
    def _answers(self) -> bool:
        """Whether the program answers requests yet."""

    def start(self) -> None:
        """Start the program; ``RuntimeError`` (with its log's end) if it exits or does not answer
        within ``startup_timeout`` seconds."""
        # Its log goes to a file: a pipe nobody reads fills up after a few hundred requests, and
        # then every request blocks on the server's write of its log line.
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - closed by stop()
        self._process = self._launch(self._log)
        deadline = time.monotonic() + self.startup_timeout
        while not self._answers():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self._log.seek(0)
                error = self._log.read().decode(errors="replace")
                self.stop()
                raise RuntimeError(f"{self.name} did not start: {error[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self._process is not None:
            self._process.kill()  # Azurite ignores SIGTERM for seconds
            self._process.wait()
            self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None
