"""The smallest correct store: adapters held in a dict, read through `MemoryStore`.

It is the reference the store contract suite (``tests/test_store_contract.py``) holds every other
store to, and the fast way to test the pipeline itself (``tests/test_pipeline.py``): no server, no
client library, yet every request can be counted and faulted like a real store's, with the same
`devtools.relay.Fault` rules the fault relay takes. Requests are ``("LIST", NAME)`` for a lookup and
``("GET", NAME/FILE)`` for a ranged read. Each file declares its SHA-256, as S3, GCS and the Hub
declare theirs, and its version (etag) changes with every `MemoryBucket.put`.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from devtools.relay import Fault, FaultLedger
from vllm_lora_resolvers.adapter import adapter_from_listing
from vllm_lora_resolvers.backends.base import Store
from vllm_lora_resolvers.cache import NodeCache
from vllm_lora_resolvers.config import Settings
from vllm_lora_resolvers.errors import (
    StoreRefusedError,
    StoreUnavailableError,
    TransientStoreError,
    VersionChangedError,
)
from vllm_lora_resolvers.remote import RemoteAdapter, RemoteFile
from vllm_lora_resolvers.transfer import DEFAULT_TRANSFER, TransferConfig

_CHUNK = 64 << 10


@dataclass(frozen=True)
class StoredFile:
    """One file of an adapter: its bytes, their SHA-256, and the generation that wrote them."""

    content: bytes
    sha256: str
    generation: str


class MemoryBucket(FaultLedger):
    """Adapter folders by name (``{file name: bytes}``), thread-safe, counting and faultable.

    ``on_request(method, path)``, when set, runs before each request is answered (after its
    fault, if any, was chosen): a test changes the store there, between a lookup and a read.
    """

    def __init__(self) -> None:
        self._folders: dict[str, dict[str, StoredFile]] = {}
        self._generations = itertools.count(1)
        super().__init__()
        self._lock = threading.Lock()
        self.on_request: Callable[[str, str], None] | None = None

    # -- changing the store ---------------------------------------------------------------

    def put(self, name: str, files: Mapping[str, bytes]) -> None:
        """Replace folder ``name`` with ``files`` (file name -> bytes), as one new generation."""
        generation = str(next(self._generations))
        stored = {
            path: StoredFile(content, hashlib.sha256(content).hexdigest(), generation)
            for path, content in files.items()
        }
        with self._lock:
            self._folders[name] = stored

    def put_folder(self, name: str, folder: Path) -> None:
        """Replace folder ``name`` with the files of the local folder ``folder``."""
        self.put(name, {path.name: path.read_bytes() for path in folder.iterdir()})

    def delete(self, name: str) -> None:
        """Remove folder ``name``."""
        with self._lock:
            self._folders.pop(name, None)

    # -- what the resolver asks -----------------------------------------------------------

    def request(self, method: str, path: str, read_timeout: float) -> Fault | None:
        """Count a request; the fault to apply to it, if a rule matches (status and delay
        faults are applied here: they raise; a delay beyond ``read_timeout`` is a timeout)."""
        fault = self.take_fault(method, path)
        if self.on_request is not None:
            self.on_request(method, path)
        if fault is not None and fault.kind == "status":
            problem = f"{method} {path} failed: HTTP {fault.status} ({fault.code})"
            if fault.status >= 500 or fault.status in (408, 429):
                raise TransientStoreError(problem)
            raise (StoreRefusedError if fault.status in (401, 403) else StoreUnavailableError)(
                problem
            )
        if fault is not None and fault.kind == "delay":
            time.sleep(min(fault.seconds, read_timeout))  # a read that stalls, up to the limit
            if fault.seconds >= read_timeout:
                raise TransientStoreError(f"{method} {path} failed: ReadTimeout")
        return fault

    def listing(self, name: str) -> dict[str, StoredFile] | None:
        """The files of folder ``name`` as they are now, ``None`` if there is none."""
        with self._lock:
            folder = self._folders.get(name)
            return None if folder is None else dict(folder)

    def names(self, folder: str) -> list[str]:
        """The folder names directly in ``folder`` (``""``: the top)."""
        prefix = f"{folder}/" if folder else ""
        with self._lock:
            found = {
                prefix + name[len(prefix) :].split("/", 1)[0]
                for name in self._folders
                if name.startswith(prefix)
            }
        return sorted(found)


class MemoryStore(Store):
    """Resolve ``NAME`` to folder ``NAME`` of a `MemoryBucket`: one ``LIST`` per lookup, ranged
    ``GET``s in parallel parts for the bytes, each file's SHA-256 declared."""

    backend: ClassVar[str] = "memory"

    def __init__(
        self,
        store: MemoryBucket,
        settings: Settings,
        cache: NodeCache,
        transfer: TransferConfig = DEFAULT_TRANSFER,
        *,
        source: str = "memory://store",
    ) -> None:
        self.store = store
        super().__init__(source, settings, cache, transfer)

    def locate(self, name: str) -> RemoteAdapter | None:
        self.store.request("LIST", name, self.transfer.lookup_timeout[1])
        folder = self.store.listing(name)
        if folder is None:
            return None
        listed = {
            path: RemoteFile(path, len(file.content), {"sha256": file.sha256}, etag=file.generation)
            for path, file in folder.items()
        }
        return adapter_from_listing(
            name, f"{self.source}/{name}/", listed, signature=self.lists_signatures
        )

    def list_names(self, folder: str = "") -> Iterator[str]:
        """The folders directly in ``folder`` (``""``: the top): the candidate adapters."""
        yield from self.store.names(folder)

    def download(
        self, adapter: RemoteAdapter, file: RemoteFile, destination: Path
    ) -> Mapping[str, str]:
        path = f"{adapter.name}/{file.path}"

        def fetch_range(start: int, end: int, write: Callable[[bytes], None]) -> None:
            fault = self.store.request("GET", path, self.transfer.transfer_timeout[1])
            stored = (self.store.listing(adapter.name) or {}).get(file.path)
            if stored is None or stored.generation != file.etag:
                raise VersionChangedError(f"{path} changed while it was being fetched")
            body = stored.content[start:end]
            if fault is not None and fault.kind == "corrupt_at" and fault.after_bytes < len(body):
                at = fault.after_bytes
                body = body[:at] + bytes([body[at] ^ 1]) + body[at + 1 :]
            cut = fault is not None and fault.kind in ("reset_after", "close_after")
            if fault is not None and cut:
                body = body[: fault.after_bytes]
            if fault is not None and fault.kind == "pad":
                body += bytes(fault.extra_bytes)
            for offset in range(0, len(body), _CHUNK):
                chunk = body[offset : offset + _CHUNK]
                self.store.count_body_bytes(len(chunk))
                write(chunk)
            if fault is not None and fault.kind == "reset_after":
                raise TransientStoreError(f"reading {path} failed: ConnectionResetError")
            # close_after: the body simply ends early, as a clean close would end it

        self.download_ranges(destination, file.size, fetch_range)
        return {}
