"""Adapters from Google Cloud Storage (``VLLM_LORA_RESOLVER_GCS_URI=gs://bucket[/prefix]``).

Adapter ``NAME`` is the folder ``gs://bucket/prefix/NAME/``, or the version its pointer names once
published (`vllm_lora_resolvers.backends.published`). Its version is the set of (object,
generation, size) of its adapter files, read with one listing limited to that folder. Every read
is pinned to the listed generation and verified against the CRC32C (or MD5) GCS reports.

Built on Google's own ``google-cloud-storage`` client: credentials from Google's default chain
(workload identity, a service-account file, the metadata server), the emulator through
``STORAGE_EMULATOR_HOST`` as Google's clients read it. Its retries are bounded per call, and it
never probes gRPC bucket-layout APIs (gcsfs 2026.x blocks 60 s on those against anything but real
GCS).
"""

from __future__ import annotations

import base64
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar
from urllib.parse import quote, urlencode

import google.auth.exceptions
import requests
from google.api_core import exceptions as google_errors
from google.cloud import storage
from google.cloud.storage.retry import DEFAULT_RETRY
from requests.adapters import DEFAULT_POOLSIZE, HTTPAdapter

from vllm_lora_resolvers.adapter import ADAPTER_FILES, SIGNATURE_FILE
from vllm_lora_resolvers.backends.bucket import (
    BucketStore,
    StoredObject,
    parse_bucket_uri,
)
from vllm_lora_resolvers.config import GCS_URI
from vllm_lora_resolvers.errors import (
    StoreRefusedError,
    StoreUnavailableError,
    TransientStoreError,
    VersionChangedError,
)
from vllm_lora_resolvers.remote import RemoteAdapter, RemoteFile
from vllm_lora_resolvers.transfer import (
    PARALLEL_READS,
    TransferConfig,
    check_stored_size,
    stored_size,
)

#: A key after every adapter file name (``adapter_model.*`` < ``adapter_n``), and one after the
#: signature's too.
_PAST_ADAPTER_FILES, _PAST_SIGNATURE = "adapter_n", "model.sih"
assert all(name < _PAST_ADAPTER_FILES for name in ADAPTER_FILES)
assert _PAST_ADAPTER_FILES < SIGNATURE_FILE < _PAST_SIGNATURE
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
_CHUNK = 1 << 20
#: Entries read at most to find one adapter's files (ten listing pages).
_MAX_LOOKUP_ENTRIES = 10_000

#: Google's own retry, for the command line's listings of a whole folder only (lookups and
#: transfers have the pipeline's retries alone).
_LISTING_RETRY = DEFAULT_RETRY.with_timeout(10.0)


def parse_gcs_uri(uri: str) -> tuple[str, str]:
    """``gs://bucket[/prefix]`` -> ``(bucket, prefix)`` with no slashes around the prefix."""
    return parse_bucket_uri(uri, "gs", _BUCKET, GCS_URI.name)


