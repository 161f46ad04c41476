"""What the object-store backends (S3, GCS) share: ``scheme://bucket[/prefix]``, the key layout,
and `BucketStore`, which finds adapters in the plain and the published layout alike."""

from __future__ import annotations

import re
import secrets
from abc import abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import ClassVar

from vllm_lora_resolvers.adapter import adapter_from_listing
from vllm_lora_resolvers.backends.base import Store
from vllm_lora_resolvers.backends.endpoints import public_endpoint
from vllm_lora_resolvers.backends.published import (
    MAX_POINTER_BYTES,
    OBJECT_VERSION,
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
from vllm_lora_resolvers.errors import InvalidAdapterError, TransientStoreError
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


#: The object `BucketStore.conditional_writes` probes the store with, in the folder it is given:
#: one per folder, rewritten by each probe, never read by a lookup (no adapter name reaches a
#: segment that starts with ``_``, nor does a lookup's listing of ``adapter_*``).
PROBE_FILE = "_vllm-lora-conditional-write-probe"
#: Read of the probe object at most: only its ETag or generation is used.
_MAX_PROBE_BYTES = 1 << 10
_PROBE_NOTE = (
    "vllm-lora checks with this object that the store refuses writes whose condition does not "
    "hold, which `vllm-lora publish` relies on; it is rewritten at each check"
)


@dataclass(frozen=True)
class ConditionalWrites:
    """What a store did with writes whose condition did not hold (`BucketStore.conditional_writes`).

    ``vllm-lora publish`` relies on both being refused: a create-only write (``If-None-Match: *``,
    ``ifGenerationMatch=0``) to keep a racing publisher's files, a write conditional on the
    pointer's ETag or generation to keep its pointer move.
    """

    #: It refused a create-only write of an object that exists.
    refuses_overwriting: bool
    #: It refused a write conditional on an ETag or generation the object no longer had.
    refuses_stale_replacing: bool

    @property
    def honoured(self) -> bool:
        """Whether it refused both."""
        return self.refuses_overwriting and self.refuses_stale_replacing

    def ignored(self) -> str:
        """What it carried out that it should have refused (``""``: nothing)."""
        carried_out = []
        if not self.refuses_overwriting:
            carried_out.append("a create-only write over an existing object")
        if not self.refuses_stale_replacing:
            carried_out.append("a write conditional on an ETag or generation it no longer had")
        return " and ".join(carried_out)


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

    #: The ETags or generations this store gives objects; a pointer declaring a file at anything
    #: else is refused (its value would reach a request header or URL).
    object_version: ClassVar[re.Pattern[str]] = OBJECT_VERSION

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
        self._conditional_writes: ConditionalWrites | None = None

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
    def list_subfolders(self, key: str) -> Iterator[str]:
        """The keys of the folders directly under key prefix ``key`` (each ending in ``/``): one
        paginated listing with ``/`` as delimiter."""

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

    def list_names(self, folder: str = "") -> Iterator[str]:
        """Names of the folders directly in ``folder`` (``""``: under the prefix): the candidate
        adapters (`locate` tells which hold one).

        >>> list(store.list_names("team-a"))  # doctest: +SKIP
        ['team-a/chat', 'team-a/sql']
        """
        top = folder_key(self.prefix, "")
        for subfolder in self.list_subfolders(folder_key(self.prefix, folder)):
            yield subfolder[len(top) :].rstrip("/")

    def crowded_folder(self, name: str, listed: str) -> InvalidAdapterError:
        """The refusal of adapter ``name``, whose files ``listed`` (a lookup's listing, as far as
        it may go) did not reach: too many other entries of its folder sort among them."""
        return InvalidAdapterError(
            f"adapter {name!r}: {listed} did not reach all of {', '.join(self.file_names)}: too "
            "many other entries of its folder sort among them; move those elsewhere"
        )

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

    def probe_key(self, folder: str) -> str:
        """The key of the object `conditional_writes` writes in folder ``folder`` (a name below
        the prefix; ``""``: the prefix itself)."""
        return folder_key(self.prefix, folder) + PROBE_FILE

    # -- conditional writes ---------------------------------------------------------------

    def conditional_writes(self, folder: str = "") -> ConditionalWrites:
        """Whether the store refuses writes whose condition does not hold, found once per store
        object with the object `probe_key` of ``folder`` (a folder the caller may write to).

        The probe reads that object (creating it if absent), writes it create-only (which must
        be refused), replaces it at the ETag or generation read, then writes it again at that
        one, now stale (which must be refused): four requests, six the first time. Each
        write's content is new, so no two have one ETag (S3's is an MD5), and concurrent probes
        cannot make a refused write look carried out. Raises the store's errors
        (`StoreRefusedError`: no write access).
        """
        if self._conditional_writes is None:
            self._conditional_writes = self._probe_conditional_writes(self.probe_key(folder))
        return self._conditional_writes

    def _probe_conditional_writes(self, key: str) -> ConditionalWrites:
        token = secrets.token_hex(8)

        def content(step: str) -> bytes:
            return f"{_PROBE_NOTE}\nprobe {token}: {step}\n".encode()

        read = self.read_object(key, _MAX_PROBE_BYTES)
        if read is None:
            self.write_object(key, content("created"), replacing=None)
            read = self.read_object(key, _MAX_PROBE_BYTES)
            if read is None:
                raise TransientStoreError(f"{self.location(key)} was deleted while probing it")
        overwritten = self.write_object(key, content("written create-only"), replacing=None)
        # Past read.etag now, by this write or by a concurrent probe's.
        self.write_object(key, content("replaced"), replacing=read.etag)
        replaced = self.write_object(key, content("replaced at a stale tag"), replacing=read.etag)
        return ConditionalWrites(
            refuses_overwriting=not overwritten, refuses_stale_replacing=not replaced
        )

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
        pointer = parse_pointer(name, self.location(key), stored.content)
        for file in pointer.files:
            if not self.object_version.fullmatch(file.etag):
                raise InvalidAdapterError(
                    f"adapter {name!r}: its pointer declares {file.path} at {file.etag!r}, which "
                    f"is not an ETag or generation of a {self.backend} object; publish the "
                    "adapter again with `vllm-lora publish`"
                )
        return CurrentPointer(pointer, stored.etag)
