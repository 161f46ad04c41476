"""GCS fixtures: one fake-gcs-server per test session, a bucket per test, behind a fault relay."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from resolver_setup import FAST_TRANSFER, Relayed, open_resolver

from devtools.gcs_server import FakeGcs
from devtools.relay import FaultRelay
from vllm_lora_resolvers.backends.gcs import GcsStore
from vllm_lora_resolvers.resolver import Resolver
from vllm_lora_resolvers.transfer import TransferConfig

_buckets = itertools.count()


@pytest.fixture(scope="session")
def fake_gcs() -> Iterator[str]:
    with FakeGcs() as server:
        yield server.url


@dataclass
class GcsBucket(Relayed):
    """A fresh bucket on fake-gcs-server, reached through a fault relay."""

    client: storage.Client
    relay: FaultRelay
    name: str

    @property
    def uri(self) -> str:
        return f"gs://{self.name}/adapters"

    def upload(self, name: str, folder: Path) -> None:
        bucket = self.client.bucket(self.name)
        for path in sorted(folder.iterdir()):
            bucket.blob(f"adapters/{name}/{path.name}").upload_from_filename(str(path))

    def delete(self, name: str) -> None:
        for blob in self.client.list_blobs(self.name, prefix=f"adapters/{name}/"):
            blob.delete()

    def resolver(
        self, cache_dir: Path, transfer: TransferConfig = FAST_TRANSFER, **variables: str
    ) -> Resolver:
        return open_resolver(GcsStore, self.uri, cache_dir, transfer, **variables)


@pytest.fixture
def gcs_bucket(fake_gcs: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[GcsBucket]:
    direct = storage.Client(
        project="test",
        credentials=AnonymousCredentials(),
        client_options={"api_endpoint": fake_gcs},
    )
    name = f"test-gcs-{next(_buckets)}"
    direct.create_bucket(name)
    with FaultRelay(int(fake_gcs.rsplit(":", 1)[1])) as relay:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", relay.url)
        yield GcsBucket(direct, relay, name)
