"""The store contract: every behaviour a store's resolver promises, run on every store of
`contract_stores.STORES` (the memory reference store, a directory, S3 on SeaweedFS and on moto,
GCS, Azure, the Hub and the documentation's HTTP example), through its real client against a real
server on 127.0.0.1. A behaviour a store cannot have is skipped with the reason its `StoreUnderTest`
declares; a store-specific behaviour is tested in that store's own file."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import google_crc32c
import pytest
from conftest import (
    BASE_MODEL,
    files_of,
    run_worker,
    snapshot_dirs,
    staging_entries,
    worker_result,
)
from contract_stores import Capability, StoreUnderTest, store_fixture  # noqa: F401 - the fixture
from hf_fixtures import hub_fixture  # noqa: F401 - the fixture, for the Hub store
from resolver_setup import fast_transfer

from devtools.models import write_large_adapter, write_lora_adapter
from devtools.relay import Fault
from vllm_lora_resolvers import metrics
from vllm_lora_resolvers.backends import azure, gcs, s3
from vllm_lora_resolvers.edge import VllmResolver
from vllm_lora_resolvers.errors import (
    InvalidAdapterError,
    TransientStoreError,
)
from vllm_lora_resolvers.fetch import SMALL_WEIGHTS_BYTES
from vllm_lora_resolvers.resolver import Resolver

#: What "seconds, never minutes" means: several times the ~3 s a dead store's lookup may cost.
BOUND_SECONDS = 10.0
WEIGHTS = "adapter_model.safetensors"
#: Short limits, so that the worst case a black hole may cost is a few seconds; with 4 KiB parts,
#: ranged reads (each retried) and the whole file's attempts all draw on the one budget.
SHORT_BUDGET = replace(
    fast_transfer(4096),
    transfer_timeout=(0.5, 0.5),
    lookup_timeout=(0.5, 0.5),
    resolution_seconds=1.5,
)
#: Scheduling slack on a loaded 2-core machine: threads waking up, sockets closing.
SLACK_SECONDS = 1.5
#: A rank that lets the large adapters of the transfer tests through.
HUGE_RANK = {"VLLM_LORA_RESOLVER_MAX_RANK": "1000000"}


def counted(store: StoreUnderTest, metric: Any, outcome: str) -> float:
    return float(metric.labels(store.backend, outcome)._value.get())


def fetched_bytes(store: StoreUnderTest) -> float:
    return float(metrics.FETCHED_BYTES.labels(store.backend)._value.get())


def assert_nothing_published(cache_dir: Path, name: str) -> None:
    assert snapshot_dirs(cache_dir) == []
    assert staging_entries(cache_dir) == []
    assert not os.path.lexists(cache_dir / name)


def put_adapter(store: StoreUnderTest, tmp_path: Path, short: str, **options: Any) -> Path:
    source = write_lora_adapter(tmp_path / "sources" / short, base_model=BASE_MODEL, **options)
    store.put(short, source)
    return source


def put_large_adapter(store: StoreUnderTest, tmp_path: Path, short: str, size: int) -> Path:
    source = write_large_adapter(
        tmp_path / "sources" / short, base_model=BASE_MODEL, size_bytes=size
    )
    store.put(short, source)
    return source


# -- finding adapters ---------------------------------------------------------------------------


def test_hit(store: StoreUnderTest, tmp_path: Path, cache_dir: Path) -> None:
    source = put_adapter(store, tmp_path, "sql")
    resolver = store.resolver(cache_dir)
    first = resolver.resolve(BASE_MODEL, store.name("sql"))
    assert first is not None
    assert first.path.is_relative_to(cache_dir / ".vllm-lora" / "snapshots")
    assert files_of(first.path) == files_of(source)
    assert (cache_dir / store.name("sql")).resolve() == first.path.resolve()
    store.reset_counters()
    hits = counted(store, metrics.RESOLUTIONS, "hit")
    assert resolver.resolve(BASE_MODEL, store.name("sql")) == first
    assert counted(store, metrics.RESOLUTIONS, "hit") == hits + 1
    assert store.weights_reads() == []  # a hit is a lookup, no download
    assert len(snapshot_dirs(cache_dir)) == 1


def test_update(store: StoreUnderTest, tmp_path: Path, cache_dir: Path) -> None:
    put_adapter(store, tmp_path, "sql", seed=1)
    resolver = store.resolver(cache_dir)
    first = resolver.resolve(BASE_MODEL, store.name("sql"))
    v2 = write_lora_adapter(tmp_path / "v2", base_model=BASE_MODEL, seed=2)
    store.put("sql", v2)
    second = resolver.resolve(BASE_MODEL, store.name("sql"))
    assert first is not None and second is not None
    assert second.path != first.path
    assert files_of(second.path) == files_of(v2)
    assert first.path.exists()  # the old version stays while this process may use it
    assert (cache_dir / store.name("sql")).resolve() == second.path.resolve()


def test_delete(store: StoreUnderTest, tmp_path: Path, cache_dir: Path) -> None:
    put_adapter(store, tmp_path, "sql")
    resolver = store.resolver(cache_dir)
    served = resolver.resolve(BASE_MODEL, store.name("sql"))
    store.delete("sql")
    assert resolver.resolve(BASE_MODEL, store.name("sql")) is None
    assert not os.path.lexists(cache_dir / store.name("sql"))  # vLLM's own resolver: not found
    assert served is not None and served.path.exists()  # but what was handed out stays


def test_lists_its_adapters(store: StoreUnderTest, tmp_path: Path, cache_dir: Path) -> None:
    put_adapter(store, tmp_path, "sql")
    put_adapter(store, tmp_path, "chat", seed=1)
    listed = set(store.resolver(cache_dir).store.list_names())
    assert {store.name("sql"), store.name("chat")} <= listed


def test_invalid_adapter_is_refused_before_the_body_of_its_weights_is_read(
    store: StoreUnderTest, tmp_path: Path, cache_dir: Path
) -> None:
    source = put_adapter(store, tmp_path, "wide", rank=512)
    # Weights this large wait for the config's checks (smaller ones are fetched beside it).
    assert (source / "adapter_model.safetensors").stat().st_size > SMALL_WEIGHTS_BYTES
    resolver = store.resolver(cache_dir)
    with pytest.raises(InvalidAdapterError, match="rank 512 is above this server's limit"):
        resolver.resolve(BASE_MODEL, store.name("wide"))
    read = store.weights_reads()
    assert len(read) <= 1  # at most the head of the weights, read beside the config: no body
    with pytest.raises(InvalidAdapterError, match="rank 512 is above this server's limit"):
        resolver.resolve(BASE_MODEL, store.name("wide"))
    assert store.weights_reads() == read  # remembered: nothing read again
    assert_nothing_published(cache_dir, store.name("wide"))


HOSTILE = ["../x", "a/../../b", "/etc", "..", "%2e%2e", "a\\b", "x\x00", "\uff53ql", "x" * 10_000]


def test_hostile_names_never_reach_the_store(
    store: StoreUnderTest, tmp_path: Path, cache_dir: Path
) -> None:
    put_adapter(store, tmp_path, "sql")
    resolver = store.resolver(cache_dir)
    for name in [*HOSTILE, "", *(store.name(hostile) for hostile in HOSTILE)]:
        assert resolver.resolve(BASE_MODEL, name) is None, name
    assert store.requests() == []
    assert os.listdir(cache_dir) == [".vllm-lora"]
    assert snapshot_dirs(cache_dir) == []


def test_a_miss_storm_costs_one_lookup(
    store: StoreUnderTest, tmp_path: Path, cache_dir: Path
) -> None:
    put_adapter(store, tmp_path, "sql")  # the store exists, the name does not
    resolver = store.resolver(cache_dir)
    assert resolver.resolve(BASE_MODEL, store.name("absent")) is None

    def lookups() -> list[tuple[str, str]]:  # requests naming it (a client's own aside)
        return [request for request in store.requests() if "absent" in request[1]]

    one_lookup = lookups()
    assert 1 <= len(one_lookup) <= 2  # one call (the HTTP example: a HEAD per file)
    for _ in range(999):
        assert resolver.resolve(BASE_MODEL, store.name("absent")) is None
    assert lookups() == one_lookup  # within the miss TTL


# -- one fetch per node -------------------------------------------------------------------------


async def test_32_coroutines_fetch_a_new_adapter_once(
    store: StoreUnderTest, tmp_path: Path, cache_dir: Path
) -> None:
    pytest.importorskip("vllm")
    source = put_adapter(store, tmp_path, "sql")
    size = sum(path.stat().st_size for path in source.iterdir())
    resolver = VllmResolver(store.resolver(cache_dir))
    fetched, before = counted(store, metrics.RESOLUTIONS, "fetched"), fetched_bytes(store)
    requests = await asyncio.gather(
        *(resolver.resolve_lora(BASE_MODEL, store.name("sql")) for _ in range(32))
    )
    assert None not in requests
    assert len({request.lora_path for request in requests if request is not None}) == 1
    assert {request.lora_name for request in requests if request is not None} == {store.name("sql")}
    assert all(request.lora_int_id >= 1 for request in requests if request is not None)
    assert await resolver.resolve_lora(BASE_MODEL, store.name("../sql")) is None
    assert counted(store, metrics.RESOLUTIONS, "fetched") == fetched + 1
    assert fetched_bytes(store) - before == size
    # Stores that count reads: the bytes once, after a probe of the header where the store
    # reads a range cheaply (`read_head`).
    assert len(store.weights_reads()) <= 2


def start_worker(
    store: StoreUnderTest, cache_dir: Path, short: str, *options: str
) -> subprocess.Popen[str]:
    """tests/workers/resolve_remote.py resolving ``short`` from ``store`` into ``cache_dir``."""
    return run_worker(
        "resolve_remote.py",
        store.worker_store,
        store.worker_uri,
        str(cache_dir),
        store.name(short),
        *options,
    )


def test_8_processes_fetch_a_new_adapter_once(
    store: StoreUnderTest, tmp_path: Path, cache_dir: Path
) -> None:
    store.require(Capability.PROCESSES)
    source = put_adapter(store, tmp_path, "sql")
    workers = [start_worker(store, cache_dir, "sql", "--wait-for-go") for _ in range(8)]
    assert [worker_result(worker) for worker in workers] == [{"ready": True}] * 8
    for worker in workers:  # all at once, as far as 8 pipes allow
        assert worker.stdin is not None
        worker.stdin.write("go\n")
        worker.stdin.flush()
    answers = [worker_result(worker) for worker in workers]
    assert [worker.wait(timeout=60) for worker in workers] == [0] * 8
    assert len({answer["path"] for answer in answers}) == 1
    assert len({answer["lora_int_id"] for answer in answers}) == 1
    assert len([answer for answer in answers if answer["fetched"] > 0]) == 1
    assert len(snapshot_dirs(cache_dir)) == 1
    assert files_of(Path(answers[0]["path"])) == files_of(source)
    # Stores that count reads: the bytes once, after a probe of the header where the store
    # reads a range cheaply (`read_head`).
    assert len(store.weights_reads()) <= 2


def test_killed_mid_download_the_cache_stays_consistent(
    store: StoreUnderTest, tmp_path: Path, cache_dir: Path
) -> None:
    store.require(Capability.PROCESSES)
    source = put_adapter(store, tmp_path, "sql")
    worker = start_worker(store, cache_dir, "sql", "--stall")
    stalled = Path(worker_result(worker)["stalled"])
    assert stalled.is_file()
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    assert snapshot_dirs(cache_dir) == []
    assert not os.path.lexists(cache_dir / store.name("sql"))
    assert len(staging_entries(cache_dir)) == 1  # the dead process's debris

    resolver = store.resolver(cache_dir)  # the next server on the node
    assert staging_entries(cache_dir) == []  # cleaned when the cache is opened
    resolved = resolver.resolve(BASE_MODEL, store.name("sql"))
    assert resolved is not None
    assert files_of(resolved.path) == files_of(source)


# -- faults -------------------------------------------------------------------------------------


def test_503_is_retried(store: StoreUnderTest, tmp_path: Path, cache_dir: Path) -> None:
    store.require(Capability.FAULTS)
    source = put_adapter(store, tmp_path, "sql")
    store.add_fault(Fault("status", method="GET", path_contains="adapter_model", times=2))
    store.add_fault(Fault("status", times=1))  # the first request: the lookup
    resolved = store.resolver(cache_dir).resolve(BASE_MODEL, store.name("sql"))
    assert resolved is not None
    assert files_of(resolved.path) == files_of(source)
    assert len(store.weights_reads()) >= 3  # two 503s, then the bytes


def test_a_reset_connection_is_resumed(
    store: StoreUnderTest, tmp_path: Path, cache_dir: Path
) -> None:
    store.require(Capability.FAULTS)
    store.require(Capability.RANGES)
    source = put_large_adapter(store, tmp_path, "big", 1 << 20)
    weights = (source / WEIGHTS).stat().st_size
    after = 100_000
    store.add_fault(
        Fault(
            "reset_after", method="GET", path_contains="adapter_model", after_bytes=after, times=2
        )
    )
    resolver = store.resolver(cache_dir, transfer=fast_transfer(256 << 10), **HUGE_RANK)
    resolved = resolver.resolve(BASE_MODEL, store.name("big"))
    assert resolved is not None
    assert files_of(resolved.path) == files_of(source)
    assert len(store.weights_reads()) >= 4 + 2  # 4 parts, two of them resumed
    # What is fetched twice is at most what was in flight when a connection reset, never a
    # whole part, let alone the file.
    assert store.body_bytes() < weights + 2 * after + (64 << 10)
    # The CRC32C each file is recorded with, computed while its parts downloaded and resumed,
    # is that of its bytes.
    assert {file.path: file.crc32c for file in resolved.snapshot.manifest.files} == {
        path.name: google_crc32c.Checksum(path.read_bytes()).digest().hex()
        for path in source.iterdir()
    }


def test_a_truncated_body_is_detected_and_fetched_again(
    store: StoreUnderTest, tmp_path: Path, cache_dir: Path
) -> None:
    store.require(Capability.FAULTS)
    source = put_adapter(store, tmp_path, "sql")
    store.add_fault(
        Fault("close_after", method="GET", path_contains="adapter_model", after_bytes=1000)
    )
    resolved = store.resolver(cache_dir).resolve(BASE_MODEL, store.name("sql"))
    assert resolved is not None
    assert files_of(resolved.path) == files_of(source)
    assert len(store.weights_reads()) >= 2


def test_a_persistent_failure_is_a_clear_error_in_seconds(
    store: StoreUnderTest, tmp_path: Path, cache_dir: Path
) -> None:
    store.require(Capability.FAULTS)
    put_adapter(store, tmp_path, "sql")
    store.add_fault(Fault("status", method="GET", path_contains="adapter_model", times=10_000))
    started = time.monotonic()
    with pytest.raises(TransientStoreError, match="adapter_model"):
        store.resolver(cache_dir).resolve(BASE_MODEL, store.name("sql"))
    assert time.monotonic() - started < BOUND_SECONDS
    assert_nothing_published(cache_dir, store.name("sql"))


def test_an_unreachable_store_serves_the_cached_snapshot_and_errs_in_seconds(
    store: StoreUnderTest, tmp_path: Path, cache_dir: Path
) -> None:
    store.require(Capability.FAULTS)
    put_adapter(store, tmp_path, "sql")
    cached = store.resolver(cache_dir).resolve(BASE_MODEL, store.name("sql"))
    assert cached is not None
    store.add_fault(Fault("delay", seconds=3600, times=1_000_000))  # accepts, never answers
    stale = counted(store, metrics.RESOLUTIONS, "stale")

    resolver = store.resolver(cache_dir)  # a server started during the outage
    started = time.monotonic()
    again = resolver.resolve(BASE_MODEL, store.name("sql"))
    assert time.monotonic() - started < BOUND_SECONDS
    assert again is not None and again.path == cached.path
    assert counted(store, metrics.RESOLUTIONS, "stale") == stale + 1

    during_the_outage = len(store.requests())
    for _ in range(20):  # answered from the outage memory, without waiting on the store
        assert resolver.resolve(BASE_MODEL, store.name("sql")) == again
    with pytest.raises(TransientStoreError, match="could not be reached"):
        resolver.resolve(BASE_MODEL, store.name("never-uploaded"))  # nothing cached: an error
    assert len(store.requests()) == during_the_outage


def test_a_download_black_hole_costs_at_most_the_stated_worst_case(
    store: StoreUnderTest, tmp_path: Path, cache_dir: Path
) -> None:
    """The lookup is answered, then the weights' bytes never come: no retry starts after the
    resolution's budget, and the attempts in flight end at their time limits."""
    store.require(Capability.FAULTS)
    put_adapter(store, tmp_path, "sql")
    store.add_fault(Fault("delay", path_contains="adapter_model", seconds=3600, times=1_000_000))
    started = time.monotonic()
    with pytest.raises(TransientStoreError):
        store.resolver(cache_dir, transfer=SHORT_BUDGET).resolve(BASE_MODEL, store.name("sql"))
    assert time.monotonic() - started < SHORT_BUDGET.worst_case_seconds() + SLACK_SECONDS
    asked = [path for _, path in store.requests() if "adapter_model" in path]
    assert len(asked) >= 2  # asked for, and asked again
    assert_nothing_published(cache_dir, store.name("sql"))


