"""What a store answers a lookup with: an adapter's version and the files that make it up."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RemoteFile:
    """One file in a store.

    ``checksums`` maps an algorithm (``md5``, ``sha1``, ``sha256``, ``crc32``, ``crc32c``,
    ``crc64nvme``) to the lowercase hex digest the store declares; each is verified after download,
    together with any a backend's `download` returns. ``etag`` is the store's opaque version of the
    file (an S3 ETag, a GCS generation, a git blob id), if it has one.
    """

    path: str
    size: int
    checksums: Mapping[str, str] = field(default_factory=dict)
    etag: str = ""


@dataclass(frozen=True)
class RemoteAdapter:
    """An adapter found in a store: its version and the files that make it up.

    ``version`` is opaque and changes whenever the content may have changed. A backend that
    finds an adapter already snapshotted in the node cache names it in ``cached_snapshot``.
    """

    name: str
    version: str
    location: str
    files: tuple[RemoteFile, ...]
    cached_snapshot: str | None = None

    def file(self, path: str) -> RemoteFile | None:
        """The file at ``path`` (relative to the adapter folder), if the adapter has it."""
        return next((file for file in self.files if file.path == path), None)
