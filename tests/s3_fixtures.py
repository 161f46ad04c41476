"""S3 fixtures: one SeaweedFS and one moto server per test session, a bucket per test, a relay."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from resolver_setup import FAST_TRANSFER, Relayed, open_resolver

from devtools.relay import FaultRelay
from devtools.stores import MotoS3, S3Endpoint, SeaweedS3, upload_folder
from vllm_lora_resolvers.backends.s3 import S3Store
from vllm_lora_resolvers.resolver import Resolver
from vllm_lora_resolvers.transfer import TransferConfig

_buckets = itertools.count()
#: The request headers of S3's conditional writes (and reads).
CONDITION_HEADERS = frozenset({"if-match", "if-none-match"})


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Endpoint]:
    with SeaweedS3(tmp_path_factory.mktemp("seaweed")) as server:
        yield server.endpoint


@pytest.fixture(scope="session")
def moto() -> Iterator[S3Endpoint]:
    with MotoS3() as server:
        yield server.endpoint


@dataclass
class Bucket(Relayed):
    """A fresh bucket, reached through a fault relay, with adapters under ``adapters/``."""

    endpoint: S3Endpoint
    relay: FaultRelay
    name: str

    @property
    def uri(self) -> str:
        return f"s3://{self.name}/adapters"

    def upload(self, name: str, folder: Path) -> None:
        upload_folder(self.endpoint.client(), self.name, f"adapters/{name}", folder)

    def delete(self, name: str) -> None:
        client = self.endpoint.client()
        listing = client.list_objects_v2(Bucket=self.name, Prefix=f"adapters/{name}/")
        for item in listing.get("Contents", []):
            client.delete_object(Bucket=self.name, Key=item["Key"])

    def resolver(
        self, cache_dir: Path, transfer: TransferConfig = FAST_TRANSFER, **variables: str
    ) -> Resolver:
        return open_resolver(S3Store, self.uri, cache_dir, transfer, **variables)


def make_bucket(
    endpoint: S3Endpoint,
    monkeypatch: pytest.MonkeyPatch,
    drop_request_headers: frozenset[str] = frozenset(),
) -> Iterator[Bucket]:
    name = f"test-{next(_buckets)}"
    endpoint.client().create_bucket(Bucket=name)
    upstream_port = int(endpoint.url.rsplit(":", 1)[1])
    with FaultRelay(upstream_port, drop_request_headers=drop_request_headers) as relay:
        relayed = S3Endpoint(relay.url, endpoint.access_key, endpoint.secret_key)
        for variable, value in relayed.env().items():
            monkeypatch.setenv(variable, value)
        yield Bucket(endpoint, relay, name)


@pytest.fixture
def bucket(seaweed: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> Iterator[Bucket]:
    yield from make_bucket(seaweed, monkeypatch)


@pytest.fixture(params=["seaweedfs", "moto"])
def any_bucket(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Bucket]:
    endpoint = request.getfixturevalue("seaweed" if request.param == "seaweedfs" else "moto")
    yield from make_bucket(endpoint, monkeypatch)


@pytest.fixture
def unconditional_bucket(moto: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> Iterator[Bucket]:
    """A bucket of a store that ignores conditional writes, as s3rver does: moto behind a relay
    that drops ``If-Match`` and ``If-None-Match`` (moto checks no signature, which covers them)."""
    yield from make_bucket(moto, monkeypatch, drop_request_headers=CONDITION_HEADERS)
