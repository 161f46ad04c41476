"""The stores the store contract suite (``tests/test_store_contract.py``) runs every behaviour on.

Each store is one `StoreUnderTest`: put and delete adapter folders, build its resolver over a
node cache, count the requests it receives and fault them (through the `devtools.relay.FaultRelay`
in front of its server, or in-process for the memory store), and name itself to
``tests/workers/resolve_remote.py`` for the tests that need other processes. What a store cannot
do is declared in `StoreUnderTest.lacks` with the reason, and a behaviour that needs it is skipped
with that reason: visible in the report, never silent.

Adding a store is one entry in `STORES`.
"""

from __future__ import annotations

import contextlib
import enum
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import pytest
from hf_fixtures import REPO_ID, Hub
from resolver_setup import FAST_TRANSFER, settings_for
from s3_fixtures import make_bucket

from devtools.file_server import FileServer
from devtools.memory_store import MemoryBucket, MemoryStore
from devtools.relay import Fault, FaultRelay
from vllm_lora_resolvers.backends import http
from vllm_lora_resolvers.backends.filesystem import FilesystemStore
from vllm_lora_resolvers.cache import NodeCache
from vllm_lora_resolvers.remote import RemoteAdapter
from vllm_lora_resolvers.resolver import Resolver
from vllm_lora_resolvers.transfer import TransferConfig


class Capability(enum.Enum):
    """What some stores can do and others cannot."""

    #: Its requests can be faulted: error answers, resets, truncations, stalls.
    FAULTS = "faults"
    #: Other processes of the node can reach it (tests/workers/resolve_remote.py).
    PROCESSES = "processes"
    #: It declares checksums of the bytes it serves, which the pipeline verifies.
    CHECKSUMS = "checksums"
    #: It reads a range of a file: a broken read resumes at the byte where it broke.
    RANGES = "ranges"


def replace_folder(target: Path, folder: Path) -> None:
    """Make ``target`` a copy of ``folder``: a copy renamed into place (the old one renamed
    away first), as a careful writer of a shared folder does."""
    staging = target.with_name(f".{target.name}.new")
    shutil.copytree(folder, staging)
    if target.exists():
        retired = target.with_name(f".{target.name}.old")
        target.rename(retired)
        shutil.rmtree(retired)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(target)


class StoreUnderTest(ABC):
    """One store, as every behaviour of the suite sees it."""

    #: The test id.
    label: str
    #: The ``backend`` label of its metrics.
    backend: str
    #: The capabilities it lacks, each with why; a behaviour needing one is skipped with it.
    lacks: ClassVar[Mapping[Capability, str]] = {}
    #: What tests/workers/resolve_remote.py opens it by: a declaration and a URI.
    worker_store: str = ""
    worker_uri: str = ""

    def name(self, short: str) -> str:
        """The name clients ask for adapter folder ``short``."""
        return short

    def require(self, capability: Capability) -> None:
        """Skip the calling test, saying why, if this store lacks ``capability``."""
        if capability in self.lacks:
            pytest.skip(f"not applicable to {self.label}: {self.lacks[capability]}")

    @abstractmethod
    def put(self, short: str, folder: Path) -> None:
        """Upload (or replace) adapter ``short`` with the files of ``folder``."""

    @abstractmethod
    def delete(self, short: str) -> None:
        """Remove adapter ``short``."""

    @abstractmethod
    def resolver(
        self, cache_dir: Path, *, transfer: TransferConfig = FAST_TRANSFER, **variables: str
    ) -> Resolver:
        """A resolver of this store over a node cache in ``cache_dir``, as a new server process
        would have (``variables``: more of our environment variables)."""

    @abstractmethod
    def requests(self) -> list[tuple[str, str]]:
        """``(method, path)`` of every request the store received so far."""

    def reset_counters(self) -> None:  # noqa: B027 - a store that counts nothing forgets nothing
        """Forget the requests and bytes seen."""

    def body_bytes(self) -> int:
        """Response body bytes the store sent so far."""
        raise NotImplementedError(self.label)

    def add_fault(self, fault: Fault) -> None:
        """Apply ``fault`` to the requests it matches (stores with `Capability.FAULTS`)."""
        raise NotImplementedError(self.label)

    def clear_faults(self) -> None:  # noqa: B027 - a store without faults has none to drop
        """Drop every fault."""

    def weights_reads(self) -> list[str]:
        """The paths of the requests that read a weights file."""
        return [p for method, p in self.requests() if method == "GET" and "adapter_model" in p]


class RelayedStore(StoreUnderTest):
    """A store whose server is reached through a fault relay."""

    relay: FaultRelay

    def requests(self) -> list[tuple[str, str]]:
        return self.relay.requests

    def reset_counters(self) -> None:
        self.relay.settle()  # no byte of an earlier response is counted after
        self.relay.reset_counters()

    def body_bytes(self) -> int:
        self.relay.settle()
        return self.relay.response_body_bytes

    def add_fault(self, fault: Fault) -> None:
        self.relay.add_fault(fault)

    def clear_faults(self) -> None:
        self.relay.clear_faults()


