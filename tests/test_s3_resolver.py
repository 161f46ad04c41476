"""The S3 resolver against real S3 servers on loopback (SeaweedFS, moto), through a fault relay."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import BASE_MODEL, REPO, files_of
from resolver_setup import FAST_TRANSFER, fast_transfer, open_resolver
from s3_fixtures import Bucket

from devtools.models import write_lora_adapter
from devtools.relay import Fault, FaultRelay
from devtools.stores import S3Endpoint
from vllm_lora_resolvers import metrics, stores
from vllm_lora_resolvers.backends.s3 import S3Store, head_checksums, parse_s3_uri
from vllm_lora_resolvers.config import ConfigurationError
from vllm_lora_resolvers.edge import VllmResolver
from vllm_lora_resolvers.errors import (
    StoreUnavailableError,
)
from vllm_lora_resolvers.resolver import Resolver


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


_READS_OF_BOTOCORE_MODELS = """
import json, sys
from pathlib import Path
from vllm_lora_resolvers.backends.s3 import S3Store
from vllm_lora_resolvers.cache import NodeCache
from vllm_lora_resolvers.config import Settings
from vllm_lora_resolvers.resolver import Resolver

uri, cache, base_model = sys.argv[1:4]
settings = Settings.from_environ({"VLLM_LORA_RESOLVER_CACHE_DIR": cache}, argv=[])
resolver = Resolver(S3Store(uri, settings, NodeCache(Path(cache))))
reads = []

def botocore_reads(event, args):
    if event in ("open", "os.listdir", "os.scandir") and "botocore" in str(args[0] if args else ""):
        reads.append(event)

sys.addaudithook(botocore_reads)
assert resolver.resolve(base_model, "sql") is not None
print(json.dumps(reads))
"""


def test_the_first_resolve_of_a_process_reads_none_of_botocore_s_model_files(
    bucket: Bucket, tmp_path: Path, cache_dir: Path
) -> None:
    """What botocore loads lazily for the lookup (its paginator models: a listing of hundreds
    of folders) is loaded with the store, at start-up, not by the first adapter's request."""
    bucket.upload("sql", write_lora_adapter(tmp_path / "sql", base_model=BASE_MODEL))
    process = subprocess.run(
        [sys.executable, "-c", _READS_OF_BOTOCORE_MODELS, bucket.uri, str(cache_dir), BASE_MODEL],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
        timeout=120,
        check=True,
    )
    assert json.loads(process.stdout.splitlines()[-1]) == []


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


async def test_concurrent_coroutines_for_one_absent_name_cost_one_listing(
    bucket: Bucket, cache_dir: Path
) -> None:
    resolver = bucket.resolver(cache_dir)
    answers = await asyncio.gather(
        *(VllmResolver(resolver).resolve_lora(BASE_MODEL, "absent") for _ in range(32))
    )
    assert answers == [None] * 32
    assert len(bucket.requests()) == 1


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


def test_an_endpoint_named_by_a_host_name_gets_the_bucket_in_its_path(
    bucket: Bucket, tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Addressed virtual-hosted, the request would go to BUCKET.localhost, which the relay never
    # sees (an endpoint's IP address is addressed path-style whatever the setting).
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", bucket.relay.url.replace("127.0.0.1", "localhost"))
    bucket.upload("sql", write_lora_adapter(tmp_path / "sql", base_model=BASE_MODEL))
    assert bucket.resolver(cache_dir).resolve(BASE_MODEL, "sql") is not None
    assert all(path.startswith(f"/{bucket.name}") for _, path in bucket.requests())


def test_credentials_from_the_instance_metadata_service_are_asked_for_once_per_store(
    moto: S3Endpoint, tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # moto's server answers as the instance metadata service does (a role's credentials); the
    # service throttles, and where it does not answer each question waits out a timeout.
    for variable in [name for name in os.environ if name.startswith("AWS_")]:
        monkeypatch.delenv(variable)
    upstream = int(moto.url.rsplit(":", 1)[1])
    with FaultRelay(upstream) as metadata_service:
        monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", metadata_service.url)
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto.url)
        monkeypatch.setenv("AWS_DEFAULT_REGION", moto.region)
        moto.client().create_bucket(Bucket="imds")
        resolver = open_resolver(S3Store, "s3://imds/adapters", cache_dir, FAST_TRANSFER)
        assert resolver.resolve(BASE_MODEL, "absent") is None  # signed with the role's keys
    role_credentials = [path for _, path in metadata_service.requests if path.endswith("-role")]
    assert role_credentials == ["/latest/meta-data/iam/security-credentials/default-role"]


def test_the_region_variable_users_are_told_to_set_is_the_one_the_client_reads(
    moto: S3Endpoint, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # doctor, the quickstart and the S3 overlay name this variable: botocore reads no other.
    (region,) = [name for name in stores.S3.environment if "REGION" in name]
    for variable in [name for name in os.environ if "REGION" in name]:
        monkeypatch.delenv(variable)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto.url)
    monkeypatch.setenv(region, "eu-west-3")
    resolver = open_resolver(S3Store, "s3://any/adapters", cache_dir, FAST_TRANSFER)
    assert isinstance(resolver.store, S3Store)
    assert resolver.store.client.meta.region_name == "eu-west-3"
    assert resolver.store.lookup_client.meta.region_name == "eu-west-3"
    overlay = (REPO / "deploy/kubernetes/overlays/s3/kustomization.yaml").read_text()
    assert f"- {region}=" in overlay


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


def test_an_adapter_reuploaded_while_being_fetched_is_served_at_its_new_version(
    any_bucket: Bucket, tmp_path: Path, cache_dir: Path
) -> None:
    any_bucket.upload("sql", write_lora_adapter(tmp_path / "v1", base_model=BASE_MODEL, seed=1))
    v2 = write_lora_adapter(tmp_path / "v2", base_model=BASE_MODEL, seed=2)
    built = any_bucket.resolver(cache_dir)

    class ReuploadedMidFetch(S3Store):
        reuploaded = False

        def download(self, adapter, file, destination):  # type: ignore[no-untyped-def]
            if file.path != "adapter_config.json" and not self.reuploaded:
                self.reuploaded = True
                any_bucket.upload("sql", v2)  # between the lookup and the weights download
            return super().download(adapter, file, destination)

    store = ReuploadedMidFetch(any_bucket.uri, built.settings, built.cache, built.transfer)
    resolved = Resolver(store).resolve(BASE_MODEL, "sql")
    assert store.reuploaded
    assert resolved is not None
    assert files_of(resolved.path) == files_of(v2)
