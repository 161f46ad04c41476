"""The snapshots: what one is (its manifest), finding and listing them, setting damaged ones aside,
and checking them against their manifests."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vllm_lora_resolvers.cache.files import move_unless_leased
from vllm_lora_resolvers.cache.layout import ADAPTER_DIR, MANIFEST, STATE_DIR, Layout
from vllm_lora_resolvers.checksums import RECORDED, file_digests

logger = logging.getLogger("vllm.lora_resolvers.cache")

_SNAPSHOT_KEY = re.compile(r"[0-9a-f]{40}")


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


def snapshot_key(source: str, name: str, version: str) -> str:
    """A stable key for one version of one adapter of one store."""
    digest = hashlib.sha256(f"{source}\0{name}\0{version}".encode()).hexdigest()
    return digest[:40]


def is_snapshot_key(text: str) -> bool:
    """Whether ``text`` has the form of a snapshot key."""
    return _SNAPSHOT_KEY.fullmatch(text) is not None


class Snapshots:
    """The complete snapshots in ``snapshots/``, read once each (a snapshot is immutable), and
    the damaged ones set aside in ``quarantine/``."""

    def __init__(self, layout: Layout) -> None:
        self._layout = layout
        self._real_snapshots = str(layout.snapshots.resolve())
        self._reported_damage: set[str] = set()
        #: key -> (its folder's inode, its manifest), as read: a snapshot published again (after
        #: an eviction) is a new folder, read again.
        self._manifests: dict[str, tuple[int, SnapshotManifest]] = {}

    def find(self, key: str) -> Snapshot | None:
        """The complete snapshot ``key``, or ``None`` (also for a string that is not a key); a
        damaged one is quarantined."""
        if not is_snapshot_key(key):
            return None
        path = self._layout.snapshots / key
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
            moved = move_unless_leased(
                self._layout.snapshots / key,
                self._layout.quarantine / f"{key}.{secrets.token_hex(4)}",
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
            return sorted(entry.name for entry in os.scandir(self._layout.quarantine))
        except FileNotFoundError:
            return []

    def contains(self, key: str) -> bool:
        """Whether the complete snapshot ``key`` is in the cache (one ``stat``)."""
        return (self._layout.snapshots / key / MANIFEST).exists()

    def all(self) -> list[Snapshot]:
        """Every complete snapshot, in no particular order."""
        found = []
        try:
            entries = list(os.scandir(self._layout.snapshots))
        except FileNotFoundError:
            return []  # the cache folder was removed under us; the next fetch recreates it
        for entry in entries:
            snapshot = self.find(entry.name)
            if snapshot is not None:
                found.append(snapshot)
        return found

    def latest_for(self, source: str, name: str) -> Snapshot | None:
        """The newest snapshot of ``name`` from ``source`` (used when the store is unreachable)."""
        candidates = [
            snapshot
            for snapshot in self.all()
            if snapshot.manifest.source == source and snapshot.manifest.name == name
        ]
        return max(candidates, key=lambda s: s.manifest.created_at, default=None)

    def containing(self, real_path: str) -> str | None:
        """The key of the snapshot whose adapter folder is ``real_path`` (symlinks resolved)."""
        parent, leaf = os.path.split(real_path)
        snapshots, key = os.path.split(parent)
        return key if leaf == ADAPTER_DIR and snapshots == self._real_snapshots else None

    def in_path(self, lora_path: str) -> Snapshot | None:
        """The snapshot of this cache that ``lora_path``, an adapter folder handed to vLLM,
        is: ``.../.vllm-lora/snapshots/KEY/adapter``, wherever the caller mounts the cache."""
        parts = Path(lora_path).parts
        if len(parts) < 4 or parts[-4:-2] != (STATE_DIR, "snapshots") or parts[-1] != ADAPTER_DIR:
            return None
        return self.find(parts[-2]) if is_snapshot_key(parts[-2]) else None

    def verify(self) -> list[str]:
        """Re-read every snapshot and compare each file's size and CRC32C with its manifest.

        Returns one line per damaged file, naming the snapshot, its adapter and the file; an
        empty list when everything is intact.
        """
        problems = []
        for snapshot in sorted(self.all(), key=lambda s: (s.manifest.name, s.key)):
            for file in snapshot.manifest.files:
                problem = _damage(snapshot.adapter_dir / file.path, file)
                if problem is not None:
                    problems.append(
                        f"snapshot {snapshot.key} of {snapshot.manifest.name!r}: "
                        f"{file.path}: {problem}"
                    )
        return problems


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
