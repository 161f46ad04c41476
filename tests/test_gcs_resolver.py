"""The GCS resolver against fake-gcs-server on loopback, through a fault relay."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from conftest import BASE_MODEL, files_of
from gcs_fixtures import GcsBucket
from resolver_setup import fast_transfer

from devtools.models import write_lora_adapter
from devtools.relay import Fault
from vllm_lora_resolvers.backends.gcs import GcsStore, parse_gcs_uri
from vllm_lora_resolvers.config import ConfigurationError
from vllm_lora_resolvers.errors import StoreUnavailableError


def media_requests(bucket: GcsBucket) -> list[str]:
    return [path for _, path in bucket.requests("GET") if "alt=media" in path]


def test_cache_hit_costs_one_listing(
    gcs_bucket: GcsBucket, tmp_path: Path, cache_dir: Path
) -> None:
    gcs_bucket.upload("sql", write_lora_adapter(tmp_path / "sql", base_model=BASE_MODEL))
    resolver = gcs_bucket.resolver(cache_dir)
    first = resolver.resolve(BASE_MODEL, "sql")
    gcs_bucket.relay.reset_counters()
    assert resolver.resolve(BASE_MODEL, "sql") == first
    assert len(gcs_bucket.requests()) == 1
    assert media_requests(gcs_bucket) == []


def test_update_is_fetched_as_a_new_generation(
    gcs_bucket: GcsBucket, tmp_path: Path, cache_dir: Path
) -> None:
    gcs_bucket.upload("sql", write_lora_adapter(tmp_path / "v1", base_model=BASE_MODEL, seed=1))
    resolver = gcs_bucket.resolver(cache_dir, fast_transfer(8192))
    first = resolver.resolve(BASE_MODEL, "sql")
    v2 = write_lora_adapter(tmp_path / "v2", base_model=BASE_MODEL, seed=2)
    gcs_bucket.upload("sql", v2)
    second = resolver.resolve(BASE_MODEL, "sql")
    assert first is not None and second is not None
    assert second.path != first.path and first.path.exists()
    assert files_of(second.path) == files_of(v2)
    assert all("generation=" in path for path in media_requests(gcs_bucket))


def test_missing_bucket_is_explained(gcs_bucket: GcsBucket, cache_dir: Path) -> None:
    gcs_bucket.name = "no-such-bucket-here"
    with pytest.raises(StoreUnavailableError, match="does not exist"):
        gcs_bucket.resolver(cache_dir).resolve(BASE_MODEL, "sql")


@pytest.mark.parametrize("uri", ["bucket", "gs://", "gs://B", "s3://bucket"])
def test_bad_gcs_uri_is_a_configuration_error(uri: str) -> None:
    with pytest.raises(ConfigurationError, match="VLLM_LORA_RESOLVER_GCS_URI"):
        parse_gcs_uri(uri)


def test_gcs_uri_parsing() -> None:
    assert parse_gcs_uri("gs://bucket/a/b/") == ("bucket", "a/b")
    assert parse_gcs_uri("gs://bucket") == ("bucket", "")


def test_the_lookup_lists_only_the_key_range_of_the_adapter_files(
    gcs_bucket: GcsBucket, tmp_path: Path, cache_dir: Path
) -> None:
    # fake-gcs-server stalls under the thousand uploads the S3 test makes; the range is what
    # keeps a folder of any size to one listing, so the test checks the range is asked for.
    bucket = gcs_bucket.client.bucket(gcs_bucket.name)
    for clutter in ("0001/checkpoint", "README.md", "adapter_config.json.bak", "zz/logs"):
        bucket.blob(f"adapters/sql/{clutter}").upload_from_string(b"x")
    gcs_bucket.upload("sql", write_lora_adapter(tmp_path / "sql", base_model=BASE_MODEL))
    gcs_bucket.relay.reset_counters()
    found = gcs_bucket.resolver(cache_dir).store.locate("sql")
    assert found is not None
    assert [file.path for file in found.files] == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    [listing] = [path for _, path in gcs_bucket.requests("GET") if "/o?" in path]
    assert "startOffset=adapters%2Fsql%2Fadapter_config.json" in listing
    assert "endOffset=adapters%2Fsql%2Fadapter_n" in listing


def test_a_generation_is_url_encoded_into_the_media_url(
    gcs_bucket: GcsBucket, cache_dir: Path
) -> None:
    store = gcs_bucket.resolver(cache_dir).store
    assert isinstance(store, GcsStore)
    url = store._media_url("adapters/sql/adapter_model.safetensors", "1&userProject=x")
    assert url.endswith(
        "/o/adapters%2Fsql%2Fadapter_model.safetensors?alt=media&generation=1%26userProject%3Dx"
    )


def test_reads_at_once_keep_their_connections(
    gcs_bucket: GcsBucket, tmp_path: Path, cache_dir: Path
) -> None:
    # 16 reads at once, more than the 10 connections requests keeps per host by default: each
    # read past the tenth opened a connection (a TLS handshake with GCS) for every file again.
    source = write_lora_adapter(tmp_path / "sql", base_model=BASE_MODEL)
    gcs_bucket.upload("sql", source)
    size = (source / "adapter_model.safetensors").stat().st_size
    transfer = dataclasses.replace(fast_transfer(-(-size // 16)), parts_in_flight=16)
    store = gcs_bucket.resolver(cache_dir, transfer).store
    remote = store.locate("sql")
    assert remote is not None
    weights = remote.file("adapter_model.safetensors")
    assert weights is not None
    # Every part waits at the relay, so that all 16 are under way at once.
    gcs_bucket.relay.add_fault(Fault("delay", path_contains="alt=media", seconds=0.5, times=32))
    store.download(remote, weights, tmp_path / "first")
    opened = gcs_bucket.relay.connections
    assert opened >= 16
    store.download(remote, weights, tmp_path / "second")
    assert gcs_bucket.relay.connections == opened