# -- the stores ---------------------------------------------------------------------------------


class FsStore(StoreUnderTest):
    """A directory of adapter folders (``lora_fs_resolver``); a lookup is one ``LOOKUP``."""

    label = "fs"
    backend = "fs"
    lacks: ClassVar[Mapping[Capability, str]] = {
        Capability.FAULTS: "a local directory has no network to fault (the pipeline's handling "
        "of faults is tested on the memory store, tests/test_pipeline.py)",
        Capability.CHECKSUMS: "a local copy declares no checksum (sizes and file identities "
        "are checked)",
    }

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir()
        self.worker_store, self.worker_uri = "fs", str(root)
        self._lookups: list[tuple[str, str]] = []

    @classmethod
    @contextlib.contextmanager
    def open(cls, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreUnderTest]:
        yield cls(tmp_path / "adapters")

    def put(self, short: str, folder: Path) -> None:
        replace_folder(self.root / short, folder)

    def delete(self, short: str) -> None:
        shutil.rmtree(self.root / short)

    def resolver(
        self, cache_dir: Path, *, transfer: TransferConfig = FAST_TRANSFER, **variables: str
    ) -> Resolver:
        lookups = self._lookups

        class CountingFilesystemStore(FilesystemStore):
            def locate(self, name: str) -> RemoteAdapter | None:
                lookups.append(("LOOKUP", name))
                return super().locate(name)

        settings = settings_for(cache_dir, **variables)
        cache = NodeCache(cache_dir, settings.cache_max_bytes)
        return Resolver(CountingFilesystemStore(self.root, settings, cache))

    def requests(self) -> list[tuple[str, str]]:
        return list(self._lookups)

    def reset_counters(self) -> None:
        self._lookups.clear()


class MemoryStoreUnderTest(StoreUnderTest):
    """The in-memory reference store (devtools/memory_store.py)."""

    label = "memory"
    backend = MemoryStore.backend
    lacks: ClassVar[Mapping[Capability, str]] = {
        Capability.PROCESSES: "held in this process's memory: no other process can reach it",
    }

    def __init__(self) -> None:
        self.store = MemoryBucket()

    @classmethod
    @contextlib.contextmanager
    def open(cls, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreUnderTest]:
        yield cls()

    def put(self, short: str, folder: Path) -> None:
        self.store.put_folder(short, folder)

    def delete(self, short: str) -> None:
        self.store.delete(short)

    def resolver(
        self, cache_dir: Path, *, transfer: TransferConfig = FAST_TRANSFER, **variables: str
    ) -> Resolver:
        settings = settings_for(cache_dir, **variables)
        cache = NodeCache(cache_dir, settings.cache_max_bytes)
        return Resolver(MemoryStore(self.store, settings, cache, transfer))

    def requests(self) -> list[tuple[str, str]]:
        return self.store.requests

    def reset_counters(self) -> None:
        self.store.reset_counters()

    def body_bytes(self) -> int:
        return self.store.response_body_bytes

    def add_fault(self, fault: Fault) -> None:
        self.store.add_fault(fault)

    def clear_faults(self) -> None:
        self.store.clear_faults()


class BucketFixture(Protocol):
    """A bucket (an Azure container) of a server on 127.0.0.1 behind a fault relay, as the
    fixtures give it: s3_fixtures.Bucket, gcs_fixtures.GcsBucket, azure_fixtures.AzureContainer."""

    relay: FaultRelay

    @property
    def uri(self) -> str: ...

    def upload(self, name: str, folder: Path) -> None: ...

    def delete(self, name: str) -> None: ...

    def resolver(
        self, cache_dir: Path, transfer: TransferConfig = ..., **variables: str
    ) -> Resolver: ...


class BucketStore(RelayedStore):
    """A bucket-shaped store (S3, GCS, Azure) through its fixture."""

    def __init__(self, label: str, backend: str, bucket: BucketFixture) -> None:
        self.label, self.backend = label, backend
        self.bucket, self.relay = bucket, bucket.relay
        self.worker_store, self.worker_uri = backend, bucket.uri

    @classmethod
    def opened_by(
        cls, fixture: str, backend: str
    ) -> Callable[[pytest.FixtureRequest, Path], contextlib.AbstractContextManager[Any]]:
        """How to open the store of pytest fixture ``fixture``, a `BucketFixture`."""

        @contextlib.contextmanager
        def open_store(request: pytest.FixtureRequest, _: Path) -> Iterator[StoreUnderTest]:
            yield cls(backend, backend, request.getfixturevalue(fixture))

        return open_store

    @classmethod
    @contextlib.contextmanager
    def on_s3(cls, server: str, request: pytest.FixtureRequest) -> Iterator[StoreUnderTest]:
        """A bucket of the S3 server of fixture ``server`` (``seaweed``, ``moto``)."""
        monkeypatch = request.getfixturevalue("monkeypatch")
        endpoint = request.getfixturevalue(server)
        with contextlib.contextmanager(make_bucket)(endpoint, monkeypatch) as bucket:
            yield cls(f"s3-{server}", "s3", bucket)

    def put(self, short: str, folder: Path) -> None:
        self.bucket.upload(short, folder)

    def delete(self, short: str) -> None:
        self.bucket.delete(short)

    def resolver(
        self, cache_dir: Path, *, transfer: TransferConfig = FAST_TRANSFER, **variables: str
    ) -> Resolver:
        return self.bucket.resolver(cache_dir, transfer, **variables)


