"""Fetching into the cache: one fetcher per snapshot on the node (the fetch lock), its staging
folder, publishing it as a snapshot with one ``rename``, this process's scratch folder, and the
debris dead processes left."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

from vllm_lora_resolvers.cache.files import (
    cache_write_error,
    lock_file,
    lock_unless_held,
    remove_tree,
    unlock_and_remove,
)
from vllm_lora_resolvers.cache.layout import (
    ADAPTER_DIR,
    LEASE,
    MANIFEST,
    PROCESS_DIR_PREFIX,
    Layout,
)
from vllm_lora_resolvers.cache.leases import Leases
from vllm_lora_resolvers.cache.snapshots import Snapshot, SnapshotManifest
from vllm_lora_resolvers.memory import KeyedLocks

_READ_ONLY_FILE = 0o444
_READ_ONLY_DIR = 0o555
#: ``st_blocks`` counts 512-byte units whatever the filesystem's block size.
_STAT_BLOCK = 512


class Staging:
    """Fetches in progress in ``staging/``, and this process's scratch folder there."""

    def __init__(self, layout: Layout, leases: Leases) -> None:
        self._layout = layout
        self._leases = leases
        self._key_guards = KeyedLocks()
        self._process_dir: Path | None = None
        self._process_dir_guard = threading.Lock()

    @contextlib.contextmanager
    def fetch_lock(self, key: str) -> Iterator[None]:
        """Exclusive right to fetch ``key``: one thread in this process, one process on the node.

        Holding it, leftovers of an earlier fetch of ``key`` that crashed are removed.
        """
        locks = self._layout.locks
        with self._key_guards.hold(key):
            try:
                try:
                    descriptor = lock_file(locks / f"{key}.lock", wait=True)
                except FileNotFoundError:  # someone removed the cache folder under us
                    self._layout.make()
                    descriptor = lock_file(locks / f"{key}.lock", wait=True)
            except OSError as error:
                raise cache_write_error(error) from None
            assert descriptor is not None
            try:
                for leftover in _entries_named(self._layout.staging, f"{key}."):
                    remove_tree(leftover)
                yield
            finally:
                unlock_and_remove(locks / f"{key}.lock", descriptor)

    def new(self, key: str) -> Path:
        """An empty staging directory for ``key``, with its ``adapter/`` folder created.

        Call it while holding `fetch_lock` for ``key``.
        """
        staging = self._layout.staging / f"{key}.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            staging.mkdir(parents=True)
            (staging / ADAPTER_DIR).mkdir()
        except OSError as error:
            raise cache_write_error(error) from None
        return staging

    def bytes_in_flight(self, key: str) -> int:
        """Bytes written so far by fetches of snapshot ``key`` in progress (any process's), for
        progress reports. Ranged downloads size a file before writing its parts, so a file
        counts its allocated blocks, not its length."""
        written = 0
        for path in self._layout.staging.glob(f"{key}.*/{ADAPTER_DIR}/*"):
            try:
                status = path.stat()
            except FileNotFoundError:
                continue  # published or discarded meanwhile
            written += min(status.st_size, status.st_blocks * _STAT_BLOCK)
        return written

    def discard(self, staging: Path) -> None:
        """Delete a staging directory whose fetch failed."""
        remove_tree(staging)

    def publish(self, staging: Path, key: str, manifest: SnapshotManifest) -> Snapshot:
        """Seal ``staging`` (manifest, lease file, read-only) and rename it into place at once.

        The snapshot is leased by this process before it becomes visible, so no evictor can
        take it between its publication and its first use.
        """
        descriptor = None
        snapshots = self._layout.snapshots
        try:
            (staging / MANIFEST).write_text(manifest.model_dump_json())
            descriptor = os.open(staging / LEASE, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
            fcntl.flock(descriptor, fcntl.LOCK_SH)  # the descriptor follows the rename
            adapter_dir = staging / ADAPTER_DIR
            for file in adapter_dir.iterdir():
                file.chmod(_READ_ONLY_FILE)
            _fsync_tree(staging)
            adapter_dir.chmod(_READ_ONLY_DIR)
            staging.rename(snapshots / key)
        except OSError as error:
            if descriptor is not None:
                os.close(descriptor)
            remove_tree(staging)
            published = error.errno in (errno.ENOTEMPTY, errno.EEXIST)
            existing = self._leases.lease(key) if published else None
            if existing is not None:
                return existing
            raise cache_write_error(error) from None
        snapshot = Snapshot(key, snapshots / key, manifest)
        self._leases.adopt(snapshot, descriptor)
        return snapshot

    def scratch(self) -> Path:
        """This process's scratch folder in ``staging/``, exclusively flocked for the process's
        life: if the process dies, the kernel drops the lock and the folder becomes debris."""
        with self._process_dir_guard:
            if self._process_dir is None:
                self._process_dir = self._new_locked_process_dir()
            return self._process_dir

    def _new_locked_process_dir(self) -> Path:
        while True:
            path = self._layout.staging / f"{PROCESS_DIR_PREFIX}{secrets.token_hex(8)}"
            path.mkdir()
            descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            fcntl.flock(descriptor, fcntl.LOCK_EX)  # kept open (and locked) until we exit
            if os.fstat(descriptor).st_nlink > 0:
                return path
            # Another process's debris sweep removed it between our mkdir and our flock.
            os.close(descriptor)

    def remove_debris(self) -> None:
        """Remove what dead processes left: staging folders whose fetch lock or process lock
        nobody holds any more, and trash."""
        for entry in self._layout.staging.iterdir():
            if entry.name.startswith(PROCESS_DIR_PREFIX):
                _remove_unless_locked(entry)
                continue
            lock = self._layout.locks / f"{entry.name.split('.')[0]}.lock"
            descriptor = lock_file(lock, wait=False)
            if descriptor is None:
                continue  # a live process is fetching this key
            remove_tree(entry)
            unlock_and_remove(lock, descriptor)
        for entry in self._layout.trash.iterdir():
            remove_tree(entry)


def _remove_unless_locked(directory: Path) -> None:
    """Delete ``directory`` unless a live process holds its flock."""
    try:
        descriptor = lock_unless_held(directory)
    except (FileNotFoundError, NotADirectoryError):
        remove_tree(directory)
        return
    if descriptor is None:
        return  # its process is alive
    try:
        remove_tree(directory)
    finally:
        os.close(descriptor)


def _fsync_tree(root: Path) -> None:
    """Make a staging folder's content durable before it is renamed into place: the bytes of each
    file that has any (an empty file, the lease, is durable with its folder's entry) and each
    folder's entries. A crash after the rename but before it is durable loses the publish, not the
    content: the folder comes back as staging debris, removed, and the adapter fetched again."""
    for directory, _, files in os.walk(root):
        for name in files:
            path = Path(directory) / name
            if not path.stat().st_size:
                continue
            descriptor = os.open(path, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        _fsync_directory(Path(directory))


def _entries_named(folder: Path, prefix: str) -> list[Path]:
    """The entries of ``folder`` whose names start with ``prefix`` (one listing, no pattern);
    none if ``folder`` is gone."""
    try:
        with os.scandir(folder) as entries:
            return [Path(entry.path) for entry in entries if entry.name.startswith(prefix)]
    except FileNotFoundError:
        return []


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