def test_a_checksum_mismatch_is_refused(
    store: StoreUnderTest, tmp_path: Path, cache_dir: Path
) -> None:
    store.require(Capability.CHECKSUMS)
    store.require(Capability.FAULTS)
    source = put_adapter(store, tmp_path, "sql")
    near_the_end = (source / WEIGHTS).stat().st_size - 10  # in the tensors, past the header
    store.add_fault(
        Fault(
            "corrupt_at",
            method="GET",
            path_contains="adapter_model",
            after_bytes=near_the_end,
            times=1_000_000,
        )
    )
    refused_then_served_once_clear(store, cache_dir, "sql", source, "")


def test_a_part_corrupted_in_transit_is_refused(
    store: StoreUnderTest, tmp_path: Path, cache_dir: Path
) -> None:
    """A byte flipped early in each ranged part of the weights (hashed while the later parts
    download) fails the checksum the store declares; nothing is published."""
    store.require(Capability.CHECKSUMS)
    store.require(Capability.FAULTS)
    store.require(Capability.RANGES)
    source = put_large_adapter(store, tmp_path, "big", 1 << 20)
    corrupted = Fault(
        "corrupt_at",
        method="GET",
        path_contains="adapter_model",
        after_bytes=100_000,  # past the head the config's checks read, if they read one
        times=1_000_000,
    )
    store.add_fault(corrupted)
    resolver = store.resolver(cache_dir, transfer=fast_transfer(256 << 10), **HUGE_RANK)
    refused_then_served_once_clear(store, cache_dir, "big", source, "does not match", resolver)