class HubStore(RelayedStore):
    """Folders of one repo of our Hub-compatible server (hf_fixtures.Hub); each put or delete
    is a commit on ``main``."""

    label = "hf"
    backend = "hf"

    def __init__(self, hub: Hub) -> None:
        self.hub, self.relay = hub, hub.relay
        self.worker_store, self.worker_uri = "hf", f"hf://{REPO_ID}"

    @classmethod
    @contextlib.contextmanager
    def open(cls, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreUnderTest]:
        yield cls(request.getfixturevalue("hub"))

    def name(self, short: str) -> str:
        return f"{REPO_ID}/{short}"

    def put(self, short: str, folder: Path) -> None:
        self.hub.server.push(REPO_ID, {short: folder})

    def delete(self, short: str) -> None:
        self.hub.server.remove(REPO_ID, short)

    def resolver(
        self, cache_dir: Path, *, transfer: TransferConfig = FAST_TRANSFER, **variables: str
    ) -> Resolver:
        return self.hub.resolver(cache_dir, transfer=transfer, **variables)


class HttpStore(RelayedStore):
    """The HTTP store (`vllm_lora_resolvers.backends.http`) on a loopback file server that
    answers as nginx does (devtools/file_server.py), each folder listed by its ``index.json``."""

    label = "http"
    backend = "http"
    #: Whether the server answers ``Range``.
    ranges: ClassVar[bool] = True

    def __init__(self, server: FileServer, relay: FaultRelay) -> None:
        self.server, self.relay = server, relay
        self.worker_store, self.worker_uri = "http", relay.url

    @classmethod
    @contextlib.contextmanager
    def open(cls, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreUnderTest]:
        root = tmp_path / "served"
        root.mkdir()
        http.write_index(root)
        with FileServer(root, ranges=cls.ranges) as server, FaultRelay(server.port) as relay:
            yield cls(server, relay)

    def put(self, short: str, folder: Path) -> None:
        with tempfile.TemporaryDirectory() as temporary:
            indexed = Path(temporary) / "adapter"
            shutil.copytree(folder, indexed)
            http.write_index(indexed)  # published with the files it lists
            replace_folder(self.server.root / short, indexed)
        http.write_index(self.server.root)

    def delete(self, short: str) -> None:
        shutil.rmtree(self.server.root / short)
        http.write_index(self.server.root)

    def resolver(
        self, cache_dir: Path, *, transfer: TransferConfig = FAST_TRANSFER, **variables: str
    ) -> Resolver:
        settings = settings_for(cache_dir, **variables)
        cache = NodeCache(cache_dir, settings.cache_max_bytes)
        return Resolver(http.HttpStore(self.relay.url, settings, cache, transfer))


class HttpStoreWithoutRange(HttpStore):
    """The HTTP store on a server that ignores ``Range`` (200 and the whole file)."""

    label = "http-without-range"
    ranges = False
    lacks: ClassVar[Mapping[Capability, str]] = {
        Capability.RANGES: "the server ignores Range: a broken read starts the file over",
    }


@dataclass(frozen=True)
class StoreEntry:
    """How to open one store for a test: ``open(request, tmp_path)``, a context manager."""

    label: str
    open: Callable[[pytest.FixtureRequest, Path], contextlib.AbstractContextManager[Any]]


#: Every store the suite runs on.
STORES: tuple[StoreEntry, ...] = (
    StoreEntry("memory", MemoryStoreUnderTest.open),
    StoreEntry("fs", FsStore.open),
    StoreEntry("s3-seaweedfs", lambda request, _: BucketStore.on_s3("seaweed", request)),
    StoreEntry("s3-moto", lambda request, _: BucketStore.on_s3("moto", request)),
    StoreEntry("gcs", BucketStore.opened_by("gcs_bucket", "gcs")),
    StoreEntry("azure", BucketStore.opened_by("azure_container", "azure")),
    StoreEntry("hf", HubStore.open),
    StoreEntry("http", HttpStore.open),
    StoreEntry("http-without-range", HttpStoreWithoutRange.open),
)


@pytest.fixture(name="store", params=STORES, ids=[entry.label for entry in STORES])
def store_fixture(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreUnderTest]:
    """Each store of `STORES` in turn, fresh for the test."""
    entry: StoreEntry = request.param
    with entry.open(request, tmp_path) as opened:
        assert isinstance(opened, StoreUnderTest)
        yield opened
