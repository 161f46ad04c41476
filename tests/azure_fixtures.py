"""Azure fixtures: one Azurite per test session, a container per test, behind a fault relay."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from azure.storage.blob import BlobServiceClient, ContainerClient
from resolver_setup import FAST_TRANSFER, Relayed, open_resolver

from devtools.azure_server import Azurite
from devtools.relay import FaultRelay
from vllm_lora_resolvers.backends.azure import AzureBlobStore
from vllm_lora_resolvers.resolver import Resolver
from vllm_lora_resolvers.transfer import TransferConfig

_containers = itertools.count()
#: The variables of every way to name an account and its credentials (tests set one way each).
AZURE_VARIABLES = (
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_STORAGE_ACCOUNT_NAME",
    "AZURE_STORAGE_ACCOUNT_URL",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
)


@pytest.fixture(scope="session")
def azurite() -> Iterator[Azurite]:
    with Azurite() as server:
        yield server


@dataclass
class AzureContainer(Relayed):
    """A fresh container on Azurite, reached through a fault relay, adapters under ``adapters/``.

    The environment holds a connection string to it through the relay."""

    server: Azurite
    relay: FaultRelay
    name: str

    @property
    def uri(self) -> str:
        return f"az://{self.name}/adapters"

    @property
    def client(self) -> ContainerClient:
        """The container, straight from the server (not through the relay)."""
        service = BlobServiceClient.from_connection_string(self.server.connection_string())
        return service.get_container_client(self.name)

    def upload(self, name: str, folder: Path) -> None:
        for path in sorted(folder.iterdir()):
            with path.open("rb") as stream:
                self.client.upload_blob(f"adapters/{name}/{path.name}", stream, overwrite=True)

    def delete(self, name: str) -> None:
        for blob in self.client.list_blobs(name_starts_with=f"adapters/{name}/"):
            self.client.delete_blob(blob.name)

    def resolver(
        self, cache_dir: Path, transfer: TransferConfig = FAST_TRANSFER, **variables: str
    ) -> Resolver:
        return open_resolver(AzureBlobStore, self.uri, cache_dir, transfer, **variables)


@pytest.fixture
def azure_container(azurite: Azurite, monkeypatch: pytest.MonkeyPatch) -> Iterator[AzureContainer]:
    name = f"test-azure-{next(_containers)}"
    BlobServiceClient.from_connection_string(azurite.connection_string()).create_container(name)
    with FaultRelay(azurite.port) as relay:
        for variable in AZURE_VARIABLES:
            monkeypatch.delenv(variable, raising=False)
        relayed = azurite.connection_string(int(relay.url.rsplit(":", 1)[1]))
        monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", relayed)
        yield AzureContainer(azurite, relay, name)
