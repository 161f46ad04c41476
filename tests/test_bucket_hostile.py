"""Pointers (``adapter_current.json``) that lie about the version they name, written straight to
real servers (SeaweedFS, fake-gcs-server, Azurite) with their own clients, as whoever can write to
the bucket could: a declared size far below the object's, an ETag or generation that is not the
object's, an ETag built to reach a request header or URL. Each is a refusal of that version,
received at most up to its declared size per try, kept nowhere, and remembered: asking again
downloads nothing."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from azure_fixtures import AzureContainer
from conftest import BASE_MODEL, snapshot_dirs, staging_entries
from contract_stores import BucketFixture
from gcs_fixtures import GcsBucket
from s3_fixtures import Bucket
from test_store_contract import IN_FLIGHT, TRIES

from devtools.models import write_lora_adapter
from vllm_lora_resolvers.adapter import CONFIG_FILE
from vllm_lora_resolvers.backends.published import POINTER_FILE
from vllm_lora_resolvers.errors import InvalidAdapterError
from vllm_lora_resolvers.resolver import Resolver

WEIGHTS = "adapter_model.safetensors"
VERSION_FOLDER = "adapters/sql/_versions/v1/"
#: The object a lying pointer names, declared at the size of the adapter's real weights.
OBJECT_BYTES = 40 << 20
#: A node's VLLM_LORA_RESOLVER_MAX_ADAPTER_BYTES, far below the object.
LIMIT = "1MiB"


@dataclass
class Server:
    """A bucket of one server: its fixture (relay, resolvers) and a raw write, which returns the
    object's ETag or generation as a listing shows it (what a pointer declares)."""

    bucket: BucketFixture
    put: Callable[[str, bytes], str]

    def version_reads(self) -> list[str]:
        """The requests that read an object of the version folder."""
        return [path for method, path in self.bucket.relay.requests if "_versions" in path]

    def received(self) -> int:
        """Response body bytes the relay sent since `reset`, those it was still sending too."""
        self.bucket.relay.settle()
        return self.bucket.relay.response_body_bytes

    def reset(self) -> None:
        self.bucket.relay.settle()  # no byte of an earlier response is counted after
        self.bucket.relay.reset_counters()


def s3_server(bucket: Bucket) -> Server:
    client = bucket.endpoint.client()

    def put(key: str, content: bytes) -> str:
        return client.put_object(Bucket=bucket.name, Key=key, Body=content)["ETag"]

    return Server(bucket, put)


def gcs_server(bucket: GcsBucket) -> Server:
    def put(key: str, content: bytes) -> str:
        blob = bucket.client.bucket(bucket.name).blob(key)
        blob.upload_from_string(content)
        return str(blob.generation)

    return Server(bucket, put)


def azure_server(container: AzureContainer) -> Server:
    def put(key: str, content: bytes) -> str:
        blob = container.client.upload_blob(key, content, overwrite=True)
        etag: str = blob.get_blob_properties().etag
        return etag.strip('"')

    return Server(container, put)


@pytest.fixture(params=["s3", "gcs", "azure"])
def server(request: pytest.FixtureRequest) -> Server:
    if request.param == "s3":
        return s3_server(request.getfixturevalue("bucket"))
    if request.param == "gcs":
        return gcs_server(request.getfixturevalue("gcs_bucket"))
    return azure_server(request.getfixturevalue("azure_container"))


def put_version(server: Server, tmp_path: Path, weights: bytes | None = None) -> dict[str, Any]:
    """Upload an adapter's config and ``weights`` (default: its own) as version ``v1``; the
    pointer's entries of both files, as ``vllm-lora publish`` would write them."""
    source = write_lora_adapter(tmp_path / "source", base_model=BASE_MODEL)
    config = (source / CONFIG_FILE).read_bytes()
    weights = (source / WEIGHTS).read_bytes() if weights is None else weights
    return {
        CONFIG_FILE: entry(server, CONFIG_FILE, config),
        WEIGHTS: entry(server, WEIGHTS, weights),
    }


def entry(server: Server, path: str, content: bytes) -> dict[str, Any]:
    etag = server.put(VERSION_FOLDER + path, content)
    return {"path": path, "size": len(content), "etag": etag}


