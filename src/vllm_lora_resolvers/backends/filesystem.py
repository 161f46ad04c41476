"""Adapters from a local or shared directory (``VLLM_LORA_RESOLVER_FS_DIR``).

Adapter ``NAME`` is the folder ``ROOT/NAME``. It is copied into an immutable snapshot, so editing
or deleting the folder later never changes what a running server was handed. A folder that is
already a snapshot of the node cache (``CACHE_DIR/NAME`` links made by the other resolvers) is
served as it is, if it comes from a store this process resolves from: pods of other stores share
the node cache and its links, and their adapters are not this server's to serve.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

from vllm_lora_resolvers.adapter import CONFIG_FILE, WEIGHTS_FILES
from vllm_lora_resolvers.backends.base import Store
from vllm_lora_resolvers.cache import STATE_DIR, NodeCache
from vllm_lora_resolvers.config import Settings
from vllm_lora_resolvers.errors import (
    FilesChangedError,
    InvalidAdapterError,
    StoreRefusedError,
    StoreUnavailableError,
    TransientStoreError,
)
from vllm_lora_resolvers.remote import RemoteAdapter, RemoteFile
from vllm_lora_resolvers.retry import RetryPolicy
from vllm_lora_resolvers.transfer import TransferConfig, copy_into

#: A local copy has nothing transient to wait out: one quick retry for a racing writer.
LOCAL_TRANSFER = TransferConfig(
    transfer_retry=RetryPolicy(attempts=2, base_delay=0.05, budget_seconds=5)
)


class FilesystemStore(Store):
    """Adapters in a directory: ``NAME`` is the folder ``root/NAME``."""

    backend: ClassVar[str] = "fs"
    locate_is_local: ClassVar[bool] = True

    def __init__(
        self,
        root: Path,
        settings: Settings,
        cache: NodeCache,
        transfer: TransferConfig = LOCAL_TRANSFER,
    ) -> None:
        self.root = root.resolve()
        self._root = str(self.root)
        super().__init__(f"file://{self.root}", settings, cache, transfer)

    def locate(self, name: str) -> RemoteAdapter | None:
        """Stat the folder's adapter files; the version is their sizes, mtimes and inodes."""
        try:
            folder, through_link = self._find_folder(name)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as error:
            raise _read_error(f"cannot read adapter folder {name!r}", error) from None
        if through_link:
            cached = self.cache.snapshot_containing(folder)
            if cached is not None:
                snapshot = self.cache.held(cached) or self.cache.find(cached)
                if snapshot is None or not self.cache.serves(snapshot):
                    return None  # gone, or another store's (a pod of another store linked it)
                version = snapshot.manifest.version
                return RemoteAdapter(name, version, folder, (), cached_snapshot=cached)
            if not _inside(folder, self._root):
                raise InvalidAdapterError(
                    f"adapter {name!r} is a link to a folder outside {self.root}; refusing it"
                )
        files, fingerprint = self._stat_adapter_files(name, folder)
        if not files or files[0].path != CONFIG_FILE:
            return None
        return RemoteAdapter(name, fingerprint, folder, files)

    def list_names(self, folder: str = "") -> Iterator[str]:
        """Names of the folders (or links to folders) directly in ``folder`` (``""``: the root),
        the node cache's own state folder aside: the candidate adapters (`locate` tells which
        hold one). One directory listing.

        >>> list(store.list_names("team-a"))  # doctest: +SKIP
        ['team-a/chat', 'team-a/sql']
        """
        directory = f"{self._root}/{folder}" if folder else self._root
        try:
            with os.scandir(directory) as entries:
                names = sorted(entry.name for entry in entries if entry.is_dir())
        except OSError as error:
            raise _read_error(f"cannot list {directory}", error) from None
        for name in names:
            if folder or name != STATE_DIR:
                yield f"{folder}/{name}" if folder else name

    def _find_folder(self, name: str) -> tuple[str, bool]:
        """The real path of ``root/name`` and whether a symlink led there.

        One ``lstat`` per name segment; only a path through a symlink pays for ``realpath``.
        Names are already safe (no ``..``, no leading ``/``), so the plain join stays in root.
        """
        path = self._root
        for segment in name.split("/"):
            path = f"{path}/{segment}"
            if stat.S_ISLNK(os.lstat(path).st_mode):
                return os.path.realpath(f"{self._root}/{name}", strict=True), True
        return path, False

    def _stat_adapter_files(self, name: str, folder: str) -> tuple[tuple[RemoteFile, ...], str]:
        """The adapter's files, each with its identity as its etag.

        Plain ``lstat`` calls: this runs on every cache hit. A folder swapped between them gives
        identities no single folder holds, which `download` (reading through one handle on the
        folder) finds out, so the pipeline looks again.
        """
        files, fingerprint, weights = [], hashlib.sha256(), False
        for file_name in self.file_names:
            if weights and file_name in WEIGHTS_FILES:
                continue  # vLLM loads the first weights file present; the others do not matter
            status = self._stat_file(name, folder, file_name)
            if status is None:
                continue
            identity = _identity(status)
            files.append(RemoteFile(file_name, status.st_size, etag=identity))
            fingerprint.update(f"{file_name}\0{identity}\n".encode())
            weights = weights or file_name in WEIGHTS_FILES
        return tuple(files), fingerprint.hexdigest()[:32]

    @staticmethod
    def _stat_file(name: str, folder: str, file_name: str) -> os.stat_result | None:
        path = f"{folder}/{file_name}"
        try:
            status = os.lstat(path)
            if stat.S_ISLNK(status.st_mode):
                target = os.path.realpath(path)
                if not _inside(target, folder):
                    raise _link_outside(name, file_name)
                status = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as error:
            raise _read_error(f"cannot stat {file_name} of {name!r}", error) from None
        if not stat.S_ISREG(status.st_mode):
            raise InvalidAdapterError(f"adapter {name!r}: {file_name} is not a regular file")
        return status

    def download(
        self, adapter: RemoteAdapter, file: RemoteFile, destination: Path
    ) -> Mapping[str, str]:
        """Copy the file exactly as `locate` saw it, through one open handle on the folder,
        hashing it as it goes (`copy_into`: the copy is not read again to be verified).

        The file is opened without blocking (a FIFO swapped in cannot hang us) and must be the
        very file looked up, before and after the copy; afterwards every other file of the
        adapter must still be as looked up too. Anything else is a new version, which the
        pipeline looks up again: a snapshot is always exactly one version of the folder.
        """
        with self._folder(adapter) as directory:
            with self._file(adapter, file, directory) as reader:
                # never more than looked up: a file growing meanwhile is a new version
                copy_into(destination, reader, file.size)
                if _identity(os.fstat(reader)) != file.etag:
                    raise FilesChangedError(f"{file.path} of {adapter.name!r} changed")
            for other in adapter.files:
                try:
                    status = os.stat(other.path, dir_fd=directory)
                except FileNotFoundError:
                    raise FilesChangedError(f"{other.path} of {adapter.name!r} vanished") from None
                if _identity(status) != other.etag:
                    raise FilesChangedError(f"{other.path} of {adapter.name!r} changed")
        return {}

    def read_head(self, adapter: RemoteAdapter, file: RemoteFile, length: int) -> bytes | None:
        """The first ``length`` bytes of the file looked up (a new version if it changed)."""
        with self._folder(adapter) as directory, self._file(adapter, file, directory) as reader:
            return os.pread(reader, length, 0)

    @staticmethod
    @contextmanager
    def _folder(adapter: RemoteAdapter) -> Iterator[int]:
        """An open handle on the adapter's folder."""
        try:
            directory = os.open(adapter.location, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise FilesChangedError(f"adapter {adapter.name!r} vanished") from None
        except OSError as error:
            raise _read_error(f"cannot read adapter folder {adapter.name!r}", error) from None
        try:
            yield directory
        finally:
            os.close(directory)

    @staticmethod
    @contextmanager
    def _file(adapter: RemoteAdapter, file: RemoteFile, directory: int) -> Iterator[int]:
        """``file`` opened in ``directory`` without blocking, if it is the very file looked up
        and lies in the adapter's folder.

        A link to a file elsewhere swapped in between the lookup's ``lstat`` and its ``stat``
        gives the looked-up identity of that file; the path the kernel holds for what was opened
        (`_opened_path`) is where the links led when it was opened, so nothing of such a file is
        read (nor named in an error)."""
        try:
            reader = os.open(
                file.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=directory
            )
        except FileNotFoundError:
            raise FilesChangedError(f"{file.path} of {adapter.name!r} vanished") from None
        except OSError as error:
            raise _read_error(f"cannot read {file.path} of {adapter.name!r}", error) from None
        try:
            if _identity(os.fstat(reader)) != file.etag:
                raise FilesChangedError(f"{file.path} of {adapter.name!r} changed")
            if not _inside(_opened_path(reader), adapter.location):
                raise _link_outside(adapter.name, file.path)
            yield reader
        finally:
            os.close(reader)


def _inside(path: str, folder: str) -> bool:
    """Whether ``path`` lies in ``folder`` (both real paths, as strings)."""
    return path.startswith(folder + os.sep)


def _link_outside(name: str, file_name: str) -> InvalidAdapterError:
    """The refusal of an adapter file that is a link to a file outside the adapter's folder."""
    return InvalidAdapterError(
        f"adapter {name!r}: {file_name} is a link to a file outside the adapter folder; replace "
        "it with the file itself"
    )


def _opened_path(descriptor: int) -> str:
    """The path of the file open as ``descriptor``, as the kernel holds it (Linux's
    ``/proc/self/fd``): where every link on the way led at the moment it was opened."""
    try:
        return os.readlink(f"/proc/self/fd/{descriptor}")
    except OSError as error:
        raise StoreRefusedError(
            f"cannot tell where an adapter file leads ({error.strerror} for /proc/self/fd): "
            "the filesystem store needs Linux's /proc mounted"
        ) from None


def _identity(status: os.stat_result) -> str:
    """What changes whenever a file is replaced or rewritten: device and inode, size,
    modification time."""
    return f"{status.st_dev}:{status.st_ino}:{status.st_size}:{status.st_mtime_ns}"


def _read_error(what: str, error: OSError) -> StoreUnavailableError:
    """Permissions refuse us; anything else (a mount gone, I/O errors) may pass: retried, and
    the cached copy served meanwhile."""
    if error.errno in (errno.EACCES, errno.EPERM):
        return StoreRefusedError(f"{what}: {error.strerror}")
    return TransientStoreError(f"{what}: {error.strerror}")
