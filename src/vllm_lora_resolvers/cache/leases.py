"""Leases: a process serving a snapshot holds a shared ``flock`` on its lease file for its life, so
that no process evicts it meanwhile; the kernel releases a dead process's leases."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from pathlib import Path

from vllm_lora_resolvers.cache.files import is_locked
from vllm_lora_resolvers.cache.layout import LEASE, Layout
from vllm_lora_resolvers.cache.snapshots import Snapshot, Snapshots, is_snapshot_key


class Leases:
    """The snapshots this process leases."""

    def __init__(self, layout: Layout, snapshots: Snapshots) -> None:
        self._layout = layout
        self._snapshots = snapshots
        self._leases: dict[str, tuple[int, Snapshot]] = {}
        self._guard = threading.Lock()

    def lease(self, key: str) -> Snapshot | None:
        """Hold ``key`` for the life of this process; ``None`` if it is not (or no longer) cached.

        The lease is a shared ``flock`` on the snapshot's lease file, kept open until the process
        exits. It also marks the snapshot as recently used for LRU eviction.
        """
        if not is_snapshot_key(key):
            return None  # a key read from a record another process wrote, damaged
        with self._guard:
            held = self._leases.get(key)
            if held is not None:
                if held[1].path.is_dir():
                    return held[1]
                os.close(self._leases.pop(key)[0])  # removed under us: look again
            lease_path = self._layout.snapshots / key / LEASE
            try:
                descriptor = os.open(lease_path, os.O_RDONLY | os.O_CLOEXEC)
            except (FileNotFoundError, NotADirectoryError):
                return None
            fcntl.flock(descriptor, fcntl.LOCK_SH)
            # An evictor may have moved the snapshot away between our open and our flock.
            snapshot = self._snapshots.find(key) if _same_file(descriptor, lease_path) else None
            if snapshot is None:
                os.close(descriptor)
                return None
            self._leases[key] = (descriptor, snapshot)
        with contextlib.suppress(OSError):
            os.utime(lease_path)
        return snapshot

    def adopt(self, snapshot: Snapshot, descriptor: int) -> None:
        """Keep ``descriptor``, a shared ``flock`` on ``snapshot``'s lease file taken before it
        was published, as this process's lease on it."""
        with self._guard:
            self._leases[snapshot.key] = (descriptor, snapshot)

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
        with self._guard:
            held = self._leases.pop(key, None)
        if held is not None:
            os.close(held[0])

    def keys(self) -> set[str]:
        """The keys of the snapshots this process leases."""
        with self._guard:
            return set(self._leases)

    def by_anyone(self, key: str) -> bool:
        """Whether any live process (this one included) leases ``key``."""
        return is_locked(self._layout.snapshots / key / LEASE)


def _same_file(descriptor: int, path: Path) -> bool:
    try:
        on_disk = path.stat()
    except FileNotFoundError:
        return False
    held = os.fstat(descriptor)
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)
