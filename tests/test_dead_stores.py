"""A store that accepts connections and never answers (a black hole), for every remote store:
a request for a cached adapter gets the cached copy, one for any other name an error or the next
resolver, in seconds; the figures themselves are measured by ``python -m bench outage``."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import BASE_MODEL
from gcs_fixtures import GcsBucket
from hf_fixtures import REPO_ID, Hub, hub_fixture  # noqa: F401 - the fixture
from s3_fixtures import Bucket

from devtools.models import write_lora_adapter
from devtools.relay import Fault, FaultRelay
from vllm_lora_resolvers.errors import TransientStoreError
from vllm_lora_resolvers.resolver import BaseStorageResolver

BLACK_HOLE = Fault("delay", seconds=3600, times=1_000_000)
#: What "seconds, never minutes" means here: several times the ~3 s a lookup may cost.
BOUND_SECONDS = 10.0


def _a_dead_store_costs_seconds(
    relay: FaultRelay, new_resolver: Callable[[], BaseStorageResolver], name: str
) -> None:
    cached = new_resolver().resolve(BASE_MODEL, name)
    assert cached is not None
    relay.add_fault(BLACK_HOLE)

    resolver = new_resolver()  # a server started during the outage: nothing remembered
    started = time.monotonic()
    stale = resolver.resolve(BASE_MODEL, name)
    assert time.monotonic() - started < BOUND_SECONDS
    assert stale is not None and stale.path == cached.path

    started = time.monotonic()
    with pytest.raises(TransientStoreError):
        new_resolver().resolve(BASE_MODEL, name + "-never-uploaded")
    assert time.monotonic() - started < BOUND_SECONDS


def test_a_black_holed_s3_store_costs_a_request_seconds(
    bucket: Bucket, tmp_path: Path, cache_dir: Path
) -> None:
    bucket.upload("sql", write_lora_adapter(tmp_path / "sql", base_model=BASE_MODEL))
    _a_dead_store_costs_seconds(bucket.relay, lambda: bucket.resolver(cache_dir), "sql")


def test_a_black_holed_gcs_store_costs_a_request_seconds(
    gcs_bucket: GcsBucket, tmp_path: Path, cache_dir: Path
) -> None:
    gcs_bucket.upload("sql", write_lora_adapter(tmp_path / "sql", base_model=BASE_MODEL))
    _a_dead_store_costs_seconds(gcs_bucket.relay, lambda: gcs_bucket.resolver(cache_dir), "sql")


def test_a_black_holed_hub_costs_a_request_seconds(
    hub: Hub, tmp_path: Path, cache_dir: Path
) -> None:
    hub.server.push(REPO_ID, {"sql": write_lora_adapter(tmp_path / "sql", base_model=BASE_MODEL)})
    _a_dead_store_costs_seconds(hub.relay, lambda: hub.resolver(cache_dir), f"{REPO_ID}/sql")
