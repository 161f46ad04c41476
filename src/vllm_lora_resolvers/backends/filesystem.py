"""Adapters from a local or shared directory (``VLLM_LORA_RESOLVER_FS_DIR``).

Adapter ``NAME`` is the folder ``ROOT/NAME``. It is copied into an immutable snapshot, so editing
or deleting the folder later never changes what a running server was handed. A folder that is
already a snapshot of the node cache (``CACHE_DIR/NAME`` links made by the other resolvers) is
served as it is.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import ClassVar

from vllm_lora_resolvers.adapter import ADAPTER_FILES, CONFIG_FILE
from vllm_lora_resolvers.cache import NodeCache
from vllm_lora_resolvers.config import Settings
from vllm_lora_resolvers.errors import (
    InvalidAdapterError,
    StoreUnavailableError,
    TransientStoreError,
)
from vllm_lora_resolvers.resolver import BaseStorageResolver
from vllm_lora_resolvers.retry import RetryPolicy
from vllm_lora_resolvers.transfer import RemoteAdapter, RemoteFile

_COPY_CHUNK = 4 << 20


class FilesystemResolver(BaseStorageResolver):
    """Resolve ``NAME`` to the adapter folder ``root/NAME``.

    >>> resolver = FilesystemResolver(Path("/mnt/adapters"), settings, cache)  # doctest: +SKIP
    >>> resolver.resolve("/models/llama", "sql-adapter").path  # doctest: +SKIP
    PosixPath('/var/cache/vllm-lora/.vllm-lora/snapshots/3f2a.../adapter')
    """

    backend: ClassVar[str] = "fs"

    def __init__(
        self,
        root: Path,
        settings: Settings,
        cache: NodeCache,
        retry_policy: RetryPolicy | None = None,
    ) -> None:
        self.root = root.resolve()
        # A local copy has nothing transient to wait out: one quick retry for a racing writer.
        policy = retry_policy or RetryPolicy(attempts=2, base_delay=0.05, budget_seconds=5)
        super().__init__(f"file://{self.root}", settings, cache, policy)

    def locate(self, name: str) -> RemoteAdapter | None:
        """Stat the folder's adapter files; the version is their sizes, mtimes and inodes."""
        folder = self.root.joinpath(*name.split("/"))
        try:
            resolved = folder.resolve(strict=True)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (OSError, RuntimeError) as error:
            raise StoreUnavailableError(f"cannot read adapter folder {name!r}: {error}") from None
        cached = self.cache.snapshot_containing(folder)
        if cached is not None:
            snapshot = self.cache.find(cached)
            if snapshot is None:
                return None
            return RemoteAdapter(
                name, snapshot.manifest.version, str(folder), (), cached_snapshot=cached
            )
        if not resolved.is_dir():
            return None
        if not resolved.is_relative_to(self.root):
            raise InvalidAdapterError(
                f"adapter {name!r} is a link to a folder outside {self.root}; refusing it"
            )
        files, fingerprint = self._stat_adapter_files(name, resolved)
        if not any(file.path == CONFIG_FILE for file in files):
            return None
        return RemoteAdapter(name, fingerprint, str(resolved), files)

    def _stat_adapter_files(self, name: str, folder: Path) -> tuple[tuple[RemoteFile, ...], str]:
        files, fingerprint = [], hashlib.sha256()
        for file_name in ADAPTER_FILES:
            path = folder / file_name
            if not os.path.lexists(path):
                continue
            if path.is_symlink() and not path.resolve().is_relative_to(folder):
                raise InvalidAdapterError(
                    f"adapter {name!r}: {file_name} is a link to a file outside the adapter "
                    "folder; replace it with the file itself"
                )
            try:
                status = path.stat()
            except OSError as error:
                raise StoreUnavailableError(
                    f"cannot stat {file_name} of {name!r}: {error}"
                ) from None
            if not path.is_file():
                raise InvalidAdapterError(f"adapter {name!r}: {file_name} is not a regular file")
            files.append(RemoteFile(file_name, status.st_size))
            fingerprint.update(
                f"{file_name}\0{status.st_size}\0{status.st_mtime_ns}\0{status.st_ino}\n".encode()
            )
        return tuple(files), fingerprint.hexdigest()[:32]

    def download(self, adapter: RemoteAdapter, file: RemoteFile, destination: Path) -> None:
        """Copy the file, refusing a copy during which the source changed."""
        source = Path(adapter.location) / file.path
        try:
            reader = source.open("rb")
        except OSError as error:
            raise StoreUnavailableError(
                f"cannot read {file.path} of {adapter.name!r}: {error.strerror}"
            ) from None
        with reader, destination.open("wb") as writer:
            before = os.fstat(reader.fileno())
            shutil.copyfileobj(reader, writer, _COPY_CHUNK)
        after = source.stat()
        if (before.st_mtime_ns, before.st_size) != (after.st_mtime_ns, after.st_size):
            raise TransientStoreError(f"{file.path} of {adapter.name!r} changed while being copied")
