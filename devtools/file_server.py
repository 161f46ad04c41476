"""A loopback HTTP file server that answers as nginx does: ``HEAD`` with ``Content-Length`` and an
``ETag``, ``GET`` with single ``Range`` requests (206), ``If-Match`` (412 when the file changed),
and an HTML index of each folder; or, with ``ranges=False``, as a server that ignores ``Range``
(200 and the whole file, as Python's own). It serves the HTTP store
(`vllm_lora_resolvers.backends.http`) in the tests::

    with FileServer(root) as server:
        resolver = Resolver(HttpStore(server.url, settings, cache))
"""

from __future__ import annotations

import os
import re
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from devtools.loopback import ThreadedHttpServer


def etag_of(status: os.stat_result) -> str:
    """A strong ETag that changes whenever the file is replaced or rewritten (as nginx's)."""
    return f'"{status.st_ino:x}-{status.st_mtime_ns:x}-{status.st_size:x}"'


class _Handler(SimpleHTTPRequestHandler):
    server: _Server
    # As a real server: a body sent after its headers does not wait for the client's delayed
    # ACK of them (Nagle's algorithm), which cost every small answer 40 ms.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def end_headers(self) -> None:
        path = Path(self.translate_path(self.path))
        if path.is_file():
            self.send_header("ETag", etag_of(path.stat()))
        super().end_headers()

    def do_HEAD(self) -> None:
        self.server.requests.append(("HEAD", self.path, None))
        super().do_HEAD()

    def do_GET(self) -> None:
        wanted = self.headers.get("Range")
        self.server.requests.append(("GET", self.path, wanted))
        match = re.fullmatch(r"bytes=(\d+)-(\d+)", (self.server.ranges and wanted) or "")
        path = Path(self.translate_path(self.path))
        if match is None or not path.is_file():
            super().do_GET()
            return
        with path.open("rb") as stream:
            expected = self.headers.get("If-Match")
            if expected is not None and expected != etag_of(os.fstat(stream.fileno())):
                self.send_error(412, "Precondition Failed")
                return
            data = stream.read()
        start, last = int(match.group(1)), min(int(match.group(2)), len(data) - 1)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{last}/{len(data)}")
        self.send_header("Content-Length", str(last + 1 - start))
        super().end_headers()  # no ETag: the file may have changed since it was read
        self.wfile.write(data[start : last + 1])


class _Server(ThreadingHTTPServer):
    requests: list[tuple[str, str, str | None]]
    ranges: bool


class FileServer(ThreadedHttpServer[_Server]):
    """Serve folder ``root`` on ``http://127.0.0.1:PORT``; a context manager. Every request is
    remembered in `requests` as ``(method, path, Range header)``; ``ranges=False`` ignores
    ``Range``."""

    def __init__(self, root: Path, *, ranges: bool = True) -> None:
        super().__init__(_Server, partial(_Handler, directory=str(root)))
        self.root = root
        self._server.requests = []
        self._server.ranges = ranges

    @property
    def requests(self) -> list[tuple[str, str, str | None]]:
        """``(method, path, Range header)`` of every request so far."""
        return list(self._server.requests)
