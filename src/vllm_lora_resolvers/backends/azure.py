"""Adapters from Azure Blob Storage (``VLLM_LORA_RESOLVER_AZURE_URI=az://container[/prefix]``).

Adapter ``NAME`` is the folder ``az://container/prefix/NAME/``, or the version its pointer names
once published (`vllm_lora_resolvers.backends.published`). Its version is the set of (blob, ETag,
size) of its adapter files, read with one listing of the blob names starting with
``prefix/NAME/adapter_``, stopped past the last adapter file name. Every read is pinned to the
listed ETag (``If-Match``) and verified against the Content-MD5 the listing shows.

The account and credentials follow the Azure SDK's and adlfs' conventions:
``AZURE_STORAGE_CONNECTION_STRING``; else the account of an
``abfss://container@ACCOUNT.dfs.core.windows.net/prefix`` URI or ``AZURE_STORAGE_ACCOUNT_NAME``
(``AZURE_STORAGE_ACCOUNT_URL`` for another blob endpoint) with ``AZURE_STORAGE_ACCOUNT_KEY``,
``AZURE_STORAGE_SAS_TOKEN`` or ``DefaultAzureCredential`` (workload identity on AKS, ...).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

from azure.core import MatchConditions
from azure.core.credentials import AzureNamedKeyCredential, AzureSasCredential
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.core.pipeline import PipelineResponse
from azure.identity import DefaultAzureCredential
from azure.storage.blob import BlobPrefix, BlobServiceClient, ContentSettings

from vllm_lora_resolvers.adapter import ADAPTER_FILES, SIGNATURE_FILE
from vllm_lora_resolvers.backends.bucket import BucketStore, StoredObject
from vllm_lora_resolvers.config import AZURE_URI, ConfigurationError
from vllm_lora_resolvers.errors import (
    StoreRefusedError,
    StoreUnavailableError,
    TransientStoreError,
    VersionChangedError,
)
from vllm_lora_resolvers.remote import RemoteAdapter, RemoteFile
from vllm_lora_resolvers.transfer import (
    DEFAULT_TRANSFER,
    TransferConfig,
    check_received,
    check_stored_size,
    stored_size,
)

_URI = re.compile(r"(az|azure|abfss?)://([^/@]+)(?:@([^/]+))?/*(.*)")
_CONTAINER = re.compile(r"(?!.*--)[a-z0-9][a-z0-9-]{1,61}[a-z0-9]")
_STEM = os.path.commonprefix(ADAPTER_FILES)  # noqa: RUF071 - a blob name prefix, not a path
_LAST_ADAPTER_FILE = max(ADAPTER_FILES)
#: Entries read at most to find one adapter's files (two listing pages).
_MAX_LOOKUP_ENTRIES = 10_000


def parse_azure_uri(uri: str) -> tuple[str, str | None, str]:
    """``az://container[/prefix]`` (also ``azure://``, ``abfs[s]://container@HOST/prefix``) ->
    ``(container, HOST or None, prefix)``, the prefix without slashes around."""
    match = _URI.fullmatch(uri.strip())
    if match is None or not _CONTAINER.fullmatch(match.group(2)):
        raise ConfigurationError(
            f"{AZURE_URI.name}={uri!r} is not az://CONTAINER[/PREFIX] (or "
            "abfss://CONTAINER@ACCOUNT.dfs.core.windows.net[/PREFIX]) with a valid container name"
        )
    return match.group(2), match.group(3), match.group(4).strip("/")


def make_blob_service(
    host: str | None, timeout: tuple[float, float], get_size: int = DEFAULT_TRANSFER.part_size
) -> BlobServiceClient:
    """A client of the account the environment (and the URI's ``host``) names, with these
    (connect, read) time limits and no retries of its own (the pipeline's are the only ones). A
    read of up to ``get_size`` bytes (a part) is one ``GET``, held in memory: the SDK reads 4 MiB
    pieces one after the other otherwise, half the speed of one request per part."""
    connect, read = timeout
    options: dict[str, Any] = {
        "connection_timeout": connect,
        "read_timeout": read,
        "retry_total": 0,
        "max_single_get_size": get_size,
        "max_chunk_get_size": get_size,
    }
    env = os.environ
    account = host.split(".")[0] if host else env.get("AZURE_STORAGE_ACCOUNT_NAME")
    try:
        if env.get("AZURE_STORAGE_CONNECTION_STRING"):
            client = BlobServiceClient.from_connection_string(
                env["AZURE_STORAGE_CONNECTION_STRING"], **options
            )
            if account and client.account_name != account:
                raise ConfigurationError(
                    f"{AZURE_URI.name} names account {account!r}, AZURE_STORAGE_CONNECTION_STRING "
                    f"another ({client.account_name!r})"
                )
            return client
        if not account:
            raise ConfigurationError(
                f"{AZURE_URI.name} names no storage account: set AZURE_STORAGE_CONNECTION_STRING "
                "or AZURE_STORAGE_ACCOUNT_NAME, or use abfss://CONTAINER@ACCOUNT.dfs.core.windows.net"
            )
        suffix = host.split(".", 2)[2] if host and host.count(".") >= 2 else "core.windows.net"
        url = env.get("AZURE_STORAGE_ACCOUNT_URL") or f"https://{account}.blob.{suffix}"
        credential: Any = DefaultAzureCredential()
        if env.get("AZURE_STORAGE_ACCOUNT_KEY"):
            credential = AzureNamedKeyCredential(account, env["AZURE_STORAGE_ACCOUNT_KEY"])
        elif env.get("AZURE_STORAGE_SAS_TOKEN"):
            credential = AzureSasCredential(env["AZURE_STORAGE_SAS_TOKEN"].lstrip("?"))
        return BlobServiceClient(url, credential=credential, **options)
    except ConfigurationError:
        raise
    except ValueError:  # the SDK's messages may quote the secret
        raise ConfigurationError(
            "the Azure storage account's URL or connection string is malformed"
        ) from None


class AzureBlobStore(BucketStore):
    """Adapters in an Azure Blob Storage container (see the module's docstring)."""

    backend: ClassVar[str] = "azure"

    def open_bucket(self, uri: str, transfer: TransferConfig) -> tuple[str, str, str | None]:
        """``az://container[/prefix]`` or ``abfss://container@host/prefix``, both read as
        ``az://container``; the endpoint always the account's: it tells containers of one name
        apart."""
        self.container, host, prefix = parse_azure_uri(uri)
        service = make_blob_service(host, transfer.transfer_timeout, transfer.part_size)
        self.client = service.get_container_client(self.container)
        lookups = make_blob_service(host, transfer.lookup_timeout)
        self.lookup_client = lookups.get_container_client(self.container)
        return f"az://{self.container}", prefix, service.primary_endpoint

    def list_adapter_files(self, name: str, folder: str) -> dict[str, RemoteFile]:
        """One listing of the blobs of ``folder`` named ``adapter_*``, in name order, stopped past
        the last adapter file name, so whatever else the folder holds is never listed. A listing
        cannot start at a name, so ``model.sig``, when signatures are checked, is a second one
        (of blobs named ``model.sig*``)."""
        listed = self._list_from(name, folder, _STEM, _LAST_ADAPTER_FILE)
        if self.lists_signatures:
            listed.update(self._list_from(name, folder, SIGNATURE_FILE, SIGNATURE_FILE))
        return listed

    def _list_from(self, name: str, folder: str, stem: str, last: str) -> dict[str, RemoteFile]:
        """The blobs of ``folder`` named ``stem*`` up to ``last``, by name (one listing)."""
        listed = {}
        blobs = self.lookup_client.list_blobs(name_starts_with=folder + stem)
        with store_errors(f"listing {self.location(folder)}"):
            for number, blob in enumerate(blobs, start=1):
                if blob.name > folder + last:
                    break
                if number == _MAX_LOOKUP_ENTRIES:
                    raise self.crowded_folder(name, f"a listing of {number} entries")
                path = blob.name[len(folder) :]
                if "/" not in path:
                    md5 = blob.content_settings.content_md5
                    checksums = {"md5": bytes(md5).hex()} if md5 else {}
                    listed[path] = RemoteFile(path, blob.size, checksums, etag=_etag(blob.etag))
        return listed

    def read_object(self, key: str, max_bytes: int) -> StoredObject | None:
        """One ranged ``GET`` (with the lookups' time limits) of up to ``max_bytes + 1`` bytes."""
        with store_errors(f"reading {self.location(key)}"):
            try:
                stream = self.lookup_client.download_blob(key, offset=0, length=max_bytes + 1)
            except ResourceNotFoundError as error:
                if _error_code(error) == "BlobNotFound":
                    return None
                raise
            return StoredObject(stream.readall(), _etag(stream.properties.etag))

    def upload_object(self, key: str, path: Path) -> bool:
        """One upload that only creates the blob, with the Content-MD5 readers verify."""
        with path.open("rb") as stream:
            md5 = hashlib.file_digest(stream, "md5").digest()
            stream.seek(0)
            settings = ContentSettings(content_md5=bytearray(md5))
            return self._put_if(key, stream, overwrite=False, content_settings=settings)

    def write_object(self, key: str, content: bytes, *, replacing: str | None) -> bool:
        """One upload if the blob is still at ETag ``replacing`` (``None``: if there is none)."""
        if replacing is None:
            return self._put_if(key, content, overwrite=False)
        condition = MatchConditions.IfNotModified
        return self._put_if(key, content, etag=f'"{replacing}"', match_condition=condition)

    def _put_if(self, key: str, body: Any, **condition: Any) -> bool:
        with store_errors(f"writing {self.location(key)}"):
            try:
                self.client.upload_blob(
                    key, body, max_concurrency=self.transfer.parts_in_flight, **condition
                )
            except (ResourceExistsError, ResourceModifiedError):
                return False
        return True

    def list_subfolders(self, key: str) -> Iterator[str]:
        """One paginated listing with ``delimiter="/"``."""
        with store_errors(f"listing {self.location(key)}"):
            for entry in self.client.walk_blobs(name_starts_with=key, delimiter="/"):
                if isinstance(entry, BlobPrefix):
                    yield entry.name

    def download(
        self, adapter: RemoteAdapter, file: RemoteFile, destination: Path
    ) -> Mapping[str, str]:
        """Parallel ranged reads of the listed ETag (``If-Match``), written in place; a blob the
        store says is of another size than listed is not read, and nothing is written past that
        size."""
        key = self.object_key(adapter, file)
        where = self.location(key)

        def fetch_range(start: int, end: int, write: Callable[[bytes], None]) -> None:
            with store_errors(f"reading bytes {start}-{end} of {where}"):
                for chunk in self._read(key, file, start, end - start).chunks():
                    write(chunk)

        self.download_ranges(destination, file.size, fetch_range)
        return {}

    def read_head(self, adapter: RemoteAdapter, file: RemoteFile, length: int) -> bytes | None:
        """One ranged ``GET`` of the listed ETag."""
        key = self.object_key(adapter, file)
        with store_errors(f"reading the first {length} bytes of {self.location(key)}"):
            return self._read(key, file, 0, length).readall() if length else b""

    def _read(self, key: str, file: RemoteFile, offset: int, length: int) -> Any:
        """``length`` bytes at ``offset`` of the listed ETag. The SDK holds a whole answer in
        memory before it hands any of it over, so a blob of another size than listed, or an
        answer longer than asked, is refused from its headers, before its body is read."""

        def before_the_body(response: PipelineResponse[Any, Any]) -> None:
            if response.http_response.status_code not in (200, 206):
                return  # an error, whose body the SDK reads into its own exception
            headers = response.http_response.headers
            try:
                check_stored_size(file, stored_size(headers.get("Content-Range")))
                sent = int(headers.get("Content-Length", 0))
                check_received(file.path, offset, sent, end=offset + length, size=file.size)
            except StoreUnavailableError:
                response.http_response.internal_response.close()  # hang up: its body is unread
                raise

        return self.client.download_blob(
            key,
            offset=offset,
            length=length,
            etag=f'"{file.etag}"',
            match_condition=MatchConditions.IfNotModified,
            raw_response_hook=before_the_body,
        )


def _error_code(error: HttpResponseError) -> str:
    """The storage error code the SDK puts on its errors (``BlobNotFound``), else the class."""
    code = getattr(error, "error_code", None)
    return str(getattr(code, "value", code) or type(error).__name__)


def _etag(etag: str) -> str:
    """An ETag as listings show it (responses quote it)."""
    return etag.strip('"')


@contextmanager
def store_errors(doing: str) -> Iterator[None]:
    """Turn Azure SDK errors into our error types, with messages free of secrets (never the
    SDK's own message, which may quote a URL with its SAS)."""
    try:
        yield
    except ResourceModifiedError:
        raise VersionChangedError(f"{doing} failed: the blob changed while being fetched") from None
    except HttpResponseError as error:
        status, code = error.status_code or 0, _error_code(error)
        message = f"{doing} failed: {code} (HTTP {status})" if status else f"{doing} failed: {code}"
        if status >= 500 or status in (408, 429):
            raise TransientStoreError(message) from None
        if status in (401, 403) or isinstance(error, ClientAuthenticationError):
            raise StoreRefusedError(
                f"{message}: the store refused our credentials (or found none); check "
                "AZURE_STORAGE_CONNECTION_STRING / _ACCOUNT_KEY / _SAS_TOKEN or the workload "
                "identity, and its role on the container (Storage Blob Data Reader)"
            ) from None
        if code == "ContainerNotFound":
            raise StoreRefusedError(
                f"{message}: the container does not exist; check {AZURE_URI.name}"
            ) from None
        raise StoreUnavailableError(message) from None
    except (AzureError, ConnectionError) as error:
        raise TransientStoreError(f"{doing} failed: {type(error).__name__}") from None
