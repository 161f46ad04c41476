"""Signed adapters on every store of the store contract (tests/contract_stores.py): each store's
lookup finds ``model.sig`` beside the adapter's files, and the pipeline serves a signed adapter
and refuses an unsigned or tampered one, through the store's real client against its real server
on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import BASE_MODEL, files_of, snapshot_dirs
from contract_stores import Capability, StoreUnderTest, store_fixture  # noqa: F401 - the fixture
from hf_fixtures import hub_fixture  # noqa: F401 - the fixture, for the Hub store
from resolver_setup import fast_transfer
from signing_support import (  # noqa: F401 - keys_fixture: the fixture
    SIGNATURE,
    KeyPair,
    keys_fixture,
    sign_with_key,
)

from devtools.models import write_large_adapter, write_lora_adapter
from devtools.relay import Fault
from vllm_lora_resolvers import metrics
from vllm_lora_resolvers.errors import SignatureError

WEIGHTS = "adapter_model.safetensors"


def put_signed(store: StoreUnderTest, tmp_path: Path, short: str, keys: KeyPair) -> Path:
    folder = write_lora_adapter(tmp_path / "sources" / short, base_model=BASE_MODEL)
    sign_with_key(folder, keys)
    store.put(short, folder)
    return folder


def test_a_signed_adapter_is_served_with_its_signature(
    store: StoreUnderTest, tmp_path: Path, cache_dir: Path, keys: KeyPair
) -> None:
    source = put_signed(store, tmp_path, "sql", keys)
    resolver = store.resolver(cache_dir, VLLM_LORA_RESOLVER_TRUST=keys.trust)
    resolved = resolver.resolve(BASE_MODEL, store.name("sql"))
    assert resolved is not None
    assert files_of(resolved.path) == files_of(source)
    assert resolved.snapshot.manifest.trust == resolver.trust.fingerprint  # type: ignore[union-attr]
    store.reset_counters()
    assert resolver.resolve(BASE_MODEL, store.name("sql")) == resolved  # a hit
    assert store.weights_reads() == []


def test_a_signed_adapter_whose_parts_resumed_midway_is_checked_on_its_bytes(
    store: StoreUnderTest, tmp_path: Path, cache_dir: Path, keys: KeyPair
) -> None:
    """The SHA-256 the signature is checked against is computed while the weights download, in
    ranged parts that break and resume where they broke: it is that of the bytes served."""
    store.require(Capability.FAULTS)
    store.require(Capability.RANGES)
    folder = write_large_adapter(
        tmp_path / "sources" / "big", base_model=BASE_MODEL, size_bytes=1 << 20
    )
    sign_with_key(folder, keys)
    store.put("big", folder)
    store.add_fault(
        Fault(
            "reset_after",
            method="GET",
            path_contains="adapter_model",
            after_bytes=100_000,
            times=3,
        )
    )
    resolver = store.resolver(
        cache_dir,
        transfer=fast_transfer(256 << 10),
        VLLM_LORA_RESOLVER_TRUST=keys.trust,
        VLLM_LORA_RESOLVER_MAX_RANK="1000000",
    )
    resolved = resolver.resolve(BASE_MODEL, store.name("big"))
    assert resolved is not None
    assert files_of(resolved.path) == files_of(folder)
    assert len(store.weights_reads()) >= 4 + 2  # 4 parts, resumed


def test_an_unsigned_adapter_is_refused_without_reading_its_weights(
    store: StoreUnderTest, tmp_path: Path, cache_dir: Path, keys: KeyPair
) -> None:
    store.put("sql", write_lora_adapter(tmp_path / "sql", base_model=BASE_MODEL))
    resolver = store.resolver(cache_dir, VLLM_LORA_RESOLVER_TRUST=keys.trust)
    before = metrics.RESOLUTIONS.labels(store.backend, "untrusted")._value.get()
    store.reset_counters()
    with pytest.raises(SignatureError, match="is not signed"):
        resolver.resolve(BASE_MODEL, store.name("sql"))
    assert metrics.RESOLUTIONS.labels(store.backend, "untrusted")._value.get() == before + 1
    assert store.weights_reads() == []
    assert snapshot_dirs(cache_dir) == []


def test_a_byte_changed_in_the_store_after_signing_is_refused(
    store: StoreUnderTest, tmp_path: Path, cache_dir: Path, keys: KeyPair
) -> None:
    folder = write_lora_adapter(tmp_path / "sources" / "sql", base_model=BASE_MODEL)
    sign_with_key(folder, keys)
    weights = bytearray((folder / WEIGHTS).read_bytes())
    weights[-1] ^= 1
    (folder / WEIGHTS).write_bytes(bytes(weights))
    store.put("sql", folder)
    resolver = store.resolver(cache_dir, VLLM_LORA_RESOLVER_TRUST=keys.trust)
    with pytest.raises(SignatureError, match=f"{WEIGHTS} changed after it was signed"):
        resolver.resolve(BASE_MODEL, store.name("sql"))
    assert snapshot_dirs(cache_dir) == []
    assert SIGNATURE in files_of(folder)
