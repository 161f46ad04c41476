"""What the object-store backends (S3, GCS) share: ``scheme://bucket[/prefix]``, the key layout,
and `BucketStore`, which finds adapters in the plain and the published layout alike."""

from __future__ import annotations

import re
from abc import abstractmethod
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from vllm_lora_resolvers.adapter import adapter_from_listing
from vllm_lora_resolvers.backends.base import Store
from vllm_lora_resolvers.backends.endpoints import public_endpoint
from vllm_lora_resolvers.backends.published import (
    MAX_POINTER_BYTES,
    POINTER_FILE,
    Pointer,
    is_version,
    parse_pointer,
    published_adapter,
    split_pin,
    version_folder,
)
from vllm_lora_resolvers.cache import NodeCache
from vllm_lora_resolvers.config import ConfigurationError, Settings
from vllm_lora_resolvers.errors import TransientStoreError
from vllm_lora_resolvers.names import is_safe_adapter_name
from vllm_lora_resolvers.remote import RemoteAdapter, RemoteFile
from vllm_lora_resolvers.transfer import DEFAULT_TRANSFER, TransferConfig


def parse_bucket_uri(
    uri: str, scheme: str, bucket: re.Pattern[str], variable: str
) -> tuple[str, str]:
    """``scheme://bucket[/prefix]`` -> ``(bucket, prefix)``, the prefix without slashes around.

    >>> parse_bucket_uri("s3://adapters/prod/", "s3", re.compile("[a-z]+"), "VAR")
    ('adapters', 'prod')
    """
    match = re.fullmatch(rf"{scheme}://([^/]+)/?(.*)", uri.strip())
    if match is None or not bucket.fullmatch(match.group(1)):
        raise ConfigurationError(
            f"{variable}={uri!r} is not {scheme}://BUCKET[/PREFIX] with a valid bucket name"
        )
    return match.group(1), match.group(2).strip("/")


def folder_key(prefix: str, name: str) -> str:
    """The key prefix of folder ``name`` under ``prefix`` (``""``: the prefix itself). Names are
    safe (no ``..``, no leading ``/``), so the key can never leave the prefix.

    >>> folder_key("prod", "team/sql"), folder_key("prod", ""), folder_key("", "")
    ('prod/team/sql/', 'prod/', '')
    """
    return "".join(f"{part}/" for part in (prefix, name) if part)


@dataclass(frozen=True)
class StoredObject:
    """An object's bytes and the ETag (S3) or generation (GCS) they were read at."""

    content: bytes
    etag: str


@dataclass(frozen=True)
class CurrentPointer:
    """An adapter's pointer and the ETag or generation it was read at (to replace it only if
    nobody else did meanwhile)."""

    pointer: Pointer
    etag: str


