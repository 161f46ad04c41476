"""Eviction: least-recently-used snapshots no live process leases are deleted to keep the cache
under its cap and the disk from filling; the node counts them."""

from __future__ import annotations

import contextlib
import logging
import secrets
import shutil

from filelock import FileLock, Timeout

from vllm_lora_resolvers.cache.files import move_unless_leased, remove_tree
from vllm_lora_resolvers.cache.layout import EVICTIONS, LEASE, Layout
from vllm_lora_resolvers.cache.links import NameLinks
from vllm_lora_resolvers.cache.snapshots import Snapshot, Snapshots
from vllm_lora_resolvers.cache.staging import Staging

logger = logging.getLogger("vllm.lora_resolvers.cache")


class Eviction:
    """Making room in the cache: for its cap (``max_bytes``), for a fetch, on a full disk."""

    def __init__(
        self,
        layout: Layout,
        max_bytes: int | None,
        snapshots: Snapshots,
        links: NameLinks,
        staging: Staging,
    ) -> None:
        self._layout = layout
        self._max_bytes = max_bytes
        self._snapshots = snapshots
        self._links = links
        self._staging = staging

    def evict(self, incoming_bytes: int = 0) -> list[Snapshot]:
        """Delete least-recently-used unleased snapshots until the cache, plus
        ``incoming_bytes`` about to be fetched, fits ``max_bytes``, and the disk has room for
        ``incoming_bytes``.

        A snapshot leased by any live process is never deleted, so the cache can stay above the
        cap while everything in it is in use. Skipped while another process is evicting.
        Returns what was evicted.
        """
        try:
            if self._max_bytes is None and self._disk_has_room(incoming_bytes):
                return []  # no cap, and room on the disk: nothing to lock, nothing to list
            with FileLock(self._layout.locks / "evict.lock", timeout=0):
                return self._evict_locked(self._max_bytes, incoming_bytes)
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
        with FileLock(self._layout.locks / "evict.lock"):
            for entry in self._layout.quarantine.iterdir():
                remove_tree(entry)
            return self._evict_locked(max_bytes, 0)

    def make_room_on_disk(self, needed_bytes: int) -> list[Snapshot]:
        """The disk is full: delete least-recently-used unleased snapshots until it has
        ``needed_bytes`` free (or nothing unleased is left). Returns what was evicted."""
        with FileLock(self._layout.locks / "evict.lock"):
            return self._evict_locked(None, needed_bytes, disk_only=True)

    def _evict_locked(
        self, max_bytes: int | None, incoming_bytes: int, *, disk_only: bool = False
    ) -> list[Snapshot]:
        no_cap = max_bytes is None or disk_only
        if no_cap and self._disk_has_room(incoming_bytes):
            return []  # nothing to make room for: no need to list the snapshots
        snapshots = self._snapshots.all()
        total = sum(s.manifest.total_bytes for s in snapshots)

        def fits() -> bool:
            over_cap = max_bytes is not None and total + incoming_bytes > max_bytes
            if over_cap and not disk_only:
                return False
            return self._disk_has_room(incoming_bytes)

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

    def _disk_has_room(self, incoming_bytes: int) -> bool:
        """Whether the cache's disk has ``incoming_bytes`` free (asked only if more than 0)."""
        return incoming_bytes == 0 or shutil.disk_usage(self._layout.root).free >= incoming_bytes

    def _count_evictions(self, count: int) -> None:
        """Add ``count`` to the node's eviction count (under the eviction lock; a count that
        cannot be written, on a full disk say, is lost rather than failing the eviction)."""
        with contextlib.suppress(OSError):
            self._write_evictions(self.evictions() + count)

    def _write_evictions(self, count: int) -> None:
        temporary = self._staging.scratch() / f"evictions.{secrets.token_hex(8)}"
        temporary.write_text(str(count))
        temporary.replace(self._layout.state / EVICTIONS)

    def evictions(self) -> int:
        """Snapshots evicted from this cache so far, by every process (0 if the count is
        unreadable: it is rewritten at the next eviction)."""
        try:
            text = (self._layout.state / EVICTIONS).read_text()
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
        doomed = self._layout.trash / f"{snapshot.key}.{secrets.token_hex(4)}"
        if not move_unless_leased(snapshot.path, doomed):
            return False
        self._links.unpoint(snapshot.manifest.name, only_if_key=snapshot.key)
        remove_tree(doomed)
        logger.info(
            "evicted snapshot %s of %r (%d bytes)",
            snapshot.key,
            snapshot.manifest.name,
            snapshot.manifest.total_bytes,
        )
        return True
