"""What a dead store costs a request: each remote store behind a relay that accepts connections
and never answers (a black hole), against the same store healthy, in the same run.

Per store: a cached adapter resolved by a fresh resolver (a server started during the outage,
nothing remembered) while the store is healthy (baseline) and while it is black-holed (served
from the cache once the lookup gives up), and a second request during the outage (answered from
the outage memory). The added latency is the figure the docs quote.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from bench.common import report
from devtools.gcs_server import FakeGcs
from devtools.hub_server import HubServer
from devtools.models import write_lora_adapter
from devtools.relay import Fault, FaultRelay
from devtools.stores import S3Endpoint, SeaweedS3, upload_folder
from vllm_lora_resolvers import stores
from vllm_lora_resolvers.backends.gcs import GcsStore
from vllm_lora_resolvers.backends.hf_hub import HfHubStore
from vllm_lora_resolvers.backends.s3 import S3Store
from vllm_lora_resolvers.cache import NodeCache
from vllm_lora_resolvers.config import Settings
from vllm_lora_resolvers.resolver import Resolver

BASE_MODEL = "/models/tiny-llama"
RUNS = 5
BLACK_HOLE = Fault("delay", seconds=3600, times=1_000_000)
NewResolver = Callable[[], Resolver]


def _settings(cache: Path, **variables: str) -> Settings:
    environ = {"VLLM_LORA_RESOLVER_CACHE_DIR": str(cache), **variables}
    return Settings.from_environ(environ, argv=[])


@contextmanager
def s3_store(work: Path, adapter: Path) -> Iterator[tuple[FaultRelay, NewResolver, str]]:
    with SeaweedS3(work / "seaweed") as seaweed:
        endpoint = seaweed.endpoint
        endpoint.client().create_bucket(Bucket="bench")
        upload_folder(endpoint.client(), "bench", "adapters/sql", adapter)
        with FaultRelay(int(endpoint.url.rsplit(":", 1)[1])) as relay:
            relayed = S3Endpoint(relay.url, endpoint.access_key, endpoint.secret_key)
            os.environ.update(relayed.env())
            settings = _settings(work / "cache-s3")
            yield (
                relay,
                lambda: Resolver(
                    S3Store("s3://bench/adapters", settings, NodeCache(work / "cache-s3"))
                ),
                "sql",
            )


@contextmanager
def gcs_store(work: Path, adapter: Path) -> Iterator[tuple[FaultRelay, NewResolver, str]]:
    with FakeGcs() as server:
        client = storage.Client(
            project="bench", credentials=AnonymousCredentials(), client_options={
                "api_endpoint": server.url
            }
        )  # fmt: skip
        bucket = client.create_bucket("bench")
        for path in adapter.iterdir():
            bucket.blob(f"adapters/sql/{path.name}").upload_from_filename(str(path))
        with FaultRelay(int(server.url.rsplit(":", 1)[1])) as relay:
            os.environ["STORAGE_EMULATOR_HOST"] = relay.url
            settings = _settings(work / "cache-gcs")
            yield (
                relay,
                lambda: Resolver(
                    GcsStore("gs://bench/adapters", settings, NodeCache(work / "cache-gcs"))
                ),
                "sql",
            )


@contextmanager
def hub_store(work: Path, adapter: Path) -> Iterator[tuple[FaultRelay, NewResolver, str]]:
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = False
    with HubServer(work / "hub") as server, FaultRelay(server.port) as relay:
        server.push("acme/adapters", {"sql": adapter})
        os.environ["HF_ENDPOINT"] = relay.url
        settings = _settings(work / "cache-hub", VLLM_LORA_RESOLVER_HF_REPO_LIST="acme/adapters")
        yield (
            relay,
            lambda: Resolver(
                HfHubStore(stores.HF.source(settings), settings, NodeCache(work / "cache-hub"))
            ),
            "acme/adapters/sql",
        )


def measure(store: AbstractContextManager[tuple[FaultRelay, NewResolver, str]]) -> list[float]:
    """Median seconds: healthy hit, first request while black-holed, the next one."""
    with store as (relay, new_resolver, name):
        assert new_resolver().resolve(BASE_MODEL, name) is not None  # cached now

        def timed(resolver: Resolver) -> float:
            started = time.perf_counter()
            assert resolver.resolve(BASE_MODEL, name) is not None
            return time.perf_counter() - started

        healthy = [timed(new_resolver()) for _ in range(RUNS)]
        relay.add_fault(BLACK_HOLE)
        first, following = [], []
        for _ in range(RUNS):
            resolver = new_resolver()
            first.append(timed(resolver))
            following.append(timed(resolver))
        relay.clear_faults()
    return [statistics.median(sample) for sample in (healthy, first, following)] + [max(first)]


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-outage-") as directory:
        work = Path(directory)
        adapter = write_lora_adapter(work / "adapter", base_model=BASE_MODEL)
        stores = {"s3": s3_store, "gcs": gcs_store, "hub": hub_store}
        rows = []
        for label, store in stores.items():
            healthy, first, following, worst = measure(store(work, adapter))
            rows += [
                (f"{label}: healthy store, cached adapter (median)", f"{healthy * 1000:.1f} ms"),
                (
                    f"{label}: black-holed store, first request (median / max of {RUNS})",
                    f"{first:.2f} s / {worst:.2f} s (+{first - healthy:.2f} s)",
                ),
                (
                    f"{label}: black-holed store, next request (outage memory)",
                    f"{following * 1000:.1f} ms ({following / healthy:.2f}x healthy)",
                ),
            ]
    report("A store that accepts connections and never answers (served from the cache)", rows)


if __name__ == "__main__":
    main()
