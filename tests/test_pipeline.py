"""The resolution pipeline itself (`Resolver`), on the in-memory reference store: no
server, every request counted and faultable. Single flight, the miss memory, what a store that
cannot answer gets (stale copies, errors, the next resolver), leases and eviction, looking again
when the adapter changes mid-fetch, and refusing what does not match its declared checksum."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import BASE_MODEL, files_of, snapshot_dirs, staging_entries
from resolver_setup import fast_transfer

from devtools.memory_store import MemoryBucket, MemoryStore
from devtools.models import write_lora_adapter
from devtools.relay import Fault
from vllm_lora_resolvers import metrics
from vllm_lora_resolvers.cache import NodeCache
from vllm_lora_resolvers.config import ConfigurationError, Settings
from vllm_lora_resolvers.edge import VllmResolver
from vllm_lora_resolvers.errors import (
    IntegrityError,
    InvalidAdapterError,
    StoreRefusedError,
    StoreUnavailableError,
    TransientStoreError,
)
from vllm_lora_resolvers.resolver import Resolver

EVERYTHING_REFUSED = Fault("status", status=403, code="AccessDenied", times=1_000_000)
EVERYTHING_DOWN = Fault("status", times=1_000_000)


@pytest.fixture
def memory() -> MemoryBucket:
    return MemoryBucket()


@pytest.fixture
def open_resolver(
    memory: MemoryBucket, cache_dir: Path, make_settings: Callable[..., Settings]
) -> Callable[..., Resolver]:
    """A resolver of ``memory`` as a new server process would have (``variables``: ours)."""

    def make(cache: Path = cache_dir, **variables: str) -> Resolver:
        settings = make_settings(VLLM_LORA_RESOLVER_CACHE_DIR=str(cache), **variables)
        node_cache = NodeCache(cache, settings.cache_max_bytes)
        return Resolver(MemoryStore(memory, settings, node_cache, fast_transfer(8192)))

    return make


def put(memory: MemoryBucket, tmp_path: Path, name: str, **options: Any) -> Path:
    source = write_lora_adapter(tmp_path / "sources" / name, base_model=BASE_MODEL, **options)
    memory.put_folder(name, source)
    return source


def outcomes(outcome: str) -> float:
    return float(metrics.RESOLUTIONS.labels("memory", outcome)._value.get())


def test_threads_asking_for_one_new_adapter_fetch_it_once(
    memory: MemoryBucket, tmp_path: Path, open_resolver: Callable[..., Resolver]
) -> None:
    put(memory, tmp_path, "sql")
    resolver = open_resolver()
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: resolver.resolve(BASE_MODEL, "sql"), range(32)))
    assert len({answer.path for answer in answers if answer is not None}) == 1
    assert None not in answers
    weights = [path for method, path in memory.requests if path == "sql/adapter_model.safetensors"]
    parts = -(-len(memory.listing("sql")["adapter_model.safetensors"].content) // 8192)  # type: ignore[index]
    assert len(weights) == parts  # each part read once


def test_a_missing_name_is_asked_again_once_its_ttl_ends(
    memory: MemoryBucket, open_resolver: Callable[..., Resolver], monkeypatch: pytest.MonkeyPatch
) -> None:
    now = time.monotonic()
    monkeypatch.setattr(time, "monotonic", lambda: now)  # a clock the test moves, however slow
    resolver = open_resolver(VLLM_LORA_RESOLVER_NEGATIVE_TTL="5")
    for _ in range(100):
        assert resolver.resolve(BASE_MODEL, "absent") is None
    assert memory.requests == [("LIST", "absent")]
    now += 4.9
    assert resolver.resolve(BASE_MODEL, "absent") is None
    assert len(memory.requests) == 1
    now += 0.2
    assert resolver.resolve(BASE_MODEL, "absent") is None
    assert len(memory.requests) == 2


def test_an_adapter_changed_mid_fetch_is_looked_up_again_and_served_new(
    memory: MemoryBucket, tmp_path: Path, open_resolver: Callable[..., Resolver]
) -> None:
    put(memory, tmp_path, "sql", seed=1)
    v2 = write_lora_adapter(tmp_path / "v2", base_model=BASE_MODEL, seed=2)

    def reupload_once(method: str, path: str) -> None:
        if path.endswith("adapter_model.safetensors"):
            memory.on_request = None
            memory.put_folder("sql", v2)  # between the lookup and the weights read

    memory.on_request = reupload_once
    resolved = open_resolver().resolve(BASE_MODEL, "sql")
    assert resolved is not None
    assert files_of(resolved.path) == files_of(v2)
    assert [m for m, _ in memory.requests].count("LIST") == 2


def test_a_refused_version_is_remembered_and_a_new_one_checked_again(
    memory: MemoryBucket, tmp_path: Path, open_resolver: Callable[..., Resolver]
) -> None:
    put(memory, tmp_path, "sql", rank=64)
    resolver = open_resolver()
    for _ in range(3):
        with pytest.raises(InvalidAdapterError, match="rank 64"):
            resolver.resolve(BASE_MODEL, "sql")
    assert memory.requests.count(("GET", "sql/adapter_config.json")) == 1
    put(memory, tmp_path, "sql", rank=8)
    assert resolver.resolve(BASE_MODEL, "sql") is not None


def test_a_checksum_mismatch_is_retried_then_refused_and_never_published(
    memory: MemoryBucket,
    tmp_path: Path,
    cache_dir: Path,
    open_resolver: Callable[..., Resolver],
) -> None:
    put(memory, tmp_path, "sql")
    memory.add_fault(
        Fault("corrupt_at", path_contains="adapter_model", after_bytes=100, times=1_000_000)
    )
    with pytest.raises(IntegrityError, match="sha256 does not match"):
        open_resolver().resolve(BASE_MODEL, "sql")
    assert len([p for _, p in memory.requests if "adapter_model" in p]) > 1  # retried first
    assert snapshot_dirs(cache_dir) == []
    assert staging_entries(cache_dir) == []


# -- a store that cannot answer ---------------------------------------------------------------


def test_a_store_that_refuses_us_is_not_served_from_the_cache(
    memory: MemoryBucket, tmp_path: Path, open_resolver: Callable[..., Resolver]
) -> None:
    put(memory, tmp_path, "sql")
    assert open_resolver().resolve(BASE_MODEL, "sql") is not None
    memory.add_fault(EVERYTHING_REFUSED)
    refused = outcomes("refused")
    with pytest.raises(StoreRefusedError, match="HTTP 403"):
        open_resolver().resolve(BASE_MODEL, "sql")
    assert outcomes("refused") == refused + 1
    assert open_resolver(VLLM_LORA_RESOLVER_SERVE_STALE="always").resolve(BASE_MODEL, "sql")


def test_stale_copies_can_be_turned_off(
    memory: MemoryBucket, tmp_path: Path, open_resolver: Callable[..., Resolver]
) -> None:
    put(memory, tmp_path, "sql")
    assert open_resolver().resolve(BASE_MODEL, "sql") is not None
    memory.add_fault(EVERYTHING_DOWN)
    with pytest.raises(TransientStoreError):
        open_resolver(VLLM_LORA_RESOLVER_SERVE_STALE="never").resolve(BASE_MODEL, "sql")


@pytest.mark.parametrize(
    ("fault", "serve_stale", "withheld"),
    [
        (EVERYTHING_REFUSED, "unreachable", True),
        (EVERYTHING_DOWN, "never", True),
        (EVERYTHING_REFUSED, "always", False),
        (EVERYTHING_DOWN, "unreachable", False),
    ],
)
def test_a_store_whose_copies_may_not_be_served_withholds_them_from_every_resolver_until_it_answers(
    memory: MemoryBucket,
    tmp_path: Path,
    open_resolver: Callable[..., Resolver],
    fault: Fault,
    serve_stale: str,
    withheld: bool,
) -> None:
    put(memory, tmp_path, "sql")
    put(memory, tmp_path, "other", seed=2)
    resolver = open_resolver(  # no outage memory: the store is asked again at once
        VLLM_LORA_RESOLVER_SERVE_STALE=serve_stale, VLLM_LORA_RESOLVER_NEGATIVE_TTL="0"
    )
    cached = resolver.resolve(BASE_MODEL, "sql")
    assert cached is not None
    memory.add_fault(fault)
    with contextlib.suppress(StoreUnavailableError):
        resolver.resolve(BASE_MODEL, "other")  # not cached: an error
    reason = resolver.cache.withheld(cached.snapshot)  # what vLLM's filesystem resolver asks
    if withheld:
        assert reason is not None and "memory store" in reason
        assert f"VLLM_LORA_RESOLVER_SERVE_STALE={serve_stale}" in reason
    else:
        assert reason is None
    memory.clear_faults()
    assert resolver.resolve(BASE_MODEL, "other") is not None
    assert resolver.cache.withheld(cached.snapshot) is None  # the store answered again


def test_an_outage_remembered_for_one_name_never_reports_that_names_error_for_another(
    memory: MemoryBucket, open_resolver: Callable[..., Resolver]
) -> None:
    memory.add_fault(EVERYTHING_DOWN)
    resolver = open_resolver()
    with pytest.raises(TransientStoreError, match="first-name"):
        resolver.resolve(BASE_MODEL, "first-name")
    asked = len(memory.requests)
    with pytest.raises(TransientStoreError) as remembered:
        resolver.resolve(BASE_MODEL, "brand-new")
    assert len(memory.requests) == asked  # answered from the outage memory, at once
    assert "first-name" not in str(remembered.value)
    assert "could not be reached" in str(remembered.value)


def test_a_store_down_lets_the_next_resolver_answer_or_fails_the_request(
    memory: MemoryBucket, open_resolver: Callable[..., Resolver]
) -> None:
    memory.add_fault(EVERYTHING_REFUSED)
    assert asyncio.run(VllmResolver(open_resolver()).resolve_lora(BASE_MODEL, "other")) is None
    memory.clear_faults()
    memory.add_fault(EVERYTHING_DOWN)
    assert asyncio.run(VllmResolver(open_resolver()).resolve_lora(BASE_MODEL, "other")) is None
    failing = open_resolver(VLLM_LORA_RESOLVER_STORE_DOWN="fail")
    with pytest.raises(StoreUnavailableError, match="HTTP 503"):
        asyncio.run(VllmResolver(failing).resolve_lora(BASE_MODEL, "other"))


def test_the_policies_refuse_unknown_values(make_settings: Callable[..., Settings]) -> None:
    with pytest.raises(ConfigurationError, match="VLLM_LORA_RESOLVER_SERVE_STALE"):
        make_settings(VLLM_LORA_RESOLVER_SERVE_STALE="sometimes")
    with pytest.raises(ConfigurationError, match="VLLM_LORA_RESOLVER_STORE_DOWN"):
        make_settings(VLLM_LORA_RESOLVER_STORE_DOWN="retry")


def test_the_current_version_is_never_a_cached_one_while_the_store_cannot_answer(
    memory: MemoryBucket, tmp_path: Path, open_resolver: Callable[..., Resolver]
) -> None:
    put(memory, tmp_path, "sql")
    resolver = open_resolver()
    assert resolver.resolve(BASE_MODEL, "sql") is not None
    memory.add_fault(EVERYTHING_DOWN)
    assert open_resolver().resolve(BASE_MODEL, "sql") is not None  # a server: the cached copy
    with pytest.raises(StoreUnavailableError):
        open_resolver().current(BASE_MODEL, "sql")  # what `vllm-lora sync` asks: no stale answer


# -- leases and eviction ----------------------------------------------------------------------


@pytest.mark.parametrize("store_down", [False, True])
def test_a_cached_snapshot_that_fails_this_servers_checks_is_not_left_leased(
    memory: MemoryBucket, tmp_path: Path, open_resolver: Callable[..., Resolver], store_down: bool
) -> None:
    put(memory, tmp_path, "sql", rank=8)
    earlier_server = open_resolver()  # of rank 16, fetched it, then ended
    fetched = earlier_server.resolve(BASE_MODEL, "sql")
    assert fetched is not None
    fetched_by = fetched.snapshot
    earlier_server.cache.release(fetched_by.key)
    if store_down:
        memory.add_fault(EVERYTHING_DOWN)  # the cached copy is offered as a stale one
    small = open_resolver(VLLM_LORA_RESOLVER_MAX_RANK="4")  # a server that cannot serve it
    with pytest.raises(InvalidAdapterError, match="rank 8 is above"):
        small.resolve(BASE_MODEL, "sql")
    assert fetched_by.key not in small.cache.leased_keys()
    assert not small.cache.is_leased_by_anyone(fetched_by.key)  # evictable: the cap holds


def test_eviction_never_removes_a_snapshot_another_process_leases(
    memory: MemoryBucket, tmp_path: Path, open_resolver: Callable[..., Resolver]
) -> None:
    for seed, name in enumerate(("held", "b", "c", "d")):
        put(memory, tmp_path, name, seed=seed)
    holder = open_resolver()  # another server on the node (its own leases)
    held = holder.resolve(BASE_MODEL, "held")
    assert held is not None
    capped = open_resolver(
        VLLM_LORA_RESOLVER_CACHE_MAX_BYTES=str(held.snapshot.manifest.total_bytes)
    )
    assert capped.resolve(BASE_MODEL, "b") is not None
    assert capped.resolve(BASE_MODEL, "c") is not None
    assert held.path.exists()  # leased by the holder: kept above the cap
    holder.cache.release(held.snapshot.key)
    assert capped.resolve(BASE_MODEL, "d") is not None
    assert not held.path.exists()  # released: evictable now