def refused_then_served_once_clear(
    store: StoreUnderTest,
    cache_dir: Path,
    short: str,
    source: Path,
    refusal: str,
    resolver: Resolver | None = None,
) -> None:
    """The store's faults make ``resolver`` (by default the store's, over ``cache_dir``) refuse
    ``short`` (a `TransientStoreError` that says ``refusal``) and publish nothing in
    ``cache_dir``; once they are cleared it serves ``source``'s files."""
    resolver = resolver or store.resolver(cache_dir)
    with pytest.raises(TransientStoreError, match=refusal):
        resolver.resolve(BASE_MODEL, store.name(short))
    assert_nothing_published(cache_dir, store.name(short))
    store.clear_faults()
    resolved = resolver.resolve(BASE_MODEL, store.name(short))
    assert resolved is not None
    assert files_of(resolved.path) == files_of(source)


#: What a hostile store pads a body with: far more than the tries of a resolution may receive.
PADDING = 128 << 20
#: What may reach the node per try beyond the bytes it asked for: the chunk being read when it
#: hangs up, and what the TCP buffers of both ends took in meanwhile (a few MiB on loopback).
IN_FLIGHT = 16 << 20
#: Tries of a version the store serves otherwise than it declared: it is looked up once more (it
#: may have just changed), then refused.
TRIES = 2