class GcsStore(BucketStore):
    """Adapters in a Google Cloud Storage bucket (see the module's docstring)."""

    backend: ClassVar[str] = "gcs"
    #: A generation is a number.
    object_version: ClassVar[re.Pattern[str]] = re.compile(r"[0-9]{1,20}")

    def open_bucket(self, uri: str, transfer: TransferConfig) -> tuple[str, str, str | None]:
        """``gs://bucket[/prefix]``; the endpoint an emulator's (``STORAGE_EMULATOR_HOST``): its
        bucket is not the real one of that name. The client is made on first use."""
        self.bucket_name, prefix = parse_gcs_uri(uri)
        self._client: storage.Client | None = None
        self._client_guard = threading.Lock()
        return f"gs://{self.bucket_name}", prefix, os.environ.get("STORAGE_EMULATOR_HOST") or None

    @property
    def client(self) -> storage.Client:
        """The client, made on first use: finding Google's default credentials may ask the
        metadata server, and there is no network while vLLM loads plugins."""
        with self._client_guard:
            if self._client is None:
                with store_errors("connecting to Google Cloud Storage"):
                    client = storage.Client()
                    _keep_a_connection_per_read(client._http)
                    self._client = client
            return self._client

    @property
    def bucket(self) -> storage.Bucket:
        """The bucket handle."""
        return self.client.bucket(self.bucket_name)

    def list_adapter_files(self, name: str, folder: str) -> dict[str, RemoteFile]:
        """One listing of the key range of ``folder`` from the adapter's config to its last
        weights name (to ``model.sig`` when signatures are checked; ``start_offset`` and
        ``end_offset``), so whatever else the folder holds (checkpoints, logs) is never listed."""
        end = _PAST_SIGNATURE if self.lists_signatures else _PAST_ADAPTER_FILES
        with store_errors(f"listing {self.location(folder)}"):
            blobs = list(
                self.bucket.list_blobs(
                    prefix=folder,
                    delimiter="/",
                    start_offset=folder + min(self.file_names),
                    end_offset=folder + end,
                    max_results=_MAX_LOOKUP_ENTRIES,
                    retry=None,  # the pipeline's lookup retry is the only one
                    timeout=self.transfer.lookup_timeout,
                )
            )
        if len(blobs) == _MAX_LOOKUP_ENTRIES:
            raise self.crowded_folder(name, f"a listing of {_MAX_LOOKUP_ENTRIES} entries")
        return {
            blob.name[len(folder) :]: RemoteFile(
                blob.name[len(folder) :],
                blob.size or 0,
                _declared_checksums(blob),
                etag=str(blob.generation),
            )
            for blob in blobs
        }

    def read_object(self, key: str, max_bytes: int) -> StoredObject | None:
        """One streamed media read (with the lookups' time limits) of up to ``max_bytes + 1``
        bytes, and the generation it came from."""
        with (
            store_errors(f"reading {self.location(key)}"),
            self.client._http.get(
                self._media_url(key), stream=True, timeout=self.transfer.lookup_timeout
            ) as response,
        ):
            if response.status_code == 404:
                return None
            if response.status_code != 200:
                raise google_errors.from_http_response(response)  # type: ignore[no-untyped-call]
            content = response.raw.read(max_bytes + 1, decode_content=True)
            return StoredObject(content, response.headers.get("x-goog-generation", ""))

    def upload_object(self, key: str, path: Path) -> bool:
        """One upload that only creates the object (``ifGenerationMatch=0``)."""
        blob = self.bucket.blob(key)
        return _unless_refused(
            self.location(key), lambda: blob.upload_from_filename(path, if_generation_match=0)
        )

    def write_object(self, key: str, content: bytes, *, replacing: str | None) -> bool:
        """One upload if the object is still at generation ``replacing`` (``None``: absent)."""
        generation = 0 if replacing is None else int(replacing)
        blob = self.bucket.blob(key)
        return _unless_refused(
            self.location(key),
            lambda: blob.upload_from_string(content, if_generation_match=generation),
        )

    def list_subfolders(self, key: str) -> Iterator[str]:
        """One paginated listing with ``delimiter="/"``."""
        with store_errors(f"listing gs://{self.bucket_name}/{key}"):
            blobs = self.bucket.list_blobs(
                prefix=key,
                delimiter="/",
                retry=_LISTING_RETRY,
                timeout=self.transfer.transfer_timeout,
            )
            for page in blobs.pages:
                yield from sorted(page.prefixes)

    def download(
        self, adapter: RemoteAdapter, file: RemoteFile, destination: Path
    ) -> Mapping[str, str]:
        """Parallel ranged reads of the listed generation, written in place; an object the store
        says is of another size than listed is not read, and nothing is written past that size.

        The media requests go through the client's own authorized session, streamed in 1 MiB
        chunks (Google's download helper reads 8 KiB at a time: five times slower here).
        """
        key = self.object_key(adapter, file)
        url = self._media_url(key, generation=file.etag)
        where = f"{self.location(key)}#{file.etag}"

        def fetch_range(start: int, end: int, write: Callable[[bytes], None]) -> None:
            with store_errors(f"reading bytes {start}-{end} of {where}"):
                headers = {"Range": f"bytes={start}-{end - 1}"}
                with self.client._http.get(
                    url, headers=headers, stream=True, timeout=self.transfer.transfer_timeout
                ) as response:
                    if response.status_code == 404:
                        raise VersionChangedError(
                            f"{file.path}: the store has no generation {file.etag}"
                        )
                    if response.status_code not in (200, 206):
                        raise google_errors.from_http_response(response)  # type: ignore[no-untyped-call]
                    check_stored_size(file, stored_size(response.headers.get("Content-Range")))
                    for chunk in response.iter_content(_CHUNK):
                        write(chunk)

        self.download_ranges(destination, file.size, fetch_range)
        return {}

    def _media_url(self, key: str, generation: str | None = None) -> str:
        """The URL of the bytes of object ``key`` (at ``generation``; default: the live one)."""
        query = {"alt": "media"}
        if generation is not None:
            query["generation"] = generation
        return (
            f"{self.client.api_endpoint}/download/storage/v1/b/{self.bucket_name}/o/"
            f"{quote(key, safe='')}?{urlencode(query)}"
        )


