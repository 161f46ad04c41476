"""The node-local adapter cache, shared by every process and pod on a node.

Layout under the cache root (``VLLM_LORA_RESOLVER_CACHE_DIR``)::

    NAME -> .vllm-lora/snapshots/KEY/adapter   symlink to the current snapshot of NAME
    .vllm-lora/snapshots/KEY/adapter/          immutable adapter files: the path vLLM is handed
    .vllm-lora/snapshots/KEY/manifest.json     what the snapshot is: source, name, version, files
    .vllm-lora/snapshots/KEY/lease             every process serving KEY holds a shared flock on it
    .vllm-lora/staging/KEY.PID.RANDOM/         a fetch in progress (renamed into snapshots/ whole)
    .vllm-lora/staging/process.RANDOM/         one live process's scratch space (name links in the
                                               making), locked by that process for its life
    .vllm-lora/trash/                          snapshots being deleted
    .vllm-lora/quarantine/KEY.RANDOM/          damaged snapshots, set aside for inspection
    .vllm-lora/locks/KEY.lock                  one fetcher per KEY across processes
    .vllm-lora/answers/DIGEST.json             the last answer to a question processes of this
                                               node share (`node_answer`: a store lookup, say)

A snapshot appears only by one ``rename`` of a complete, checked staging directory, so a crash
leaves the old state or the new one. Eviction takes the lease file's exclusive lock without
waiting; it fails while any live process holds its shared lease, and a dead process's lease is
released by the kernel.

Everything "in progress" is marked by a lock the kernel releases when its process dies (never by a
PID or an age: pods on one node share this directory but not a PID namespace), so whatever a
dead process left in ``staging/`` is recognised as debris, and removed, the next time any process
opens the cache.

The size cap (``max_bytes``) bounds the snapshots no live process leases: room is made before a
fetch (for the bytes about to arrive), when a process opens the cache, and when the disk is full.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import secrets
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vllm_lora_resolvers.checksums import RECORDED, file_digests
from vllm_lora_resolvers.errors import CacheError, CacheFullError
from vllm_lora_resolvers.memory import KeyedLocks

logger = logging.getLogger("vllm.lora_resolvers.cache")

STATE_DIR = ".vllm-lora"
MANIFEST = "manifest.json"
LEASE = "lease"
ADAPTER_DIR = "adapter"
PROCESS_DIR_PREFIX = "process."
#: The node's count of evicted snapshots, under `STATE_DIR`.
EVICTIONS = "evictions"
_READ_ONLY_FILE = 0o444
_READ_ONLY_DIR = 0o555
_SNAPSHOT_KEY = re.compile(r"[0-9a-f]{40}")
#: ``st_blocks`` counts 512-byte units whatever the filesystem's block size.
_STAT_BLOCK = 512


class SnapshotFile(BaseModel):
    """One file of a snapshot, as checked when it was fetched."""

    model_config = ConfigDict(frozen=True)

    path: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a file of the adapter folder
    size: int = Field(ge=0)
    crc32c: str


class SnapshotManifest(BaseModel):
    """What a snapshot holds and where it came from."""

    model_config = ConfigDict(frozen=True)

    source: str
    name: str
    version: str
    files: tuple[SnapshotFile, ...]
    created_at: float
    #: The fingerprint of the ``VLLM_LORA_RESOLVER_TRUST`` its signature was checked under when
    #: it was fetched (`vllm_lora_resolvers.signing.Trust`); ``None``: fetched unchecked. A
    #: server under another trust checks it again before serving it.
    trust: str | None = None

    @property
    def total_bytes(self) -> int:
        """Bytes of adapter files in the snapshot."""
        return sum(file.size for file in self.files)


@dataclass(frozen=True)
class Snapshot:
    """A complete, immutable snapshot in the cache."""

    key: str
    path: Path
    manifest: SnapshotManifest

    @property
    def adapter_dir(self) -> Path:
        """The folder handed to vLLM as ``lora_path``."""
        return self.path / ADAPTER_DIR


class NodeAnswer(BaseModel):
    """A recorded answer to a question the node's processes share (see `node_answer`)."""

    model_config = ConfigDict(frozen=True)

    question: str
    answer: str
    at: float


