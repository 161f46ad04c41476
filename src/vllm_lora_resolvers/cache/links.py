"""Name links: ``ROOT/NAME`` is a symlink to the snapshot ``NAME`` resolves to, so that vLLM's
built-in filesystem resolver and people find adapters by name."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from pathlib import Path

from vllm_lora_resolvers.cache.snapshots import Snapshot, Snapshots
from vllm_lora_resolvers.cache.staging import Staging

logger = logging.getLogger("vllm.lora_resolvers.cache")


class NameLinks:
    """The ``NAME`` links in the cache root."""

    def __init__(self, root: Path, snapshots: Snapshots, staging: Staging) -> None:
        self._root = root
        self._snapshots = snapshots
        self._staging = staging

    def point(self, name: str, snapshot: Snapshot) -> None:
        """Make ``ROOT/NAME`` a symlink to ``snapshot``, atomically.

        A real file or folder already at that path belongs to someone else and is left alone.
        A cache that cannot be written (remounted read-only, say) keeps its old links: the
        snapshot itself is served all the same.
        """
        try:
            self._point(name, snapshot)
        except OSError as error:
            logger.warning("cannot link %r in the adapter cache: %s", name, error.strerror)

    def _point(self, name: str, snapshot: Snapshot) -> None:
        link = self._root / name
        for parent in reversed(link.relative_to(self._root).parents):
            if (self._root / parent).is_symlink():
                logger.debug("not naming %r: %s is an adapter link", name, parent)
                return
        if os.path.lexists(link) and not link.is_symlink():
            logger.debug("not naming %r: a real folder of that name is in the cache root", name)
            return
        link.parent.mkdir(parents=True, exist_ok=True)
        target = os.path.relpath(snapshot.adapter_dir, link.parent)
        temporary = self._staging.scratch() / f"link.{secrets.token_hex(8)}"
        temporary.symlink_to(target)
        temporary.replace(link)

    def unpoint(self, name: str, only_if_key: str | None = None) -> None:
        """Remove the ``ROOT/NAME`` symlink (only if it points at ``only_if_key``, when given)."""
        link = self._root / name
        if not link.is_symlink():
            return
        if only_if_key is not None and link.readlink().parent.name != only_if_key:
            return
        with contextlib.suppress(FileNotFoundError):
            link.unlink()

    def linked(self, name: str, source: str) -> Snapshot | None:
        """The snapshot of ``source`` the ``ROOT/NAME`` link points at, if any."""
        link = self._root / name
        if not link.is_symlink():
            return None
        key = self._snapshots.containing(str(link.resolve()))
        snapshot = self._snapshots.find(key) if key else None
        return snapshot if snapshot is not None and snapshot.manifest.source == source else None

    def unpoint_of(self, name: str, source: str) -> None:
        """Remove the ``ROOT/NAME`` link if it points at a snapshot of ``source`` (whose store
        no longer has ``name``: vLLM's filesystem resolver must not find it by name)."""
        snapshot = self.linked(name, source)
        if snapshot is not None:
            self.unpoint(name, only_if_key=snapshot.key)