def _keep_a_connection_per_read(session: requests.Session) -> None:
    """Let ``session`` keep a connection for each read the process runs at once
    (`PARALLEL_READS`), as the S3 client does: requests keeps 10 per host, so every read past the
    tenth at once (two large files fetched together) opened a connection, a TLS handshake with
    GCS, and closed it when it ended. The adapters stay (an mTLS one holds the client
    certificate); only their pools are made anew, before any connection is open."""
    for adapter in session.adapters.values():
        if isinstance(adapter, HTTPAdapter):
            adapter.init_poolmanager(DEFAULT_POOLSIZE, PARALLEL_READS)


def _unless_refused(where: str, write: Callable[[], None]) -> bool:
    """``write()``; ``False`` if GCS refused its precondition (the object is not as expected)."""
    with store_errors(f"writing {where}"):
        try:
            write()
        except google_errors.PreconditionFailed:
            return False
    return True


def _declared_checksums(blob: storage.Blob) -> dict[str, str]:
    checksums = {}
    if blob.crc32c:
        checksums["crc32c"] = base64.b64decode(blob.crc32c).hex()
    if blob.md5_hash:  # absent for composite objects
        checksums["md5"] = base64.b64decode(blob.md5_hash).hex()
    return checksums


@contextmanager
def store_errors(doing: str) -> Iterator[None]:
    """Turn Google client errors into our error types, with messages free of secrets."""
    try:
        yield
    except google.auth.exceptions.DefaultCredentialsError:
        raise StoreRefusedError(
            f"{doing} failed: no Google credentials found; configure application default "
            "credentials (workload identity, GOOGLE_APPLICATION_CREDENTIALS)"
        ) from None
    except (google_errors.Unauthorized, google_errors.Forbidden) as error:
        raise StoreRefusedError(
            f"{doing} failed: HTTP {error.code}: the store refused our credentials; check the "
            "service account and its access to the bucket"
        ) from None
    except google_errors.NotFound:
        raise StoreUnavailableError(
            f"{doing} failed: HTTP 404: the bucket or object does not exist; check {GCS_URI.name}"
        ) from None
    except google_errors.PreconditionFailed:
        raise VersionChangedError(
            f"{doing} failed: the object changed while it was being fetched"
        ) from None
    except google_errors.GoogleAPICallError as error:
        if error.code is not None and (error.code >= 500 or error.code in (408, 429)):
            raise TransientStoreError(f"{doing} failed: HTTP {error.code}") from None
        raise StoreUnavailableError(f"{doing} failed: HTTP {error.code}") from None
    except (google_errors.RetryError, requests.RequestException, ConnectionError) as error:
        raise TransientStoreError(f"{doing} failed: {type(error).__name__}") from None
