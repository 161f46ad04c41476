"""Helpers for the end-to-end tests: a real vLLM server, a SeaweedFS bucket behind a relay.

Each end-to-end module starts one server (about 35 s on 2 cores) with its own bucket, cache and
adapter folder, and drives it over HTTP only, as a client would.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from conftest import start_worker, worker_result

from devtools.relay import FaultRelay
from devtools.stores import S3Endpoint, upload_folder
from devtools.vllm_server import VllmServer
from vllm_lora_resolvers.metrics import sample_sums

PROMPT = "The quick brown fox"
MAX_TOKENS = 12
PREFIX = "adapters"
#: Variables of the test process that must not leak into a server's configuration.
_FOREIGN_PREFIXES = ("VLLM_LORA_RESOLVER_", "AWS_")


@dataclass
class Store:
    """One bucket for one module, reached by the server through a counting relay."""

    endpoint: S3Endpoint  # through the relay: what the server and other node processes use
    relay: FaultRelay
    bucket: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{PREFIX}"

    def upload(self, name: str, folder: Path) -> None:
        upload_folder(self.endpoint.client(), self.bucket, f"{PREFIX}/{name}", folder)

    def delete(self, name: str) -> None:
        client = self.endpoint.client()
        listing = client.list_objects_v2(Bucket=self.bucket, Prefix=f"{PREFIX}/{name}/")
        for item in listing.get("Contents", []):
            client.delete_object(Bucket=self.bucket, Key=item["Key"])


@contextmanager
def module_store(seaweed: S3Endpoint, bucket: str) -> Iterator[Store]:
    """A new bucket in the session's SeaweedFS, behind a `FaultRelay` that counts requests."""
    seaweed.client().create_bucket(Bucket=bucket)
    with FaultRelay(int(seaweed.url.rsplit(":", 1)[1])) as relay:
        relayed = S3Endpoint(relay.url, seaweed.access_key, seaweed.secret_key)
        yield Store(relayed, relay, bucket)


@contextmanager
def running_server(
    model: Path, workdir: Path, env: Mapping[str, str], extra_args: Sequence[str] = ()
) -> Iterator[VllmServer]:
    """A vLLM server whose only resolver and AWS settings are ``env`` (nothing inherited)."""
    with running_servers(model, [(workdir, env, None)], extra_args) as (server,):
        yield server


@contextmanager
def running_servers(
    model: Path,
    setups: Sequence[tuple[Path, Mapping[str, str], int | None]],
    extra_args: Sequence[str] = (),
) -> Iterator[list[VllmServer]]:
    """vLLM servers as `running_server` starts one, each ``(workdir, env, core)`` (a core of its
    own, or none), started at the same time (each start is mostly one busy core, and a server
    on a core of its own leaves the other free)."""
    servers: list[VllmServer] = []
    for workdir, env, core in setups:
        server = VllmServer(model, workdir=workdir, extra_env=env, extra_args=extra_args, core=core)
        while server.port in {other.port for other in servers}:  # no port is bound yet
            server = VllmServer(
                model, workdir=workdir, extra_env=env, extra_args=extra_args, core=core
            )
        servers.append(server)
    try:
        with pytest.MonkeyPatch.context() as patch:
            for name in list(os.environ):
                if name.startswith(_FOREIGN_PREFIXES) or name == "VLLM_PLUGINS":
                    patch.delenv(name)
            with ThreadPoolExecutor(len(servers)) as starting:  # the environment is read here
                for started in [starting.submit(server.start) for server in servers]:
                    started.result()
        yield servers
    finally:
        for server in servers:
            server.stop()


def complete(server: VllmServer, model: str, prompt: str = PROMPT) -> requests.Response:
    """A greedy completion of ``prompt`` by ``model``."""
    return server.completions(model, prompt, max_tokens=MAX_TOKENS)


def text(server: VllmServer, model: str, prompt: str = PROMPT) -> str:
    """The greedy completion of ``prompt`` by ``model``; fails the test unless HTTP 200."""
    response = complete(server, model, prompt)
    assert response.status_code == 200, f"{model!r}: {response.status_code} {response.text}"
    generated: str = response.json()["choices"][0]["text"]
    return generated


def error_message(response: requests.Response) -> str:
    """The ``error.message`` of an OpenAI-style error body."""
    message: str = response.json()["error"]["message"]
    return message


def listed_models(server: VllmServer) -> dict[str, dict[str, object]]:
    """``/v1/models`` as ``id -> card``."""
    response = server.get("/v1/models")
    response.raise_for_status()
    return {card["id"]: card for card in response.json()["data"]}


def metric(server: VllmServer, sample: str, **labels: str) -> float:
    """Sum of the samples named ``sample`` on the server's ``/metrics`` matching ``labels``."""
    response = server.get("/metrics")
    response.raise_for_status()
    return sample_sums(response.text, {sample}, **labels).get(sample, 0.0)


_PULL = """
import sys
from pathlib import Path
from vllm_lora_resolvers.backends.s3 import S3Store
from vllm_lora_resolvers.cache import NodeCache
from vllm_lora_resolvers.config import Settings
from vllm_lora_resolvers.resolver import Resolver

uri, cache, name, base = sys.argv[1:]
settings = Settings.from_environ({"VLLM_LORA_RESOLVER_CACHE_DIR": cache}, argv=[])
resolved = Resolver(S3Store(uri, settings, NodeCache(Path(cache)))).resolve(base, name)
assert resolved is not None, name
print(resolved.path)
"""


def pull_elsewhere(store: Store, cache: Path, name: str, model: Path) -> Path:
    """Resolve ``name`` into ``cache`` from another process on this node, which then exits
    (so it leases nothing afterwards: its snapshot may be evicted)."""
    completed = subprocess.run(
        [sys.executable, "-c", _PULL, store.uri, str(cache), name, str(model)],
        env={**os.environ, **store.endpoint.env()},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return Path(completed.stdout.strip())


def fetched_earlier(cache: Path, folder: Path, model: Path) -> Path:
    """Snapshot the adapter ``folder`` into ``cache`` under the folder's name, as an earlier server
    on this node would have (from a folder this server does not read), in a process that then
    exits. Snapshots are what vLLM's built-in resolver serves from the cache root."""
    worker = start_worker(str(folder.parent), str(cache), folder.name, "--base", str(model))
    path = Path(worker_result(worker)["path"])
    worker.wait()
    return path


def client_sees(message: str) -> str:
    """``message`` as vLLM shows it to a client (it replaces paths with ``<path>``)."""
    from vllm.entrypoints.serve.exception_handling.utils import sanitize_message

    return sanitize_message(message)