def _read_answer(record: Path, question: str) -> NodeAnswer | None:
    try:
        answer = NodeAnswer.model_validate_json(record.read_bytes())
    except (OSError, ValidationError):
        return None
    return answer if answer.question == question else None


def snapshot_key(source: str, name: str, version: str) -> str:
    """A stable key for one version of one adapter of one store."""
    digest = hashlib.sha256(f"{source}\0{name}\0{version}".encode()).hexdigest()
    return digest[:40]


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
        self.state = self.root / STATE_DIR
        self.snapshots = self.state / "snapshots"
        self.staging = self.state / "staging"
        self.trash = self.state / "trash"
        self.locks = self.state / "locks"
        self.quarantine = self.state / "quarantine"
        self.answers = self.state / "answers"
        self._leases: dict[str, tuple[int, Snapshot]] = {}
        self._leases_guard = threading.Lock()
        self._key_guards = KeyedLocks()
        self._process_dir: Path | None = None
        self._served_sources: set[str] = set()
        self._withheld_sources: dict[str, str] = {}
        self._reported_damage: set[str] = set()
        #: key -> (its folder's inode, its manifest), as read: a snapshot published again (after
        #: an eviction) is a new folder, read again.
        self._manifests: dict[str, tuple[int, SnapshotManifest]] = {}
        try:
            self._make_layout()
        except OSError as error:
            raise CacheError(
                f"cache directory {self.root} is not usable ({error.strerror}); "
                "set VLLM_LORA_RESOLVER_CACHE_DIR to a writable node-local directory"
            ) from None
        self._real_snapshots = str(self.snapshots.resolve())
        self.remove_debris()
        self.evict()

    # -- reading -------------------------------------------------------------------------

    def _make_layout(self) -> None:
        """Create the cache's folders (again, if someone removed them while we ran)."""
        for directory in (
            self.snapshots,
            self.staging,
            self.trash,
            self.locks,
            self.quarantine,
            self.answers,
        ):
            directory.mkdir(parents=True, exist_ok=True)

    def find(self, key: str) -> Snapshot | None:
        """The complete snapshot ``key``, or ``None`` (also for a string that is not a key); a
        damaged one is quarantined."""
        if not _SNAPSHOT_KEY.fullmatch(key):
            return None
        path = self.snapshots / key
        try:
            folder = path.stat().st_ino
        except (FileNotFoundError, NotADirectoryError):
            self._manifests.pop(key, None)
            return None
        known = self._manifests.get(key)
        if known is not None and known[0] == folder:
            return Snapshot(key, path, known[1])  # a snapshot is immutable: read it once
        try:
            raw = (path / MANIFEST).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as error:
            self._quarantine(key, f"its manifest cannot be read ({error.strerror})")
            return None
        try:
            manifest = SnapshotManifest.model_validate_json(raw)
        except ValidationError:
            self._quarantine(key, "its manifest is damaged")
            return None
        if snapshot_key(manifest.source, manifest.name, manifest.version) != key:
            self._quarantine(key, "its manifest describes another snapshot")
            return None
        self._manifests[key] = (folder, manifest)
        return Snapshot(key, path, manifest)

    def _quarantine(self, key: str, reason: str) -> None:
        """Set a damaged snapshot aside (unless a live process leases it) and report it once."""
        moved = False
        with contextlib.suppress(OSError):
            moved = self._move_unless_leased(
                self.snapshots / key, self.quarantine / f"{key}.{secrets.token_hex(4)}"
            )
        if key in self._reported_damage:
            return
        self._reported_damage.add(key)
        logger.warning(
            "snapshot %s in the adapter cache is damaged (%s); %s",
            key,
            reason,
            "moved to .vllm-lora/quarantine for inspection (`vllm-lora cache prune` deletes it)"
            if moved
            else "left in place while a live process leases it",
        )

    def quarantined(self) -> list[str]:
        """The damaged snapshots set aside, by folder name."""
        try:
            return sorted(entry.name for entry in os.scandir(self.quarantine))
        except FileNotFoundError:
            return []

    def contains(self, key: str) -> bool:
        """Whether the complete snapshot ``key`` is in the cache (one ``stat``)."""
        return (self.snapshots / key / MANIFEST).exists()

    def all_snapshots(self) -> list[Snapshot]:
        """Every complete snapshot, in no particular order."""
        found = []
        try:
            entries = list(os.scandir(self.snapshots))
        except FileNotFoundError:
            return []  # the cache folder was removed under us; the next fetch recreates it
        for entry in entries:
            snapshot = self.find(entry.name)
            if snapshot is not None:
                found.append(snapshot)
        return found

    def usage(self) -> CacheUsage:
        """What the cache holds now, and how many snapshots were evicted from it so far."""
        snapshots = self.all_snapshots()
        return CacheUsage(
            snapshots=len(snapshots),
            bytes=sum(s.manifest.total_bytes for s in snapshots),
            evictions=self.evictions(),
        )

    def latest_for(self, source: str, name: str) -> Snapshot | None:
        """The newest snapshot of ``name`` from ``source`` (used when the store is unreachable)."""
        candidates = [
            snapshot
            for snapshot in self.all_snapshots()
            if snapshot.manifest.source == source and snapshot.manifest.name == name
        ]
        return max(candidates, key=lambda s: s.manifest.created_at, default=None)

    def snapshot_containing(self, real_path: str) -> str | None:
        """The key of the snapshot whose adapter folder is ``real_path`` (symlinks resolved)."""
        parent, leaf = os.path.split(real_path)
        snapshots, key = os.path.split(parent)
        return key if leaf == ADAPTER_DIR and snapshots == self._real_snapshots else None

    def snapshot_in_path(self, lora_path: str) -> Snapshot | None:
        """The snapshot of this cache that ``lora_path``, an adapter folder handed to vLLM,
        is: ``.../.vllm-lora/snapshots/KEY/adapter``, wherever the caller mounts the cache."""
        parts = Path(lora_path).parts
        if len(parts) < 4 or parts[-4:-2] != (STATE_DIR, "snapshots") or parts[-1] != ADAPTER_DIR:
            return None
        return self.find(parts[-2]) if _SNAPSHOT_KEY.fullmatch(parts[-2]) else None

    # -- whose snapshots this process serves ------------------------------------------------

    def serve_source(self, source: str) -> None:
        """Declare that this process resolves adapters from ``source`` (a store's identity)."""
        self._served_sources.add(source)

    def serves(self, snapshot: Snapshot) -> bool:
        """Whether ``snapshot`` comes from a store this process resolves from: pods of other
        stores share the node cache, and their snapshots (and ``NAME`` links) are not ours."""
        return snapshot.manifest.source in self._served_sources

    def withhold_source(self, source: str, reason: str) -> None:
        """Serve no snapshot of ``source`` in this process, by any resolver, until
        `resume_source`: its store refused us, or cannot be reached while cached copies may not
        be served. ``reason`` is what a client asking for one of them is told."""
        self._withheld_sources[source] = reason

    def resume_source(self, source: str) -> None:
        """The store of ``source`` answered again: its snapshots may be served."""
        self._withheld_sources.pop(source, None)

    def withheld(self, snapshot: Snapshot) -> str | None:
        """Why ``snapshot`` may not be served now (`withhold_source`), or ``None``."""
        return self._withheld_sources.get(snapshot.manifest.source)

    # -- leases --------------------------------------------------------------------------

    def lease(self, key: str) -> Snapshot | None:
        """Hold ``key`` for the life of this process; ``None`` if it is not (or no longer) cached.

        The lease is a shared ``flock`` on the snapshot's lease file, kept open until the process
        exits. It also marks the snapshot as recently used for LRU eviction.
        """
        if not _SNAPSHOT_KEY.fullmatch(key):
            return None  # a key read from a record another process wrote, damaged
        with self._leases_guard:
            held = self._leases.get(key)
            if held is not None:
                if held[1].path.is_dir():
                    return held[1]
                os.close(self._leases.pop(key)[0])  # removed under us: look again
            lease_path = self.snapshots / key / LEASE
            try:
                descriptor = os.open(lease_path, os.O_RDONLY | os.O_CLOEXEC)
            except (FileNotFoundError, NotADirectoryError):
                return None
            fcntl.flock(descriptor, fcntl.LOCK_SH)
            # An evictor may have moved the snapshot away between our open and our flock.
            snapshot = self.find(key) if _same_file(descriptor, lease_path) else None
            if snapshot is None:
                os.close(descriptor)
                return None
            self._leases[key] = (descriptor, snapshot)
        with contextlib.suppress(OSError):
            os.utime(lease_path)
        return snapshot

    def held(self, key: str) -> Snapshot | None:
        """The snapshot ``key`` if this process already leases it (one ``stat``: someone may
        have removed the cache folder)."""
        held = self._leases.get(key)
        if held is None or not held[1].path.is_dir():
            return None
        return held[1]

    def release(self, key: str) -> None:
        """Give up this process's lease on ``key`` (nothing happens if it holds none): once no
        live process leases it, the snapshot counts against the cap and may be evicted."""
        with self._leases_guard:
            held = self._leases.pop(key, None)
        if held is not None:
            os.close(held[0])

    def leased_keys(self) -> set[str]:
        """The keys of the snapshots this process leases."""
        with self._leases_guard:
            return set(self._leases)

    def is_leased_by_anyone(self, key: str) -> bool:
        """Whether any live process (this one included) leases ``key``."""
        return is_locked(self.snapshots / key / LEASE)

    # -- writing -------------------------------------------------------------------------

    @contextlib.contextmanager
    def fetch_lock(self, key: str) -> Iterator[None]:
        """Exclusive right to fetch ``key``: one thread in this process, one process on the node.

        Holding it, leftovers of an earlier fetch of ``key`` that crashed are removed.
        """
        with self._key_guards.hold(key):
            try:
                try:
                    descriptor = _lock_file(self.locks / f"{key}.lock", wait=True)
                except FileNotFoundError:  # someone removed the cache folder under us
                    self._make_layout()
                    descriptor = _lock_file(self.locks / f"{key}.lock", wait=True)
            except OSError as error:
                raise cache_write_error(error) from None
            assert descriptor is not None
            try:
                for leftover in self.staging.glob(f"{key}.*"):
                    _remove_tree(leftover)
                yield
            finally:
                _unlock_and_remove(self.locks / f"{key}.lock", descriptor)

    def new_staging(self, key: str) -> Path:
        """An empty staging directory for ``key``, with its ``adapter/`` folder created.

        Call it while holding `fetch_lock` for ``key``.
        """
        staging = self.staging / f"{key}.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            (staging / ADAPTER_DIR).mkdir(parents=True)
        except OSError as error:
            raise cache_write_error(error) from None
        return staging

    def bytes_in_flight(self, key: str) -> int:
        """Bytes written so far by fetches of snapshot ``key`` in progress (any process's), for
        progress reports. Ranged downloads size a file before writing its parts, so a file
        counts its allocated blocks, not its length."""
        written = 0
        for path in self.staging.glob(f"{key}.*/{ADAPTER_DIR}/*"):
            try:
                status = path.stat()
            except FileNotFoundError:
                continue  # published or discarded meanwhile
            written += min(status.st_size, status.st_blocks * _STAT_BLOCK)
        return written

    def discard_staging(self, staging: Path) -> None:
        """Delete a staging directory whose fetch failed."""
        _remove_tree(staging)

    def publish(self, staging: Path, key: str, manifest: SnapshotManifest) -> Snapshot:
        """Seal ``staging`` (manifest, lease file, read-only) and rename it into place at once.

        The snapshot is leased by this process before it becomes visible, so no evictor can
        take it between its publication and its first use.
        """
        descriptor = None
        try:
            (staging / MANIFEST).write_text(manifest.model_dump_json())
            (staging / LEASE).touch()
            adapter_dir = staging / ADAPTER_DIR
            for file in adapter_dir.iterdir():
                file.chmod(_READ_ONLY_FILE)
            _fsync_tree(staging)
            adapter_dir.chmod(_READ_ONLY_DIR)
            descriptor = os.open(staging / LEASE, os.O_RDONLY | os.O_CLOEXEC)
            fcntl.flock(descriptor, fcntl.LOCK_SH)  # the descriptor follows the rename
            staging.rename(self.snapshots / key)
        except OSError as error:
            if descriptor is not None:
                os.close(descriptor)
            _remove_tree(staging)
            existing = self.lease(key) if error.errno in (errno.ENOTEMPTY, errno.EEXIST) else None
            if existing is not None:
                return existing
            raise cache_write_error(error) from None
        snapshot = Snapshot(key, self.snapshots / key, manifest)
        with self._leases_guard:
            self._leases[key] = (descriptor, snapshot)
        return snapshot

    def point_name(self, name: str, snapshot: Snapshot) -> None:
        """Make ``ROOT/NAME`` a symlink to ``snapshot``, atomically, so vLLM's built-in
        filesystem resolver and people can find adapters by name.

        A real file or folder already at that path belongs to someone else and is left alone.
        A cache that cannot be written (remounted read-only, say) keeps its old links: the
        snapshot itself is served all the same.
        """
        try:
            self._point_name(name, snapshot)
        except OSError as error:
            logger.warning("cannot link %r in the adapter cache: %s", name, error.strerror)

    def _point_name(self, name: str, snapshot: Snapshot) -> None:
        link = self.root / name
        for parent in reversed(link.relative_to(self.root).parents):
            if (self.root / parent).is_symlink():
                logger.debug("not naming %r: %s is an adapter link", name, parent)
                return
        if os.path.lexists(link) and not link.is_symlink():
            logger.debug("not naming %r: a real folder of that name is in the cache root", name)
            return
        link.parent.mkdir(parents=True, exist_ok=True)
        target = os.path.relpath(snapshot.adapter_dir, link.parent)
        temporary = self._own_scratch() / f"link.{secrets.token_hex(8)}"
        temporary.symlink_to(target)
        temporary.replace(link)

    def _own_scratch(self) -> Path:
        """This process's scratch folder in ``staging/``, exclusively flocked for the process's
        life: if the process dies, the kernel drops the lock and the folder becomes debris."""
        with self._leases_guard:
            if self._process_dir is None:
                self._process_dir = self._new_locked_process_dir()
            return self._process_dir

    def _new_locked_process_dir(self) -> Path:
        while True:
            path = self.staging / f"{PROCESS_DIR_PREFIX}{secrets.token_hex(8)}"
            path.mkdir()
            descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            fcntl.flock(descriptor, fcntl.LOCK_EX)  # kept open (and locked) until we exit
            if os.fstat(descriptor).st_nlink > 0:
                return path
            # Another process's debris sweep removed it between our mkdir and our flock.
            os.close(descriptor)

    def unpoint_name(self, name: str, only_if_key: str | None = None) -> None:
        """Remove the ``ROOT/NAME`` symlink (only if it points at ``only_if_key``, when given)."""
        link = self.root / name
        if not link.is_symlink():
            return
        if only_if_key is not None and link.readlink().parent.name != only_if_key:
            return
        with contextlib.suppress(FileNotFoundError):
            link.unlink()

    # -- answers shared by the node's processes ----------------------------------------------

    def node_answer(
        self,
        question: str,
        max_age: float,
        ask: Callable[[], str],
        accept: Callable[[str], bool] | None = None,
    ) -> tuple[str, bool]:
        """The answer to ``question`` some process of this node recorded at most ``max_age``
        seconds ago, else ``ask()``'s, recorded for the others: ``(answer, asked here)``.

        Processes asking at once wait for the first one's answer (one lock per question), so a
        node asks at most once per ``max_age`` however many processes want to know. A recorded
        answer ``accept`` rejects (a damaged record) is asked again and rewritten.
        """
        digest = hashlib.sha256(question.encode()).hexdigest()[:40]
        record = self.answers / f"{digest}.json"
        lock = self.locks / f"answer.{digest}.lock"
        try:
            self._make_layout()
            descriptor = _lock_file(lock, wait=True)
        except OSError as error:
            raise cache_write_error(error) from None
        assert descriptor is not None
        try:
            recorded = _read_answer(record, question)
            if (
                recorded is not None
                and 0 <= time.time() - recorded.at < max_age
                and (accept is None or accept(recorded.answer))
            ):
                return recorded.answer, False
            answer = ask()
            temporary = self._own_scratch() / f"answer.{secrets.token_hex(8)}"
            temporary.write_text(
                NodeAnswer(question=question, answer=answer, at=time.time()).model_dump_json()
            )
            temporary.replace(record)
            return answer, True
        finally:
            _unlock_and_remove(lock, descriptor)

    # -- eviction and cleaning --------------------------------------------------------------

    def evict(self, incoming_bytes: int = 0) -> list[Snapshot]:
        """Delete least-recently-used unleased snapshots until the cache, plus
        ``incoming_bytes`` about to be fetched, fits ``max_bytes``, and the disk has room for
        ``incoming_bytes``.

        A snapshot leased by any live process is never deleted, so the cache can stay above the
        cap while everything in it is in use. Skipped while another process is evicting.
        Returns what was evicted.
        """
        if self.max_bytes is None and incoming_bytes == 0:
            return []
        try:
            with FileLock(self.locks / "evict.lock", timeout=0):
                return self._evict_locked(self.max_bytes, incoming_bytes)
        except Timeout:
            return []  # another process is evicting right now
        except OSError as error:
            logger.warning("cannot evict from the adapter cache: %s", error.strerror)
            return []

    def prune(self, max_bytes: int) -> list[Snapshot]:
        """Delete quarantined snapshots, then least-recently-used ones until the cache fits
        ``max_bytes``, now.

        As `evict`, but with any cap and waiting for another process's eviction to end rather
        than skipping. A snapshot leased by any live process is never deleted. Returns what was
        evicted.
        """
        with FileLock(self.locks / "evict.lock"):
            for entry in self.quarantine.iterdir():
                _remove_tree(entry)
            return self._evict_locked(max_bytes, 0)

    def make_room_on_disk(self, needed_bytes: int) -> list[Snapshot]:
        """The disk is full: delete least-recently-used unleased snapshots until it has
        ``needed_bytes`` free (or nothing unleased is left). Returns what was evicted."""
        with FileLock(self.locks / "evict.lock"):
            return self._evict_locked(None, needed_bytes, disk_only=True)

    def _evict_locked(
        self, max_bytes: int | None, incoming_bytes: int, *, disk_only: bool = False
    ) -> list[Snapshot]:
        no_cap = max_bytes is None or disk_only
        if no_cap and shutil.disk_usage(self.root).free >= incoming_bytes:
            return []  # nothing to make room for: no need to list the snapshots
        snapshots = self.all_snapshots()
        total = sum(s.manifest.total_bytes for s in snapshots)

        def fits() -> bool:
            over_cap = max_bytes is not None and total + incoming_bytes > max_bytes
            if over_cap and not disk_only:
                return False
            return incoming_bytes == 0 or shutil.disk_usage(self.root).free >= incoming_bytes

        evicted = []
        for snapshot in sorted(snapshots, key=self.last_used):
            if fits():
                break
            if self._delete_unless_leased(snapshot):
                total -= snapshot.manifest.total_bytes
                evicted.append(snapshot)
        if evicted:
            self._count_evictions(len(evicted))
        return evicted

    def _count_evictions(self, count: int) -> None:
        """Add ``count`` to the node's eviction count (under the eviction lock; a count that
        cannot be written, on a full disk say, is lost rather than failing the eviction)."""
        with contextlib.suppress(OSError):
            self._write_evictions(self.evictions() + count)

    def _write_evictions(self, count: int) -> None:
        temporary = self._own_scratch() / f"evictions.{secrets.token_hex(8)}"
        temporary.write_text(str(count))
        temporary.replace(self.state / EVICTIONS)

    def evictions(self) -> int:
        """Snapshots evicted from this cache so far, by every process (0 if the count is
        unreadable: it is rewritten at the next eviction)."""
        try:
            text = (self.state / EVICTIONS).read_text()
        except (FileNotFoundError, UnicodeDecodeError):
            return 0
        return int(text) if text.isdigit() and len(text) < 20 else 0

    def last_used(self, snapshot: Snapshot) -> float:
        """When a process last leased ``snapshot`` (a Unix time; 0 if it is gone)."""
        try:
            return (snapshot.path / LEASE).stat().st_mtime
        except FileNotFoundError:
            return 0.0

    def _delete_unless_leased(self, snapshot: Snapshot) -> bool:
        doomed = self.trash / f"{snapshot.key}.{secrets.token_hex(4)}"
        if not self._move_unless_leased(snapshot.path, doomed):
            return False
        self.unpoint_name(snapshot.manifest.name, only_if_key=snapshot.key)
        _remove_tree(doomed)
        logger.info(
            "evicted snapshot %s of %r (%d bytes)",
            snapshot.key,
            snapshot.manifest.name,
            snapshot.manifest.total_bytes,
        )
        return True

    def _move_unless_leased(self, path: Path, destination: Path) -> bool:
        """Rename snapshot folder ``path`` to ``destination`` unless a live process leases it."""
        try:
            descriptor = _lock_unless_held(path / LEASE)
        except FileNotFoundError:
            return False
        if descriptor is None:
            return False
        try:
            path.rename(destination)
        finally:
            os.close(descriptor)
        return True

    def verify(self) -> list[str]:
        """Re-read every snapshot and compare each file's size and CRC32C with its manifest.

        Returns one line per damaged file, naming the snapshot, its adapter and the file; an
        empty list when everything is intact.
        """
        problems = []
        for snapshot in sorted(self.all_snapshots(), key=lambda s: (s.manifest.name, s.key)):
            for file in snapshot.manifest.files:
                problem = _damage(snapshot.adapter_dir / file.path, file)
                if problem is not None:
                    problems.append(
                        f"snapshot {snapshot.key} of {snapshot.manifest.name!r}: "
                        f"{file.path}: {problem}"
                    )
        return problems

    def remove_debris(self) -> None:
        """Remove what dead processes left: staging folders whose fetch lock or process lock
        nobody holds any more, and trash."""
        for entry in self.staging.iterdir():
            if entry.name.startswith(PROCESS_DIR_PREFIX):
                _remove_unless_locked(entry)
                continue
            lock = self.locks / f"{entry.name.split('.')[0]}.lock"
            descriptor = _lock_file(lock, wait=False)
            if descriptor is None:
                continue  # a live process is fetching this key
            _remove_tree(entry)
            _unlock_and_remove(lock, descriptor)
        for entry in self.trash.iterdir():
            _remove_tree(entry)


