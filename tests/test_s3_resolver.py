"""The S3 resolver against real S3 servers on loopback (SeaweedFS, moto), through a fault relay."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import BASE_MODEL, REPO, files_of, snapshot_dirs, staging_entries
from quick_transfer import fast_transfer
from s3_fixtures import Bucket

from devtools.models import write_large_adapter, write_lora_adapter
from devtools.relay import Fault
from vllm_lora_resolvers import metrics
from vllm_lora_resolvers.backends.s3 import S3Resolver, head_checksums, parse_s3_uri
from vllm_lora_resolvers.config import ConfigurationError
from vllm_lora_resolvers.errors import (
    InvalidAdapterError,
    StoreUnavailableError,
    TransientStoreError,
)


def test_resolves_an_adapter_from_the_bucket(
    any_bucket: Bucket, tmp_path: Path, cache_dir: Path
) -> None:
    source = write_lora_adapter(tmp_path / "sql", base_model=BASE_MODEL)
    any_bucket.upload("sql", source)
    resolved = any_bucket.resolver(cache_dir).resolve(BASE_MODEL, "sql")
    assert resolved is not None
    assert files_of(resolved.path) == files_of(source)
    assert (cache_dir / "sql").resolve() == resolved.path.resolve()


def test_cache_hit_costs_one_listing_and_no_download(
    bucket: Bucket, tmp_path: Path, cache_dir: Path
) -> None:
    bucket.upload("sql", write_lora_adapter(tmp_path / "sql", base_model=BASE_MODEL))
    resolver = bucket.resolver(cache_dir)
    first = resolver.resolve(BASE_MODEL, "sql")
    bucket.relay.reset_counters()
    assert resolver.resolve(BASE_MODEL, "sql") == first
    assert [method for method, _ in bucket.requests()] == ["GET"]
    assert "list-type=2" in bucket.requests()[0][1]


def put_empty_objects(bucket: Bucket, keys: list[str]) -> None:
    """Create ``keys`` straight on the server (not through the relay, whose counts stay clean)."""
    client = bucket.endpoint.client()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: client.put_object(Bucket=bucket.name, Key=key, Body=b""), keys))


def test_an_adapter_folder_cluttered_with_thousands_of_entries_is_found_in_two_listings(
    bucket: Bucket, tmp_path: Path, cache_dir: Path
) -> None:
    source = write_lora_adapter(tmp_path / "sql", base_model=BASE_MODEL)
    bucket.upload("sql", source)
    folder = "adapters/sql"
    # Numbered checkpoints sort before adapter_config.json and filled the first listing page;
    # backups sort between the config and the weights, so a second page is needed for those.
    put_empty_objects(
        bucket, [f"{folder}/{step:04d}/adapter_model.safetensors" for step in range(1001)]
    )
    put_empty_objects(bucket, [f"{folder}/adapter_config.json.{step:04d}" for step in range(1001)])
    resolved = bucket.resolver(cache_dir).resolve(BASE_MODEL, "sql")
    assert resolved is not None
    assert files_of(resolved.path) == files_of(source)
    listings = [path for _, path in bucket.requests("GET") if "list-type=2" in path]
    assert len(listings) == 2


def test_absent_adapter_and_absent_config_are_not_found(
    bucket: Bucket, tmp_path: Path, cache_dir: Path
) -> None:
    folder = write_lora_adapter(tmp_path / "noconfig", base_model=BASE_MODEL)
    (folder / "adapter_config.json").unlink()
    bucket.upload("noconfig", folder)
    resolver = bucket.resolver(cache_dir)
    assert resolver.resolve(BASE_MODEL, "absent") is None
    assert resolver.resolve(BASE_MODEL, "noconfig") is None


def test_nested_adapter_names_map_to_nested_folders(
    bucket: Bucket, tmp_path: Path, cache_dir: Path
) -> None:
    bucket.upload("team/sql", write_lora_adapter(tmp_path / "sql", base_model=BASE_MODEL))
    resolved = bucket.resolver(cache_dir).resolve(BASE_MODEL, "team/sql")
    assert resolved is not None
    assert (cache_dir / "team" / "sql").resolve() == resolved.path.resolve()


def test_update_in_bucket_is_fetched_as_a_new_version_and_the_old_one_stays(
    bucket: Bucket, tmp_path: Path, cache_dir: Path
) -> None:
    bucket.upload("sql", write_lora_adapter(tmp_path / "v1", base_model=BASE_MODEL, seed=1))
    resolver = bucket.resolver(cache_dir)
    first = resolver.resolve(BASE_MODEL, "sql")
    v2 = write_lora_adapter(tmp_path / "v2", base_model=BASE_MODEL, seed=2)
    bucket.upload("sql", v2)
    second = resolver.resolve(BASE_MODEL, "sql")
    assert first is not None and second is not None
    assert second.path != first.path
    assert files_of(second.path) == files_of(v2)
    assert first.path.exists()  # still leased by this process
    assert (cache_dir / "sql").resolve() == second.path.resolve()


def test_versioned_bucket_reads_every_part_from_the_listed_version(
    bucket: Bucket, tmp_path: Path, cache_dir: Path
) -> None:
    client = bucket.endpoint.client()
    client.put_bucket_versioning(Bucket=bucket.name, VersioningConfiguration={"Status": "Enabled"})
    bucket.upload("sql", write_lora_adapter(tmp_path / "v1", base_model=BASE_MODEL, seed=1))
    resolver = bucket.resolver(cache_dir, fast_transfer(8192))
    first = resolver.resolve(BASE_MODEL, "sql")
    v2 = write_lora_adapter(tmp_path / "v2", base_model=BASE_MODEL, seed=2)
    bucket.upload("sql", v2)
    second = resolver.resolve(BASE_MODEL, "sql")
    assert first is not None and second is not None
    assert files_of(first.path) != files_of(second.path)
    assert files_of(second.path) == files_of(v2)
    parts = [path for _, path in bucket.requests("GET") if "adapter_model" in path]
    assert len(parts) >= 8
    assert all("versionId=" in path for path in parts)


def test_deleted_adapter_is_no_longer_found_by_name(
    bucket: Bucket, tmp_path: Path, cache_dir: Path
) -> None:
    bucket.upload("sql", write_lora_adapter(tmp_path / "sql", base_model=BASE_MODEL))
    resolver = bucket.resolver(cache_dir)
    served = resolver.resolve(BASE_MODEL, "sql")
    bucket.delete("sql")
    assert resolver.resolve(BASE_MODEL, "sql") is None
    assert not os.path.lexists(cache_dir / "sql")  # vLLM's own resolver must not find it
    assert served is not None and served.path.exists()  # but what was handed out stays


def test_invalid_adapter_is_refused_before_its_weights_are_downloaded(
    bucket: Bucket, tmp_path: Path, cache_dir: Path
) -> None:
    bucket.upload("big", write_lora_adapter(tmp_path / "big", base_model=BASE_MODEL, rank=64))
    with pytest.raises(InvalidAdapterError, match="rank 64 is above this server's limit of 16"):
        bucket.resolver(cache_dir).resolve(BASE_MODEL, "big")
    downloaded = [path for _, path in bucket.requests() if "adapter_model" in path]
    assert downloaded == []
    assert snapshot_dirs(cache_dir) == []
    assert staging_entries(cache_dir) == []


def test_hostile_names_never_reach_the_store(
    bucket: Bucket, tmp_path: Path, cache_dir: Path
) -> None:
    resolver = bucket.resolver(cache_dir)
    for name in ("../adapters2/x", "a/../../b", "/etc", "%2e%2e", "a\\b", "x" * 10_000, ""):
        assert resolver.resolve(BASE_MODEL, name) is None
    assert bucket.requests() == []


def test_names_of_other_stores_are_missing_here_not_rejected(
    bucket: Bucket, tmp_path: Path, cache_dir: Path
) -> None:
    resolver = bucket.resolver(cache_dir)
    missing = metrics.RESOLUTIONS.labels("s3", "missing")._value.get()
    rejected = metrics.RESOLUTIONS.labels("s3", "rejected")._value.get()
    # The Hub's pinned names whose revision no bucket version can be (NAME@VERSION is one segment)
    for name in ("acme/adapters/sql@refs/pr/1", "acme/adapters@release/v2"):
        assert resolver.resolve(BASE_MODEL, name) is None
    assert metrics.RESOLUTIONS.labels("s3", "missing")._value.get() == missing + 2
    assert metrics.RESOLUTIONS.labels("s3", "rejected")._value.get() == rejected
    assert bucket.requests() == []


def test_miss_storm_costs_one_listing_per_ttl(
    bucket: Bucket, tmp_path: Path, cache_dir: Path
) -> None:
    resolver = bucket.resolver(cache_dir)
    for _ in range(1000):
        assert resolver.resolve(BASE_MODEL, "absent") is None
    assert len(bucket.requests()) == 1


async def test_concurrent_coroutines_for_one_absent_name_cost_one_listing(
    bucket: Bucket, cache_dir: Path
) -> None:
    resolver = bucket.resolver(cache_dir)
    answers = await asyncio.gather(
        *(resolver.resolve_lora(BASE_MODEL, "absent") for _ in range(32))
    )
    assert answers == [None] * 32
    assert len(bucket.requests()) == 1


async def test_32_coroutines_asking_for_one_new_adapter_fetch_each_byte_once(
    bucket: Bucket, tmp_path: Path, cache_dir: Path
) -> None:
    pytest.importorskip("vllm")
    source = write_lora_adapter(tmp_path / "sql", base_model=BASE_MODEL, rank=16)
    bucket.upload("sql", source)
    size = sum(path.stat().st_size for path in source.iterdir())
    resolver = bucket.resolver(cache_dir)
    bucket.relay.reset_counters()
    requests = await asyncio.gather(*(resolver.resolve_lora(BASE_MODEL, "sql") for _ in range(32)))
    assert len({request.lora_path for request in requests if request}) == 1
    listing_bytes = 4096 * len(bucket.requests("GET"))  # generous bound for listing XML
    assert size <= bucket.relay.response_body_bytes <= size + listing_bytes
    downloads = [path for _, path in bucket.requests("GET") if "adapter_model" in path]
    assert len(downloads) == 1


def weights_being_downloaded(cache_dir: Path) -> bool:
    staging = cache_dir / ".vllm-lora" / "staging"
    return staging.is_dir() and any(
        path.name.startswith("adapter_model") for path in staging.glob("*/adapter/*")
    )


def s3_worker(bucket: Bucket, cache_dir: Path, *arguments: str) -> subprocess.Popen[str]:
    command = [
        sys.executable,
        str(REPO / "tests" / "workers" / "resolve_remote.py"),
        "s3",
        bucket.uri,
        str(cache_dir),
        *arguments,
    ]
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}"},
    )


def test_eight_processes_fetch_a_new_adapter_from_the_store_once(
    bucket: Bucket, tmp_path: Path, cache_dir: Path
) -> None:
    source = write_large_adapter(tmp_path / "big", base_model=BASE_MODEL, size_bytes=8 << 20)
    bucket.upload("big", source)
    size = sum(path.stat().st_size for path in source.iterdir())
    start_at = str(time.time() + 3.0)
    workers = [s3_worker(bucket, cache_dir, "big", "--start-at", start_at) for _ in range(8)]
    outputs = [worker.communicate(timeout=120)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0] * 8
    assert len(set(outputs)) == 1  # eight identical answers: one path
    downloads = [path for _, path in bucket.requests("GET") if "adapter_model" in path]
    assert bucket.relay.response_body_bytes < size + 64 * 1024 * len(bucket.requests())
    assert len([p for p in downloads if "versionId" not in p]) >= 1
    assert len(snapshot_dirs(cache_dir)) == 1


def test_killed_mid_download_leaves_no_debris_after_the_next_resolve(
    bucket: Bucket, tmp_path: Path, cache_dir: Path
) -> None:
    source = write_large_adapter(tmp_path / "big", base_model=BASE_MODEL, size_bytes=32 << 20)
    bucket.upload("big", source)
    bucket.relay.add_fault(
        Fault("delay", method="GET", path_contains="adapter_model", times=100, seconds=5)
    )
    worker = s3_worker(bucket, cache_dir, "big")
    deadline = time.time() + 60
    while not weights_being_downloaded(cache_dir):
        assert time.time() < deadline, "the worker never started downloading"
        time.sleep(0.05)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    assert snapshot_dirs(cache_dir) == []
    assert not os.path.lexists(cache_dir / "big")

    bucket.relay.clear_faults()
    resolved = bucket.resolver(cache_dir, VLLM_LORA_RESOLVER_MAX_RANK="1000000").resolve(
        BASE_MODEL, "big"
    )
    assert resolved is not None
    assert files_of(resolved.path) == files_of(source)
    assert staging_entries(cache_dir) == []


def test_throttling_on_listing_is_retried(bucket: Bucket, tmp_path: Path, cache_dir: Path) -> None:
    bucket.upload("sql", write_lora_adapter(tmp_path / "sql", base_model=BASE_MODEL))
    bucket.relay.add_fault(Fault("status", method="GET", path_contains="list-type", times=2))
    assert bucket.resolver(cache_dir).resolve(BASE_MODEL, "sql") is not None
    listings = [path for _, path in bucket.requests("GET") if "list-type" in path]
    assert len(listings) == 3


def test_5xx_on_download_is_retried(bucket: Bucket, tmp_path: Path, cache_dir: Path) -> None:
    source = write_lora_adapter(tmp_path / "sql", base_model=BASE_MODEL)
    bucket.upload("sql", source)
    bucket.relay.add_fault(
        Fault(
            "status",
            method="GET",
            path_contains="adapter_model",
            times=2,
            status=500,
            code="InternalError",
        )
    )
    resolved = bucket.resolver(cache_dir).resolve(BASE_MODEL, "sql")
    assert resolved is not None
    assert files_of(resolved.path) == files_of(source)


def test_reset_mid_part_resumes_without_refetching_finished_parts(
    bucket: Bucket, tmp_path: Path, cache_dir: Path
) -> None:
    source = write_large_adapter(tmp_path / "big", base_model=BASE_MODEL, size_bytes=64 << 20)
    bucket.upload("big", source)
    weights = (source / "adapter_model.safetensors").stat().st_size
    bucket.relay.add_fault(
        Fault(
            "reset_after", method="GET", path_contains="adapter_model", times=2, after_bytes=4 << 20
        )
    )
    resolver = bucket.resolver(cache_dir, VLLM_LORA_RESOLVER_MAX_RANK="1000000")
    resolved = resolver.resolve(BASE_MODEL, "big")
    assert resolved is not None
    assert files_of(resolved.path) == files_of(source)
    # A broken part resumes where it broke: what is fetched twice is at most what was in
    # flight when the connection reset, never a whole 16 MiB part, let alone the file.
    assert bucket.relay.response_body_bytes < weights + 2 * (4 << 20)


def test_truncated_body_is_detected_and_refetched(
    bucket: Bucket, tmp_path: Path, cache_dir: Path
) -> None:
    source = write_lora_adapter(tmp_path / "sql", base_model=BASE_MODEL)
    bucket.upload("sql", source)
    bucket.relay.add_fault(
        Fault("close_after", method="GET", path_contains="adapter_model", times=1, after_bytes=1000)
    )
    resolved = bucket.resolver(cache_dir).resolve(BASE_MODEL, "sql")
    assert resolved is not None
    assert files_of(resolved.path) == files_of(source)


def test_persistent_failure_gives_a_clear_error_and_no_snapshot(
    bucket: Bucket, tmp_path: Path, cache_dir: Path
) -> None:
    bucket.upload("sql", write_lora_adapter(tmp_path / "sql", base_model=BASE_MODEL))
    bucket.relay.add_fault(
        Fault("status", method="GET", path_contains="adapter_model", times=10_000)
    )
    with pytest.raises(TransientStoreError, match=r"adapter_model\.safetensors failed: SlowDown"):
        bucket.resolver(cache_dir).resolve(BASE_MODEL, "sql")
    assert snapshot_dirs(cache_dir) == []
    assert staging_entries(cache_dir) == []
    assert not os.path.lexists(cache_dir / "sql")


def test_unreachable_store_serves_the_cached_snapshot(
    bucket: Bucket, tmp_path: Path, cache_dir: Path
) -> None:
    bucket.upload("sql", write_lora_adapter(tmp_path / "sql", base_model=BASE_MODEL))
    first = bucket.resolver(cache_dir).resolve(BASE_MODEL, "sql")
    bucket.relay.add_fault(Fault("status", times=10_000))
    stale_before = metrics.RESOLUTIONS.labels("s3", "stale")._value.get()
    again = bucket.resolver(cache_dir).resolve(BASE_MODEL, "sql")  # a new server process
    assert again is not None and first is not None
    assert again.path == first.path
    assert metrics.RESOLUTIONS.labels("s3", "stale")._value.get() == stale_before + 1


def test_unreachable_store_with_nothing_cached_is_a_clear_error(
    bucket: Bucket, cache_dir: Path
) -> None:
    bucket.relay.add_fault(Fault("status", times=10_000))
    with pytest.raises(StoreUnavailableError, match="listing s3://"):
        bucket.resolver(cache_dir).resolve(BASE_MODEL, "sql")


def test_refused_credentials_are_explained_without_the_secret(
    bucket: Bucket, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "obviously-fake-wrong-secret")
    with pytest.raises(StoreUnavailableError) as raised:
        bucket.resolver(cache_dir).resolve(BASE_MODEL, "sql")
    assert "credential" in str(raised.value)
    assert "obviously-fake-wrong-secret" not in str(raised.value)


def test_credentials_in_the_endpoint_url_never_reach_the_cache_the_logs_or_errors(
    bucket: Bucket,
    tmp_path: Path,
    cache_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret = "endpoint-s3cret-never-shown"
    endpoint = bucket.relay.url.replace("http://", f"http://user:{secret}@")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    bucket.upload("sql", write_lora_adapter(tmp_path / "sql", base_model=BASE_MODEL))
    ours = logging.getLogger("vllm.lora_resolvers")
    ours.addHandler(caplog.handler)  # vLLM, once imported, stops its loggers propagating
    caplog.set_level(logging.DEBUG, logger=ours.name)
    try:
        resolver = bucket.resolver(cache_dir)
        assert resolver.resolve(BASE_MODEL, "sql") is not None
        bucket.relay.add_fault(Fault("status", times=10_000))
        assert bucket.resolver(cache_dir).resolve(BASE_MODEL, "sql") is not None  # stale
        with pytest.raises(StoreUnavailableError) as raised:
            bucket.resolver(tmp_path / "empty-cache").resolve(BASE_MODEL, "sql")
    finally:
        ours.removeHandler(caplog.handler)
    assert resolver.source == f"{bucket.uri}@{bucket.relay.url}"
    assert "serving cached version" in caplog.text
    assert secret not in caplog.text
    assert secret not in str(raised.value)
    for directory, _, names in os.walk(cache_dir):
        for name in names:
            path = Path(directory, name)
            assert path.is_symlink() or secret.encode() not in path.read_bytes(), path


def test_missing_bucket_is_explained(
    bucket: Bucket, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket.name = "no-such-bucket-here"
    with pytest.raises(StoreUnavailableError, match="bucket does not exist"):
        bucket.resolver(cache_dir).resolve(BASE_MODEL, "sql")


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://bucket", ("bucket", "")),
        ("s3://bucket/", ("bucket", "")),
        ("s3://bucket/a/b/", ("bucket", "a/b")),
    ],
)
def test_s3_uri_parsing(uri: str, expected: tuple[str, str]) -> None:
    assert parse_s3_uri(uri) == expected


@pytest.mark.parametrize("uri", ["bucket", "s3://", "s3://B", "gs://bucket", "s3://a"])
def test_bad_s3_uri_is_a_configuration_error(uri: str) -> None:
    with pytest.raises(ConfigurationError, match="VLLM_LORA_RESOLVER_S3_URI"):
        parse_s3_uri(uri)


def test_etag_is_an_md5_only_when_it_can_be_one() -> None:
    md5 = "0123456789abcdef0123456789abcdef"
    assert head_checksums({"ETag": f'"{md5}"'}) == {"md5": md5}
    assert head_checksums({"ETag": f'"{md5}-3"'}) == {}
    assert head_checksums({"ETag": f'"{md5}"', "ServerSideEncryption": "aws:kms"}) == {}
    assert head_checksums({"ETag": f'"{md5}"', "SSECustomerAlgorithm": "AES256"}) == {}
    assert head_checksums({"ETag": f'"{md5}"', "ServerSideEncryption": "AES256"}) == {"md5": md5}


def test_full_object_checksums_are_verified_and_composites_skipped() -> None:
    sha = "n4bQgYhMfWWaL+qgxVrQFaO/TxsrC4Is0V1sFbDwCgg="
    assert head_checksums({"ChecksumSHA256": sha})["sha256"] == (
        "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    )
    assert head_checksums({"ChecksumCRC32C": "AAAAAA==-2", "ChecksumType": "COMPOSITE"}) == {}


def test_during_an_outage_requests_are_answered_without_waiting_on_the_store(
    bucket: Bucket, tmp_path: Path, cache_dir: Path
) -> None:
    bucket.upload("sql", write_lora_adapter(tmp_path / "sql", base_model=BASE_MODEL))
    resolver = bucket.resolver(cache_dir)
    served = resolver.resolve(BASE_MODEL, "sql")
    bucket.relay.add_fault(Fault("status", times=10_000))
    assert resolver.resolve(BASE_MODEL, "sql") == served
    requests_during_outage = len(bucket.requests())
    for _ in range(20):
        assert resolver.resolve(BASE_MODEL, "sql") == served
    assert len(bucket.requests()) == requests_during_outage


def test_a_refused_version_is_remembered_and_a_new_upload_is_checked_again(
    bucket: Bucket, tmp_path: Path, cache_dir: Path
) -> None:
    bucket.upload("sql", write_lora_adapter(tmp_path / "v1", base_model=BASE_MODEL, rank=64))
    resolver = bucket.resolver(cache_dir)
    for _ in range(3):
        with pytest.raises(InvalidAdapterError, match="rank 64"):
            resolver.resolve(BASE_MODEL, "sql")
    config_reads = [
        path for _, path in bucket.requests("GET") if path.endswith("/adapter_config.json")
    ]
    assert len(config_reads) == 1  # later refusals cost one listing each, no download
    bucket.upload("sql", write_lora_adapter(tmp_path / "v2", base_model=BASE_MODEL, rank=8))
    assert resolver.resolve(BASE_MODEL, "sql") is not None


def test_an_adapter_reuploaded_while_being_fetched_is_served_at_its_new_version(
    any_bucket: Bucket, tmp_path: Path, cache_dir: Path
) -> None:
    any_bucket.upload("sql", write_lora_adapter(tmp_path / "v1", base_model=BASE_MODEL, seed=1))
    v2 = write_lora_adapter(tmp_path / "v2", base_model=BASE_MODEL, seed=2)
    built = any_bucket.resolver(cache_dir)

    class ReuploadedMidFetch(S3Resolver):
        reuploaded = False

        def download(self, adapter, file, destination):  # type: ignore[no-untyped-def]
            if file.path != "adapter_config.json" and not self.reuploaded:
                self.reuploaded = True
                any_bucket.upload("sql", v2)  # between the lookup and the weights download
            return super().download(adapter, file, destination)

    resolver = ReuploadedMidFetch(any_bucket.uri, built.settings, built.cache, built.transfer)
    resolved = resolver.resolve(BASE_MODEL, "sql")
    assert resolver.reuploaded
    assert resolved is not None
    assert files_of(resolved.path) == files_of(v2)
