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
from pathlib import Path
from typing import IO

import requests

from devtools.loopback import Emulator

AZURITE = Path(__file__).parent / "azurite" / "node_modules" / ".bin" / "azurite-blob"
ACCOUNT = "vllmlora"


class Azurite(Emulator):
    """``with Azurite() as server: server.connection_string`` -> a connection string to it."""

    name = "Azurite"

    def __init__(self, startup_timeout: float = 30.0) -> None:
        super().__init__(startup_timeout)
        self.account = ACCOUNT
        self.key = base64.b64encode(secrets.token_bytes(64)).decode()

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

    def start(self) -> None:
        """`Emulator.start`; ``RuntimeError`` at once if Azurite is not installed."""
        if not AZURITE.exists():
            raise RuntimeError(
                f"{AZURITE} is missing: run `make setup` (npm ci in devtools/azurite)"
            )
        super().start()

    def _launch(self, log: IO[bytes]) -> subprocess.Popen[bytes]:
        command = [str(AZURITE), "--blobHost", "127.0.0.1", "--blobPort", str(self.port)]
        command += ["--inMemoryPersistence", "--skipApiVersionCheck", "--loose", "--silent"]
        environment = {**os.environ, "AZURITE_ACCOUNTS": f"{self.account}:{self.key}"}
        return subprocess.Popen(command, env=environment, stdout=log, stderr=subprocess.STDOUT)

    def _answers(self) -> bool:
        try:
            requests.get(f"{self.url}?comp=list", timeout=1)
        except requests.RequestException:
            return False
        return True