#: Write errors that mean "this disk": full, over quota, read-only, not ours to write.
CACHE_DISK_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}
)


def is_locked(path: Path) -> bool:
    """Whether a live process holds a lock on ``path`` (a snapshot's lease file, a process's
    scratch folder), without keeping one."""
    try:
        descriptor = _lock_unless_held(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    if descriptor is None:
        return True
    os.close(descriptor)
    return False


def _lock_unless_held(path: Path) -> int | None:
    """An exclusive ``flock`` on ``path``, taken without waiting, as a descriptor to close when
    done; ``None`` if a live process holds a lock on it."""
    descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        return None
    return descriptor


def cache_write_error(error: OSError) -> CacheError:
    """A `CacheError` for a failed write in the cache, saying what to do about it (without
    the server's paths: clients read it)."""
    where = "cannot write to the adapter cache (VLLM_LORA_RESOLVER_CACHE_DIR)"
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return CacheFullError(
            f"{where}: the disk is full; free space or lower VLLM_LORA_RESOLVER_CACHE_MAX_BYTES"
        )
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        advice = "it is not writable by this process; fix its permissions or mount"
    else:
        advice = error.strerror or type(error).__name__
    return CacheError(f"{where}: {advice}")


def _damage(path: Path, expected: SnapshotFile) -> str | None:
    """What is wrong with ``path`` compared with its manifest entry, or ``None``."""
    try:
        status = path.lstat()  # a link, FIFO or device is never opened: reading could block
        if not stat.S_ISREG(status.st_mode):
            return "not a regular file"
        size = status.st_size
        if size != expected.size:
            return f"{size} bytes, the manifest says {expected.size}"
        crc32c = file_digests(path, ())[RECORDED]
    except OSError as error:
        return error.strerror or type(error).__name__
    if crc32c != expected.crc32c:
        return f"CRC32C {crc32c}, the manifest says {expected.crc32c}"
    return None


def _lock_file(path: Path, *, wait: bool) -> int | None:
    """An exclusive ``flock`` on the lock file ``path`` (created if need be), as a descriptor to
    keep open while it is held; ``None`` if ``wait`` is false and a live process holds it.

    Lock files are removed by their holder when done (`_unlock_and_remove`), so one locked after
    waiting may be gone from the folder: then it is taken again, on the file now at ``path``.
    """
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(descriptor)
            return None
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(descriptor), path.stat()):
                return descriptor
        os.close(descriptor)  # removed (or replaced) by its last holder meanwhile