def test_a_store_sending_more_than_it_declared_is_refused_and_remembered(
    store: StoreUnderTest, tmp_path: Path, cache_dir: Path
) -> None:
    """A store sending more bytes than it declared for a file is not an outage retried on every
    request: each try stops at the declared size, nothing is kept, and the version is refused
    from then on without a download."""
    store.require(Capability.FAULTS)
    source = put_adapter(store, tmp_path, "sql")
    declared = sum(path.stat().st_size for path in source.iterdir())
    padded = Fault(
        "pad", method="GET", path_contains="adapter_model", extra_bytes=PADDING, times=1_000_000
    )
    store.add_fault(padded)
    resolver = store.resolver(cache_dir)
    with pytest.raises(InvalidAdapterError, match=r"does not serve version \S+ as it declares it"):
        resolver.resolve(BASE_MODEL, store.name("sql"))
    assert store.body_bytes() < TRIES * (declared + IN_FLIGHT)
    assert_nothing_published(cache_dir, store.name("sql"))

    store.reset_counters()
    with pytest.raises(InvalidAdapterError, match="publish it again"):
        resolver.resolve(BASE_MODEL, store.name("sql"))
    assert store.weights_reads() == []
    assert store.body_bytes() < 64 << 10  # a lookup's answer at most


#: Bucket stores' limits on a lookup's listing, by backend, made small here: (module, its
#: constants set to the values given).
LISTING_LIMITS: dict[str, tuple[ModuleType, dict[str, int]]] = {
    "s3": (s3, {"_LOOKUP_PAGE_ENTRIES": 2, "_MAX_LOOKUP_PAGES": 2}),
    "gcs": (gcs, {"_MAX_LOOKUP_ENTRIES": 4}),
    "azure": (azure, {"_MAX_LOOKUP_ENTRIES": 4}),
}


def test_an_adapter_among_more_entries_than_a_lookup_lists_is_refused_with_what_to_do(
    store: StoreUnderTest, tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lookup lists the adapter's files by name in one short listing; other entries sorting
    among them (here ``adapter_draft_*``) past what it may read make it refuse, never list on."""
    if store.backend not in LISTING_LIMITS:
        pytest.skip(f"not applicable to {store.label}: its lookup lists no folder")
    module, limits = LISTING_LIMITS[store.backend]
    for constant, value in limits.items():
        monkeypatch.setattr(module, constant, value)
    put_adapter(store, tmp_path, "tidy")
    crowded = write_lora_adapter(tmp_path / "sources" / "crowded", base_model=BASE_MODEL)
    for index in range(6):
        (crowded / f"adapter_draft_{index}").write_text("an earlier try\n")
    store.put("crowded", crowded)
    resolver = store.resolver(cache_dir)
    assert resolver.resolve(BASE_MODEL, store.name("tidy")) is not None
    with pytest.raises(InvalidAdapterError, match=r"too many other entries.*move those elsewhere"):
        resolver.resolve(BASE_MODEL, store.name("crowded"))
