"""``vllm-lora sync`` as a sidecar process beside a test or benchmark vLLM server."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import requests

from devtools.loopback import free_port
from devtools.vllm_server import VllmServer
from vllm_lora_resolvers.metrics import sample_sums

VLLM_LORA = str(Path(sys.executable).parent / "vllm-lora")


class SyncSidecar:
    """A ``vllm-lora sync`` process for ``server``, serving its metrics on a port of its own.

    ``env`` is its whole environment (the server's resolver variables and store credentials).
    """

    def __init__(
        self,
        server: VllmServer,
        env: Mapping[str, str],
        log: Path,
        *,
        interval: float,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.metrics_port = free_port()
        self.log = log
        command = [VLLM_LORA, "-v", "sync", "--server", server.url, "--interval", str(interval)]
        command += ["--metrics-port", str(self.metrics_port), *extra_args]
        with log.open("ab") as stream:
            self.process = subprocess.Popen(
                command, env=dict(env), stdout=stream, stderr=subprocess.STDOUT
            )

    def wait_for_a_round(self, timeout: float = 120.0) -> None:
        """Wait until the process is up and has run a round (it imports the store clients)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"sync exited: {self.log.read_text()[-3000:]}")
            try:
                if self.metric("vllm_lora_sync_rounds_total") >= 1:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"sync never ran a round: {self.log.read_text()[-3000:]}")

    def metric(self, name: str) -> float:
        """The sum of the samples named ``name`` on the sync's ``/metrics``."""
        response = requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5)
        return sample_sums(response.text, {name}).get(name, 0.0)

    def stop(self) -> None:
        """Stop the process (SIGTERM ends its loop between rounds)."""
        self.process.terminate()
        self.process.wait(timeout=30)