def point_at(server: Server, files: dict[str, Any]) -> None:
    """Write the pointer of ``sql``, naming version ``v1`` made of ``files``."""
    pointer = {
        "format": 1,
        "version": "v1",
        "files": list(files.values()),
        "history": [],
        "updated_at": 0,
    }
    server.put(f"adapters/sql/{POINTER_FILE}", json.dumps(pointer).encode())


def assert_refused_then_remembered(
    server: Server, resolver: Resolver, cache_dir: Path, declared: int
) -> None:
    """The version is refused, at most its declared size received per try and nothing kept; then
    refused again at the cost of a lookup, without a download."""
    server.reset()
    with pytest.raises(
        InvalidAdapterError, match="adapter 'sql': the store does not serve"
    ) as raised:
        resolver.resolve(BASE_MODEL, "sql")
    assert "publish it again" in str(raised.value)
    assert server.received() < TRIES * (declared + IN_FLIGHT)
    assert snapshot_dirs(cache_dir) == []
    assert staging_entries(cache_dir) == []

    server.reset()
    with pytest.raises(InvalidAdapterError, match="the store does not serve"):
        resolver.resolve(BASE_MODEL, "sql")
    assert server.version_reads() == []
    assert server.received() < 64 << 10  # a listing


def test_a_pointer_declaring_a_small_size_for_a_large_object_is_refused_and_remembered(
    server: Server, tmp_path: Path, cache_dir: Path
) -> None:
    source = write_lora_adapter(tmp_path / "real", base_model=BASE_MODEL)
    real = (source / WEIGHTS).read_bytes()  # 29,712 bytes: a valid adapter, then zeros
    files = put_version(server, tmp_path, real + bytes(OBJECT_BYTES - len(real)))
    files[WEIGHTS]["size"] = len(real)
    point_at(server, files)
    resolver = server.bucket.resolver(cache_dir, VLLM_LORA_RESOLVER_MAX_ADAPTER_BYTES=LIMIT)
    declared = sum(file["size"] for file in files.values())
    assert_refused_then_remembered(server, resolver, cache_dir, declared)


def test_a_pointer_declaring_another_etag_than_the_objects_is_refused_and_remembered(
    server: Server, tmp_path: Path, cache_dir: Path
) -> None:
    files = put_version(server, tmp_path)
    other = entry(server, "other", b"another object")  # a real ETag or generation, not its own
    files[WEIGHTS]["etag"] = other["etag"]
    point_at(server, files)
    resolver = server.bucket.resolver(cache_dir, VLLM_LORA_RESOLVER_MAX_ADAPTER_BYTES=LIMIT)
    declared = sum(file["size"] for file in files.values())
    assert_refused_then_remembered(server, resolver, cache_dir, declared)


@pytest.mark.parametrize(
    "etag",
    [
        "1&userProject=attacker",
        '"0123456789abcdef0123456789abcdef"\r\nX-Injected: 1',
        "12\n34",
        "*",
        '"a", "b"',
    ],
)
def test_an_etag_that_could_reach_a_header_or_url_is_refused_before_any_read(
    server: Server, tmp_path: Path, cache_dir: Path, etag: str
) -> None:
    files = put_version(server, tmp_path)
    files[WEIGHTS]["etag"] = etag
    point_at(server, files)
    with pytest.raises(InvalidAdapterError) as raised:
        server.bucket.resolver(cache_dir).resolve(BASE_MODEL, "sql")
    message = str(raised.value)
    assert "adapter 'sql'" in message and "not a valid adapter pointer" in message
    assert "not an ETag or generation" in message and "vllm-lora publish" in message
    assert "\n" not in message and "userProject" not in message
    assert server.version_reads() == []


def test_a_gcs_pointer_declaring_a_generation_that_is_not_a_number_is_refused(
    gcs_bucket: GcsBucket, tmp_path: Path, cache_dir: Path
) -> None:
    server = gcs_server(gcs_bucket)
    files = put_version(server, tmp_path)
    files[WEIGHTS]["etag"] = "abc"
    point_at(server, files)
    with pytest.raises(InvalidAdapterError) as raised:
        gcs_bucket.resolver(cache_dir).resolve(BASE_MODEL, "sql")
    assert str(raised.value) == (
        "adapter 'sql': its pointer declares adapter_model.safetensors at 'abc', which is not an "
        "ETag or generation of a gcs object; publish the adapter again with `vllm-lora publish`"
    )
    assert server.version_reads() == []
