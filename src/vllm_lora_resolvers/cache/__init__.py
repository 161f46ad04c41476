"""The node-local adapter cache, shared by every process and pod on a node: `NodeCache`.

Its folders are `layout`'s. A snapshot appears only by one ``rename`` of a complete, checked
staging directory, so a crash leaves the old state or the new one. Eviction takes the lease file's
exclusive lock without waiting; it fails while any live process holds its shared lease, and a
dead process's lease is released by the kernel.

Everything "in progress" is marked by a lock the kernel releases when its process dies (never by a
PID or an age: pods on one node share this directory but not a PID namespace), so whatever a
dead process left in ``staging/`` is recognised as debris, and removed, the next time any process
opens the cache.

The size cap (``max_bytes``) bounds the snapshots no live process leases: room is made before a
fetch (for the bytes about to arrive), when a process opens the cache, and when the disk is full.

`NodeCache` is the one object callers hold; each of its parts, one module of this package, does
one job and keeps its state to itself: `snapshots` (what is cached, found, checked, quarantined),
`leases`, `staging` (fetching, publishing, scratch and debris), `links` (``NAME`` links),
`answers` (what the node's processes share), `eviction`, and `sources` (whose snapshots this
process serves).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from vllm_lora_resolvers.cache.answers import Accept, Ask, NodeAnswer, NodeAnswers
from vllm_lora_resolvers.cache.eviction import Eviction
from vllm_lora_resolvers.cache.files import CACHE_DISK_ERRNOS, cache_write_error, is_locked
from vllm_lora_resolvers.cache.layout import (
    ADAPTER_DIR,
    EVICTIONS,
    LEASE,
    MANIFEST,
    PROCESS_DIR_PREFIX,
    STATE_DIR,
    Layout,
)
from vllm_lora_resolvers.cache.leases import Leases
from vllm_lora_resolvers.cache.links import NameLinks
from vllm_lora_resolvers.cache.snapshots import (
    Snapshot,
    SnapshotFile,
    SnapshotManifest,
    Snapshots,
    snapshot_key,
)
from vllm_lora_resolvers.cache.sources import ServedSources
from vllm_lora_resolvers.cache.staging import Staging
from vllm_lora_resolvers.errors import CacheError

__all__ = [
    "ADAPTER_DIR",
    "CACHE_DISK_ERRNOS",
    "EVICTIONS",
    "LEASE",
    "MANIFEST",
    "PROCESS_DIR_PREFIX",
    "STATE_DIR",
    "CacheUsage",
    "NodeAnswer",
    "NodeCache",
    "Snapshot",
    "SnapshotFile",
    "SnapshotManifest",
    "cache_write_error",
    "is_locked",
    "snapshot_key",
]


@dataclass(frozen=True)
class CacheUsage:
    """What a node cache holds, and how many snapshots were evicted from it so far."""

    snapshots: int
    bytes: int
    evictions: int


class NodeCache:
    """Immutable adapter snapshots under one cache root, safe across processes.

    >>> cache = NodeCache(Path("/var/cache/vllm-lora"))  # doctest: +SKIP
    >>> with cache.fetch_lock(key):  # doctest: +SKIP
    ...     staging = cache.new_staging(key)
    ...     ...  # write files into staging / "adapter"
    ...     snapshot = cache.publish(staging, key, manifest)
    """

    def __init__(self, root: Path, max_bytes: int | None = None) -> None:
        self.root = root.absolute()
        self.max_bytes = max_bytes
        self.layout = Layout(self.root)
        try:
            self.layout.make()
        except OSError as error:
            raise CacheError(
                f"cache directory {self.root} is not usable ({error.strerror}); "
                "set VLLM_LORA_RESOLVER_CACHE_DIR to a writable node-local directory"
            ) from None
        self._snapshots = Snapshots(self.layout)
        self._leases = Leases(self.layout, self._snapshots)
        self._staging = Staging(self.layout, self._leases)
        self._links = NameLinks(self.root, self._snapshots, self._staging)
        self._answers = NodeAnswers(self.layout, self._staging)
        self._eviction = Eviction(
            self.layout, max_bytes, self._snapshots, self._links, self._staging
        )
        self._sources = ServedSources()
        self._staging.remove_debris()
        self.evict()

    # -- snapshots: `Snapshots` ------------------------------------------------------------

    def find(self, key: str) -> Snapshot | None:
        """The complete snapshot ``key``, or ``None``; a damaged one is quarantined."""
        return self._snapshots.find(key)

    def contains(self, key: str) -> bool:
        """Whether the complete snapshot ``key`` is in the cache (one ``stat``)."""
        return self._snapshots.contains(key)

    def all_snapshots(self) -> list[Snapshot]:
        """Every complete snapshot, in no particular order."""
        return self._snapshots.all()

    def latest_for(self, source: str, name: str) -> Snapshot | None:
        """The newest snapshot of ``name`` from ``source``."""
        return self._snapshots.latest_for(source, name)

    def snapshot_containing(self, real_path: str) -> str | None:
        """The key of the snapshot whose adapter folder is ``real_path`` (symlinks resolved)."""
        return self._snapshots.containing(real_path)

    def snapshot_in_path(self, lora_path: str) -> Snapshot | None:
        """The snapshot of this cache that ``lora_path``, an adapter folder handed to vLLM, is."""
        return self._snapshots.in_path(lora_path)

    def quarantined(self) -> list[str]:
        """The damaged snapshots set aside, by folder name."""
        return self._snapshots.quarantined()

    def verify(self) -> list[str]:
        """One line per file of a snapshot that differs from its manifest (none: all intact)."""
        return self._snapshots.verify()

    def usage(self) -> CacheUsage:
        """What the cache holds now, and how many snapshots were evicted from it so far."""
        snapshots = self._snapshots.all()
        return CacheUsage(
            snapshots=len(snapshots),
            bytes=sum(s.manifest.total_bytes for s in snapshots),
            evictions=self._eviction.evictions(),
        )

    # -- whose snapshots this process serves: `ServedSources` --------------------------------

    def serve_source(self, source: str) -> None:
        """Declare that this process resolves adapters from ``source`` (a store's identity)."""
        self._sources.serve(source)

    def serves(self, snapshot: Snapshot) -> bool:
        """Whether ``snapshot`` comes from a store this process resolves from."""
        return self._sources.serves(snapshot)

    def withhold_source(self, source: str, reason: str) -> None:
        """Serve no snapshot of ``source`` in this process until `resume_source`."""
        self._sources.withhold(source, reason)

    def resume_source(self, source: str) -> None:
        """The store of ``source`` answered again: its snapshots may be served."""
        self._sources.resume(source)

    def withheld(self, snapshot: Snapshot) -> str | None:
        """Why ``snapshot`` may not be served now (`withhold_source`), or ``None``."""
        return self._sources.withheld(snapshot)

    # -- leases: `Leases` --------------------------------------------------------------------

    def lease(self, key: str) -> Snapshot | None:
        """Hold ``key`` for the life of this process; ``None`` if it is not (or no longer)
        cached. It also marks the snapshot as recently used."""
        return self._leases.lease(key)

    def held(self, key: str) -> Snapshot | None:
        """The snapshot ``key`` if this process already leases it."""
        return self._leases.held(key)

    def release(self, key: str) -> None:
        """Give up this process's lease on ``key`` (nothing happens if it holds none)."""
        self._leases.release(key)

    def leased_keys(self) -> set[str]:
        """The keys of the snapshots this process leases."""
        return self._leases.keys()

    def is_leased_by_anyone(self, key: str) -> bool:
        """Whether any live process (this one included) leases ``key``."""
        return self._leases.by_anyone(key)

    # -- fetching: `Staging` -----------------------------------------------------------------

    def fetch_lock(self, key: str) -> AbstractContextManager[None]:
        """Exclusive right to fetch ``key``: one thread in this process, one process on the
        node; leftovers of an earlier fetch of ``key`` that crashed are removed."""
        return self._staging.fetch_lock(key)

    def new_staging(self, key: str) -> Path:
        """An empty staging directory for ``key`` (under its `fetch_lock`), ``adapter/`` in it."""
        return self._staging.new(key)

    def bytes_in_flight(self, key: str) -> int:
        """Bytes written so far by fetches of snapshot ``key`` in progress (any process's)."""
        return self._staging.bytes_in_flight(key)

    def discard_staging(self, staging: Path) -> None:
        """Delete a staging directory whose fetch failed."""
        self._staging.discard(staging)

    def publish(self, staging: Path, key: str, manifest: SnapshotManifest) -> Snapshot:
        """Seal ``staging`` and rename it into place at once, leased by this process."""
        return self._staging.publish(staging, key, manifest)

    def remove_debris(self) -> None:
        """Remove what dead processes left in ``staging/`` and ``trash/``."""
        self._staging.remove_debris()

    # -- name links: `NameLinks` -------------------------------------------------------------

    def point_name(self, name: str, snapshot: Snapshot) -> None:
        """Make ``ROOT/NAME`` a symlink to ``snapshot``, atomically, unless someone else's file
        is there (or the cache cannot be written: then the old link stays)."""
        self._links.point(name, snapshot)

    def unpoint_name(self, name: str, only_if_key: str | None = None) -> None:
        """Remove the ``ROOT/NAME`` symlink (only if it points at ``only_if_key``, when given)."""
        self._links.unpoint(name, only_if_key)

    def linked_snapshot(self, name: str, source: str) -> Snapshot | None:
        """The snapshot of ``source`` the ``ROOT/NAME`` link points at, if any."""
        return self._links.linked(name, source)

    def unpoint_name_of(self, name: str, source: str) -> None:
        """Remove the ``ROOT/NAME`` link if it points at a snapshot of ``source``."""
        self._links.unpoint_of(name, source)

    # -- answers shared by the node's processes: `NodeAnswers` -------------------------------

    def node_answer(
        self, question: str, max_age: float, ask: Ask, accept: Accept = None
    ) -> tuple[str, bool]:
        """The answer to ``question`` some process of this node recorded at most ``max_age``
        seconds ago, else ``ask()``'s, recorded for the others: ``(answer, asked here)``."""
        return self._answers.ask(question, max_age, ask, accept)

    # -- eviction: `Eviction` ----------------------------------------------------------------

    def evict(self, incoming_bytes: int = 0) -> list[Snapshot]:
        """Delete least-recently-used unleased snapshots until the cache, plus
        ``incoming_bytes``, fits ``max_bytes`` and the disk has room for ``incoming_bytes``."""
        return self._eviction.evict(incoming_bytes)

    def prune(self, max_bytes: int) -> list[Snapshot]:
        """Delete quarantined snapshots, then least-recently-used unleased ones until the cache
        fits ``max_bytes``, now."""
        return self._eviction.prune(max_bytes)

    def make_room_on_disk(self, needed_bytes: int) -> list[Snapshot]:
        """The disk is full: delete least-recently-used unleased snapshots until it has
        ``needed_bytes`` free (or nothing unleased is left)."""
        return self._eviction.make_room_on_disk(needed_bytes)

    def evictions(self) -> int:
        """Snapshots evicted from this cache so far, by every process."""
        return self._eviction.evictions()

    def last_used(self, snapshot: Snapshot) -> float:
        """When a process last leased ``snapshot`` (a Unix time; 0 if it is gone)."""
        return self._eviction.last_used(snapshot)
