"""Azurite's blob service (the npm package pinned in ``devtools/azurite/``, which ``make setup``
installs) on 127.0.0.1, in memory, with an account of its own.

The account's key is random for each server, so no key is written anywhere; clients reach the
account path-style (``http://127.0.0.1:PORT/ACCOUNT``), as the emulator expects.
"""

from __future__ import annotations

import base64
import os
import secrets
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import requests

from devtools.stores import free_port

AZURITE = Path(__file__).parent / "azurite" / "node_modules" / ".bin" / "azurite-blob"
ACCOUNT = "vllmlora"


class Azurite:
    """``with Azurite() as server: server.connection_string`` -> a connection string to it."""

    def __init__(self, startup_timeout: float = 30.0) -> None:
        self.port = free_port()
        self.account = ACCOUNT
        self.key = base64.b64encode(secrets.token_bytes(64)).decode()
        self.startup_timeout = startup_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        """The account's blob endpoint."""
        return self.url_via(self.port)

    def url_via(self, port: int) -> str:
        """The account's blob endpoint through a relay listening on ``port``."""
        return f"http://127.0.0.1:{port}/{self.account}"

    def connection_string(self, port: int | None = None) -> str:
        """A connection string to the account (through a relay on ``port``)."""
        return (
            f"DefaultEndpointsProtocol=http;AccountName={self.account};AccountKey={self.key};"
            f"BlobEndpoint={self.url_via(port or self.port)};"
        )

    def __enter__(self) -> Self:
        if not AZURITE.exists():
            raise RuntimeError(
                f"{AZURITE} is missing: run `make setup` (npm ci in devtools/azurite)"
            )
        command = [str(AZURITE), "--blobHost", "127.0.0.1", "--blobPort", str(self.port)]
        command += ["--inMemoryPersistence", "--skipApiVersionCheck", "--loose", "--silent"]
        environment = {**os.environ, "AZURITE_ACCOUNTS": f"{self.account}:{self.key}"}
        # Its log goes to a file: a pipe nobody reads fills up and then blocks the server.
        self._log = tempfile.TemporaryFile()
        self._process = subprocess.Popen(
            command, env=environment, stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + self.startup_timeout
        while not self._answers():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self._log.seek(0)
                error = self._log.read().decode(errors="replace")
                self.__exit__(None, None, None)
                raise RuntimeError(f"Azurite did not start: {error[-2000:]}")
            time.sleep(0.05)
        return self

    def _answers(self) -> bool:
        try:
            requests.get(f"{self.url}?comp=list", timeout=1)
        except requests.RequestException:
            return False
        return True

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._process is not None:
            self._process.kill()  # in memory: nothing to flush (it ignores SIGTERM for seconds)
            self._process.wait()
            self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None
