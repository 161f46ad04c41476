"""The GCS resolver against fake-gcs-server on loopback, through a fault relay."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import BASE_MODEL, REPO, files_of, snapshot_dirs, staging_entries
from gcs_fixtures import GcsBucket
from quick_transfer import fast_transfer

from devtools.models import write_large_adapter, write_lora_adapter
from devtools.relay import Fault
from vllm_lora_resolvers.backends.gcs import parse_gcs_uri
from vllm_lora_resolvers.config import ConfigurationError
from vllm_lora_resolvers.errors import InvalidAdapterError, StoreUnavailableError


def media_requests(bucket: GcsBucket) -> list[str]:
    return [path for _, path in bucket.requests("GET") if "alt=media" in path]


def test_resolves_an_adapter_from_the_bucket(
    gcs_bucket: GcsBucket, tmp_path: Path, cache_dir: Path
) -> None:
    source = write_lora_adapter(tmp_path / "sql", base_model=BASE_MODEL)
    gcs_bucket.upload("sql", source)
    resolved = gcs_bucket.resolver(cache_dir).resolve(BASE_MODEL, "sql")
    assert resolved is not None
    assert files_of(resolved.path) == files_of(source)
    assert (cache_dir / "sql").resolve() == resolved.path.resolve()


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


def test_absent_adapter_is_not_found_and_remembered(gcs_bucket: GcsBucket, cache_dir: Path) -> None:
    resolver = gcs_bucket.resolver(cache_dir)
    for _ in range(1000):
        assert resolver.resolve(BASE_MODEL, "absent") is None
    listings = [path for _, path in gcs_bucket.requests() if "/o?" in path]
    assert len(listings) == 1


def test_hostile_names_never_reach_the_store(gcs_bucket: GcsBucket, cache_dir: Path) -> None:
    resolver = gcs_bucket.resolver(cache_dir)
    for name in ("../x", "a/../../b", "/etc", "%2e%2e", "x" * 10_000):
        assert resolver.resolve(BASE_MODEL, name) is None
    assert gcs_bucket.requests() == []


def test_invalid_adapter_is_refused_before_its_weights_are_downloaded(
    gcs_bucket: GcsBucket, tmp_path: Path, cache_dir: Path
) -> None:
    gcs_bucket.upload("big", write_lora_adapter(tmp_path / "big", base_model=BASE_MODEL, rank=64))
    with pytest.raises(InvalidAdapterError, match="rank 64"):
        gcs_bucket.resolver(cache_dir).resolve(BASE_MODEL, "big")
    assert not any("adapter_model" in path for path in media_requests(gcs_bucket))
    assert snapshot_dirs(cache_dir) == []


def test_503_on_listing_and_download_is_retried(
    gcs_bucket: GcsBucket, tmp_path: Path, cache_dir: Path
) -> None:
    source = write_lora_adapter(tmp_path / "sql", base_model=BASE_MODEL)
    gcs_bucket.upload("sql", source)
    gcs_bucket.relay.add_fault(Fault("status", path_contains="/o?", times=1))
    gcs_bucket.relay.add_fault(Fault("status", path_contains="alt=media", times=2))
    resolved = gcs_bucket.resolver(cache_dir).resolve(BASE_MODEL, "sql")
    assert resolved is not None
    assert files_of(resolved.path) == files_of(source)


def test_reset_mid_body_resumes_and_truncation_is_refetched(
    gcs_bucket: GcsBucket, tmp_path: Path, cache_dir: Path
) -> None:
    source = write_large_adapter(tmp_path / "big", base_model=BASE_MODEL, size_bytes=24 << 20)
    gcs_bucket.upload("big", source)
    weights = (source / "adapter_model.safetensors").stat().st_size
    gcs_bucket.relay.add_fault(
        Fault("reset_after", path_contains="adapter_model", times=1, after_bytes=3 << 20)
    )
    gcs_bucket.relay.add_fault(
        Fault("close_after", path_contains="adapter_model", times=1, after_bytes=2 << 20)
    )
    resolved = gcs_bucket.resolver(cache_dir, VLLM_LORA_RESOLVER_MAX_RANK="1000000").resolve(
        BASE_MODEL, "big"
    )
    assert resolved is not None
    assert files_of(resolved.path) == files_of(source)
    assert gcs_bucket.relay.response_body_bytes < weights + 2 * (4 << 20)


def test_persistent_failure_gives_a_clear_error_and_no_snapshot(
    gcs_bucket: GcsBucket, tmp_path: Path, cache_dir: Path
) -> None:
    gcs_bucket.upload("sql", write_lora_adapter(tmp_path / "sql", base_model=BASE_MODEL))
    gcs_bucket.relay.add_fault(Fault("status", path_contains="alt=media", times=10_000))
    with pytest.raises(StoreUnavailableError, match="gs://"):
        gcs_bucket.resolver(cache_dir).resolve(BASE_MODEL, "sql")
    assert snapshot_dirs(cache_dir) == []
    assert staging_entries(cache_dir) == []


def test_unreachable_store_serves_the_cached_snapshot(
    gcs_bucket: GcsBucket, tmp_path: Path, cache_dir: Path
) -> None:
    gcs_bucket.upload("sql", write_lora_adapter(tmp_path / "sql", base_model=BASE_MODEL))
    first = gcs_bucket.resolver(cache_dir).resolve(BASE_MODEL, "sql")
    gcs_bucket.relay.add_fault(Fault("status", times=10_000))
    again = gcs_bucket.resolver(cache_dir).resolve(BASE_MODEL, "sql")
    assert first is not None and again is not None and again.path == first.path


def test_missing_bucket_is_explained(gcs_bucket: GcsBucket, cache_dir: Path) -> None:
    gcs_bucket.name = "no-such-bucket-here"
    with pytest.raises(StoreUnavailableError, match="does not exist"):
        gcs_bucket.resolver(cache_dir).resolve(BASE_MODEL, "sql")


async def test_32_coroutines_asking_for_one_new_adapter_fetch_each_byte_once(
    gcs_bucket: GcsBucket, tmp_path: Path, cache_dir: Path
) -> None:
    pytest.importorskip("vllm")
    source = write_lora_adapter(tmp_path / "sql", base_model=BASE_MODEL, rank=16)
    gcs_bucket.upload("sql", source)
    resolver = gcs_bucket.resolver(cache_dir)
    requests = await asyncio.gather(*(resolver.resolve_lora(BASE_MODEL, "sql") for _ in range(32)))
    assert len({request.lora_path for request in requests if request}) == 1
    assert len([p for p in media_requests(gcs_bucket) if "adapter_model" in p]) == 1


def gcs_worker(bucket: GcsBucket, cache_dir: Path, *arguments: str) -> subprocess.Popen[str]:
    command = [sys.executable, str(REPO / "tests" / "workers" / "resolve_remote.py"), "gcs"]
    return subprocess.Popen(
        [*command, bucket.uri, str(cache_dir), *arguments],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}"},
    )


def test_eight_processes_fetch_a_new_adapter_once(
    gcs_bucket: GcsBucket, tmp_path: Path, cache_dir: Path
) -> None:
    source = write_large_adapter(tmp_path / "big", base_model=BASE_MODEL, size_bytes=8 << 20)
    gcs_bucket.upload("big", source)
    start_at = str(time.time() + 3.0)
    workers = [gcs_worker(gcs_bucket, cache_dir, "big", "--start-at", start_at) for _ in range(8)]
    outputs = [worker.communicate(timeout=120)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0] * 8
    assert len(set(outputs)) == 1
    weights = [p for p in media_requests(gcs_bucket) if "adapter_model" in p]
    assert len(weights) == 1  # one part, one process
    assert len(snapshot_dirs(cache_dir)) == 1


def test_killed_mid_download_leaves_no_debris_after_the_next_resolve(
    gcs_bucket: GcsBucket, tmp_path: Path, cache_dir: Path
) -> None:
    source = write_large_adapter(tmp_path / "big", base_model=BASE_MODEL, size_bytes=8 << 20)
    gcs_bucket.upload("big", source)
    gcs_bucket.relay.add_fault(Fault("delay", path_contains="adapter_model", times=100, seconds=5))
    worker = gcs_worker(gcs_bucket, cache_dir, "big")
    staging = cache_dir / ".vllm-lora" / "staging"
    deadline = time.time() + 60
    while not (staging.is_dir() and list(staging.glob("*/adapter/adapter_model*"))):
        assert time.time() < deadline, "the worker never started downloading"
        time.sleep(0.05)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    assert snapshot_dirs(cache_dir) == []
    gcs_bucket.relay.clear_faults()
    resolved = gcs_bucket.resolver(cache_dir, VLLM_LORA_RESOLVER_MAX_RANK="1000000").resolve(
        BASE_MODEL, "big"
    )
    assert resolved is not None
    assert files_of(resolved.path) == files_of(source)
    assert staging_entries(cache_dir) == []


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
    found = gcs_bucket.resolver(cache_dir).locate("sql")
    assert found is not None
    assert [file.path for file in found.files] == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    [listing] = [path for _, path in gcs_bucket.requests("GET") if "/o?" in path]
    assert "startOffset=adapters%2Fsql%2Fadapter_config.json" in listing
    assert "endOffset=adapters%2Fsql%2Fadapter_n" in listing