def _unlock_and_remove(path: Path, descriptor: int) -> None:
    """Remove the lock file while still holding it, then release it: a waiter holding the old
    file sees it removed and takes the new one, so ``locks/`` never grows."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    os.close(descriptor)


def _remove_unless_locked(directory: Path) -> None:
    """Delete ``directory`` unless a live process holds its flock."""
    try:
        descriptor = _lock_unless_held(directory)
    except (FileNotFoundError, NotADirectoryError):
        _remove_tree(directory)
        return
    if descriptor is None:
        return  # its process is alive
    try:
        _remove_tree(directory)
    finally:
        os.close(descriptor)


def _same_file(descriptor: int, path: Path) -> bool:
    try:
        on_disk = path.stat()
    except FileNotFoundError:
        return False
    held = os.fstat(descriptor)
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)


def _fsync_tree(root: Path) -> None:
    """Make a staging folder's content durable before it is renamed into place: the bytes of each
    file that has any (an empty file, the lease, is durable with its folder's entry) and each
    folder's entries. A crash after the rename but before it is durable loses the publish, not the
    content: the folder comes back as staging debris, removed, and the adapter fetched again."""
    for directory, _, files in os.walk(root):
        for name in files:
            descriptor = os.open(Path(directory) / name, os.O_RDONLY)
            try:
                if os.fstat(descriptor).st_size:
                    os.fsync(descriptor)
            finally:
                os.close(descriptor)
        _fsync_directory(Path(directory))


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _remove_tree(path: Path) -> None:
    """Delete ``path`` and everything below it, read-only folders included."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
        return
    for directory, _, _ in os.walk(path):
        with contextlib.suppress(OSError):
            Path(directory).chmod(stat.S_IRWXU)
    shutil.rmtree(path, ignore_errors=True)