class BucketStore(Store):
    """Resolve ``NAME`` in a bucket: the version its pointer names if it was published with
    ``vllm-lora publish``, else the folder ``PREFIX/NAME/`` as it is; ``NAME@VERSION`` to that
    version folder (see `vllm_lora_resolvers.backends.published`).

    A store implements the object calls below; a lookup is one listing, plus one read of the
    pointer when it changed since this process last read it.
    """

    def __init__(
        self,
        uri: str,
        settings: Settings,
        cache: NodeCache,
        transfer: TransferConfig = DEFAULT_TRANSFER,
    ) -> None:
        #: ``scheme://bucket``, the root of every key; the key prefix adapters live under,
        #: without slashes around (``""``: the bucket's root).
        self.bucket_uri, self.prefix, endpoint = self.open_bucket(uri, transfer)
        source = f"{self.bucket_uri}/{self.prefix}".rstrip("/")
        if endpoint is not None:
            # Two stores never share cache entries for one bucket name; no credentials in it.
            source += f"@{public_endpoint(endpoint).rstrip('/')}"
        super().__init__(source, settings, cache, transfer)

    @cached_property
    def _pointers(self) -> dict[str, CurrentPointer]:
        """The pointer last read of each adapter folder, by the ETag or generation it had."""
        return {}

    # -- what a store provides ------------------------------------------------------------

    @abstractmethod
    def open_bucket(self, uri: str, transfer: TransferConfig) -> tuple[str, str, str | None]:
        """Parse ``uri`` and make the clients (no network I/O: credentials are found on the
        first request): ``(scheme://bucket, prefix, endpoint)``, the endpoint ``None`` when it
        is the store's usual one (AWS's, Google's), else the one the bucket is read from."""

    @abstractmethod
    def list_adapter_files(self, name: str, folder: str) -> dict[str, RemoteFile]:
        """The objects of folder ``folder`` (a key prefix) whose names sort among the adapter's
        files (`Store.file_names`; the pointer among them), by name, in one cheap listing for
        lookups; ``name`` is the adapter's, for messages."""

    @abstractmethod
    def read_object(self, key: str, max_bytes: int) -> StoredObject | None:
        """Object ``key`` (its first ``max_bytes + 1`` bytes at most), ``None`` if absent."""

    @abstractmethod
    def upload_object(self, key: str, path: Path) -> bool:
        """Upload file ``path`` to ``key`` unless an object is there (``False`` then)."""

    @abstractmethod
    def write_object(self, key: str, content: bytes, *, replacing: str | None) -> bool:
        """Write ``content`` to ``key`` if the object there is still at ETag or generation
        ``replacing`` (``None``: if there is none); ``False`` if it is not."""

    # -- names and keys -------------------------------------------------------------------

    def accepts_name(self, name: str) -> bool:
        """``NAME`` or ``NAME@VERSION``, VERSION one segment (`is_version`)."""
        adapter, version = split_pin(name)
        return is_safe_adapter_name(adapter) and (version is None or is_version(version))

    def snapshot_name(self, name: str) -> str:
        """``NAME`` for ``NAME@VERSION`` too: a version is one snapshot whatever its spelling."""
        return split_pin(name)[0]

    def folder_prefix(self, name: str) -> str:
        """The key prefix of adapter ``name`` (without ``@VERSION``)."""
        return folder_key(self.prefix, name)

    def pointer_key(self, name: str) -> str:
        """The key of the pointer of adapter ``name`` (without ``@VERSION``)."""
        return self.folder_prefix(name) + POINTER_FILE

    def location(self, key: str) -> str:
        """``scheme://bucket/key``."""
        return f"{self.bucket_uri}/{key}"

    def object_key(self, adapter: RemoteAdapter, file: RemoteFile) -> str:
        """The key of ``file`` of ``adapter``: in the folder `locate` found it in."""
        folder = adapter.location.removeprefix(f"{self.bucket_uri}/")
        assert folder != adapter.location, f"{adapter.location} is not in {self.bucket_uri}"
        return folder + file.path

    # -- lookups --------------------------------------------------------------------------

    def locate(self, name: str) -> RemoteAdapter | None:
        """One listing of the adapter's files: the version folder the pointer names if it has
        one (read again only when its ETag or generation changed), else the files as they are.
        ``NAME@VERSION``: one listing of that version folder."""
        adapter, version = split_pin(name)
        folder = self.folder_prefix(adapter)
        if version is not None:
            found = version_folder(folder, version)
            listed = self.list_adapter_files(name, found)
            return published_adapter(
                name, self.location(found), version, listed, signature=self.lists_signatures
            )
        listed = self.list_adapter_files(name, folder)
        pointer_file = listed.get(POINTER_FILE)
        if pointer_file is None:
            location = self.location(folder)
            return adapter_from_listing(name, location, listed, signature=self.lists_signatures)
        pointer = self._pointer_at(name, pointer_file.etag)
        found = version_folder(folder, pointer.version)
        return published_adapter(
            name,
            self.location(found),
            pointer.version,
            pointer.listing(),
            signature=self.lists_signatures,
        )

    def _pointer_at(self, name: str, etag: str) -> Pointer:
        """The pointer of adapter ``name``, which a listing just showed at ``etag``."""
        remembered = self._pointers.get(name)
        if remembered is not None and remembered.etag == etag:
            return remembered.pointer
        current = self._read_pointer(name)
        if current is None:
            raise TransientStoreError(f"the pointer of {name!r} was deleted while being read")
        self._pointers[name] = current
        return current.pointer

    def _read_pointer(self, name: str) -> CurrentPointer | None:
        """The pointer of adapter ``name`` (one read), ``None`` if it has none; raises
        `InvalidAdapterError` if it is malformed."""
        key = self.pointer_key(name)
        stored = self.read_object(key, MAX_POINTER_BYTES)
        if stored is None:
            return None
        return CurrentPointer(parse_pointer(name, self.location(key), stored.content), stored.etag)
