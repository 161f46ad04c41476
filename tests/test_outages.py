"""A store that cannot answer: unreachable or refusing, with or without a cached copy, alone or
in a chain. The pipeline's policy, on the filesystem backend (real stores: per-store tests)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import BASE_MODEL

from devtools.models import write_lora_adapter
from vllm_lora_resolvers import metrics
from vllm_lora_resolvers.backends.filesystem import FilesystemResolver
from vllm_lora_resolvers.cache import NodeCache
from vllm_lora_resolvers.config import ConfigurationError, Settings
from vllm_lora_resolvers.errors import (
    StoreRefusedError,
    StoreUnavailableError,
    TransientStoreError,
)
from vllm_lora_resolvers.remote import RemoteAdapter


class FailingStore(FilesystemResolver):
    """A filesystem store whose lookups fail with ``failure`` once it is set."""

    failure: Exception | None = None
    lookups = 0

    def locate(self, name: str) -> RemoteAdapter | None:
        self.lookups += 1
        if self.failure is not None:
            raise self.failure
        return super().locate(name)


def _store(adapters: Path, cache: Path, settings: Settings) -> FailingStore:
    write_lora_adapter(adapters / "sql", base_model=BASE_MODEL)
    return FailingStore(adapters, settings, NodeCache(cache))


def _outcomes(outcome: str) -> float:
    return float(metrics.RESOLUTIONS.labels("fs", outcome)._value.get())


def test_a_store_that_refuses_us_is_not_served_from_the_cache(
    adapters_dir: Path, cache_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    store = _store(adapters_dir, cache_dir, make_settings())
    assert store.resolve(BASE_MODEL, "sql") is not None
    store.failure = StoreRefusedError("access denied")
    refused = _outcomes("refused")
    with pytest.raises(StoreRefusedError, match="access denied"):
        store.resolve(BASE_MODEL, "sql")
    assert _outcomes("refused") == refused + 1


def test_serving_stale_copies_of_a_refusing_store_can_be_asked_for(
    adapters_dir: Path, cache_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    store = _store(adapters_dir, cache_dir, make_settings(VLLM_LORA_RESOLVER_SERVE_STALE="always"))
    first = store.resolve(BASE_MODEL, "sql")
    store.failure = StoreRefusedError("access denied")
    assert store.resolve(BASE_MODEL, "sql") == first


def test_stale_copies_can_be_turned_off(
    adapters_dir: Path, cache_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    store = _store(adapters_dir, cache_dir, make_settings(VLLM_LORA_RESOLVER_SERVE_STALE="never"))
    assert store.resolve(BASE_MODEL, "sql") is not None
    store.failure = TransientStoreError("connection refused")
    with pytest.raises(TransientStoreError):
        store.resolve(BASE_MODEL, "sql")


def test_an_outage_remembered_for_one_name_never_reports_that_names_error_for_another(
    adapters_dir: Path, cache_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    store = _store(adapters_dir, cache_dir, make_settings())
    store.failure = TransientStoreError("looking up 'first-name' failed: ConnectTimeoutError")
    with pytest.raises(TransientStoreError, match="first-name"):
        store.resolve(BASE_MODEL, "first-name")
    lookups = store.lookups
    with pytest.raises(TransientStoreError) as remembered:
        store.resolve(BASE_MODEL, "brand-new")
    assert store.lookups == lookups  # answered from the outage memory, at once
    assert "first-name" not in str(remembered.value)
    assert "could not be reached" in str(remembered.value)


def test_a_store_down_lets_the_next_resolver_answer_by_default(
    adapters_dir: Path, cache_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    store = _store(adapters_dir, cache_dir, make_settings())
    for failure in (TransientStoreError("unreachable"), StoreRefusedError("access denied")):
        store.failure = failure
        assert asyncio.run(store.resolve_lora(BASE_MODEL, "other")) is None


def test_a_store_down_can_fail_the_request_instead(
    adapters_dir: Path, cache_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    store = _store(adapters_dir, cache_dir, make_settings(VLLM_LORA_RESOLVER_STORE_DOWN="fail"))
    store.failure = TransientStoreError("unreachable")
    with pytest.raises(StoreUnavailableError, match="unreachable"):
        asyncio.run(store.resolve_lora(BASE_MODEL, "other"))


def test_the_policies_refuse_unknown_values(make_settings: Callable[..., Settings]) -> None:
    with pytest.raises(ConfigurationError, match="VLLM_LORA_RESOLVER_SERVE_STALE"):
        make_settings(VLLM_LORA_RESOLVER_SERVE_STALE="sometimes")
    with pytest.raises(ConfigurationError, match="VLLM_LORA_RESOLVER_STORE_DOWN"):
        make_settings(VLLM_LORA_RESOLVER_STORE_DOWN="retry")


def test_a_cache_link_made_for_another_store_is_not_served(
    tmp_path: Path, cache_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    prod, staging = tmp_path / "prod", tmp_path / "staging"
    staging.mkdir()
    write_lora_adapter(prod / "sql", base_model=BASE_MODEL)
    prod_pod = FilesystemResolver(prod, make_settings(), NodeCache(cache_dir))
    assert prod_pod.resolve(BASE_MODEL, "sql") is not None
    assert (cache_dir / "sql").is_symlink()  # the node-wide link the prod pod made

    # A pod of the staging store on the same node: its own store, and the cache dir (the
    # default layout of lora_fs_resolver, as vLLM's built-in resolver reads it).
    staging_cache = NodeCache(cache_dir)
    staging_pod = FilesystemResolver(staging, make_settings(), staging_cache)
    over_cache = FilesystemResolver(cache_dir, make_settings(), staging_cache)
    assert staging_pod.resolve(BASE_MODEL, "sql") is None
    assert over_cache.resolve(BASE_MODEL, "sql") is None


def test_the_current_version_is_never_a_cached_one_while_the_store_cannot_answer(
    adapters_dir: Path, cache_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    store = _store(adapters_dir, cache_dir, make_settings())
    assert store.resolve(BASE_MODEL, "sql") is not None
    store.failure = TransientStoreError("connection reset")
    assert store.resolve(BASE_MODEL, "sql") is not None  # a server serves the cached copy
    with pytest.raises(StoreUnavailableError):
        store.current(BASE_MODEL, "sql")  # what `vllm-lora sync` asks: no stale answer
