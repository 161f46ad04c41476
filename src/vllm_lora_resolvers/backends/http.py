"""Adapters on any HTTP(S) server (``VLLM_LORA_RESOLVER_HTTP_URI``), read with the standard library.

Adapter ``NAME`` is the folder ``URI/NAME/``, described by its ``index.json``: each file's path,
size and SHA-256::

    {"files": [{"path": "adapter_config.json", "size": 712, "sha256": "9f86d0..."},
               {"path": "adapter_model.safetensors", "size": 27280152, "sha256": "2c26b4..."}],
     "folders": []}

``folders`` names the folders below it, for ``vllm-lora ls`` (the top folder's index lists the
adapters). `write_indexes` writes them (``python -m vllm_lora_resolvers.backends.http DIR``). The
version of an adapter is a digest of the entries of the files it is made of, and the pipeline
verifies each file's size and SHA-256 as it arrives. Files are read in ranged ``GET`` parts; a
server that ignores ``Range`` (answering 200 with the whole file) is read whole, one file at a
time. Only ``http`` and ``https`` URIs without credentials are read; a redirect to another origin
is not followed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, ClassVar
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vllm_lora_resolvers.adapter import adapter_from_listing
from vllm_lora_resolvers.backends.base import Store
from vllm_lora_resolvers.config import ConfigurationError, Variable
from vllm_lora_resolvers.errors import (
    InvalidAdapterError,
    StoreRefusedError,
    StoreUnavailableError,
    TransientStoreError,
    VersionChangedError,
)
from vllm_lora_resolvers.names import is_safe_adapter_name
from vllm_lora_resolvers.remote import RemoteAdapter, RemoteFile
from vllm_lora_resolvers.transfer import check_stored_size, download_in_parts, stored_size

URI = Variable(
    "VLLM_LORA_RESOLVER_HTTP_URI",
    "unset: HTTP resolver off",
    "`https://host[/path]`; adapter NAME is the folder `path/NAME/`, listed by its `index.json`.",
)
#: The file describing a folder: its files (path, size, SHA-256) and the folders below it.
INDEX = "index.json"
#: A larger index is refused unread.
MAX_INDEX_BYTES = 1 << 20
_CHUNK = 1 << 20


class IndexedFile(BaseModel):
    """One file of a folder's index."""

    model_config = ConfigDict(frozen=True)

    path: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a file of the folder itself
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class FolderIndex(BaseModel):
    """A folder's ``index.json``."""

    model_config = ConfigDict(frozen=True)

    files: tuple[IndexedFile, ...] = ()
    folders: tuple[str, ...] = ()


def parse_http_uri(uri: str) -> str:
    """The base URL of an HTTP store: ``http(s)://host[:port][/path]``, without a final ``/``.

    >>> parse_http_uri("https://adapters.internal/prod/")
    'https://adapters.internal/prod'
    """
    parts = urlsplit(uri)
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.username is not None
        or parts.query
        or parts.fragment
    ):
        raise ConfigurationError(
            f"{URI.name}={_shown(uri)!r} is not http(s)://HOST[:PORT][/PATH] "
            "(credentials, a query or a fragment are not read)"
        )
    return uri.rstrip("/")


def _shown(uri: str) -> str:
    """``uri`` with any credentials, query and fragment masked."""
    parts = urlsplit(uri)
    _, at, host = parts.netloc.rpartition("@")
    masked = ("***" if part else "" for part in (parts.query, parts.fragment))
    return urlunsplit((parts.scheme, f"***@{host}" if at else host, parts.path, *masked))


class _SameOrigin(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only within the origin asked (an answer 3xx otherwise)."""

    def redirect_request(  # noqa: PLR0917 (urllib's signature)
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        if _origin(newurl) != _origin(req.full_url):
            return None
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, parts.hostname or "", parts.port


_OPENER = urllib.request.build_opener(_SameOrigin())


class HttpStore(Store):
    """Adapters on an HTTP(S) server: ``source`` is the base URL, as `parse_http_uri` reads it
    (see the module's docstring)."""

    backend: ClassVar[str] = "http"
    #: Whether the server answers ``Range`` (``False`` once it answered one with 200).
    ranges: bool = True

    def locate(self, name: str) -> RemoteAdapter | None:
        """The adapter's ``index.json``: one ``GET``."""
        index = self._index(f"{name}/", f"looking up {name!r}")
        if index is None:
            return None
        listed = {
            file.path: RemoteFile(file.path, file.size, {"sha256": file.sha256}, etag=file.sha256)
            for file in index.files
        }
        location = f"{self.source}/{quote(name)}/"
        return adapter_from_listing(name, location, listed, signature=self.lists_signatures)

    def list_names(self, folder: str = "") -> Iterator[str]:
        """The folders the index of ``folder`` names (none without an index)."""
        index = self._index(f"{folder}/" if folder else "", f"listing {folder or 'the server'}")
        for entry in sorted(index.folders if index else ()):
            name = f"{folder}/{entry}" if folder else entry
            if is_safe_adapter_name(name):
                yield name

    def download(
        self, adapter: RemoteAdapter, file: RemoteFile, destination: Path
    ) -> Mapping[str, str]:
        """Ranged ``GET``s in parallel parts; the whole file at once from a server that ignores
        ``Range``. The size and SHA-256 of the index are verified by the pipeline."""
        url = f"{adapter.location}{file.path}"

        def fetch_range(start: int, end: int, write: Callable[[bytes], None]) -> None:
            doing = f"reading bytes {start}-{end} of {url}"
            with self._get(url, doing, self.transfer.transfer_timeout, (start, end)) as answer:
                if answer.status == 206:
                    check_stored_size(file, stored_size(answer.headers.get("Content-Range")))
                elif start or end < file.size:  # the whole file: read the part asked of it
                    self.ranges = False
                    _stream(answer, start, lambda _: None, doing)
                    _stream(answer, end - start, write, doing)
                    return
                # All of it: more than the part asked is the pipeline's to refuse.
                _stream(answer, None, write, doing)

        if self.ranges:
            self.download_ranges(destination, file.size, fetch_range)
        else:
            whole = dataclasses.replace(self.transfer, part_size=max(file.size, 1))
            download_in_parts(
                destination, file.size, fetch_range, config=whole, on_retry=self.count_retry
            )
        return {}

    def read_head(self, adapter: RemoteAdapter, file: RemoteFile, length: int) -> bytes | None:
        """The first ``length`` bytes, by one ranged ``GET``; ``None`` from a server that
        ignores ``Range`` (or for no byte at all)."""
        if not self.ranges or not length:
            return None
        url = f"{adapter.location}{file.path}"
        doing = f"reading the head of {url}"
        with self._get(url, doing, self.transfer.lookup_timeout, (0, length)) as answer:
            if answer.status != 206:
                self.ranges = False
                return None
            check_stored_size(file, stored_size(answer.headers.get("Content-Range")))
            head = bytearray()
            _stream(answer, length, head.extend, doing)
            return bytes(head)

    def _index(self, folder: str, doing: str) -> FolderIndex | None:
        """The index of ``folder`` (``""`` or ``NAME/``), or ``None`` when it has none."""
        url = f"{self.source}/{quote(folder)}{INDEX}"
        try:
            with self._get(url, doing, self.transfer.lookup_timeout) as answer:
                raw = bytearray()
                _stream(answer, MAX_INDEX_BYTES + 1, raw.extend, doing)
        except _NotFoundError:
            return None
        if len(raw) > MAX_INDEX_BYTES:
            raise InvalidAdapterError(f"{url} is larger than {MAX_INDEX_BYTES} bytes")
        try:
            return FolderIndex.model_validate_json(bytes(raw))
        except ValidationError as error:
            problem = error.errors()[0]
            where = ".".join(str(part) for part in problem["loc"])
            raise InvalidAdapterError(f"{url} is not an index: {where}: {problem['msg']}") from None

    @contextmanager
    def _get(
        self,
        url: str,
        doing: str,
        timeout: tuple[float, float],
        span: tuple[int, int] | None = None,
    ) -> Iterator[http.client.HTTPResponse]:
        """The answer to a ``GET`` of ``url``, or of bytes ``[start, end)`` of a file with
        ``span`` (then a file gone since its index was read is a `VersionChangedError`).
        ``timeout`` is (connect, read): one socket time limit, the larger, serves both."""
        request = urllib.request.Request(url)  # noqa: S310 (http or https: parse_http_uri)
        if span is not None:
            request.add_header("Range", f"bytes={span[0]}-{span[1] - 1}")
        with _http_errors(doing, file=span is not None):
            answer = _OPENER.open(request, timeout=max(timeout))
        with answer:
            yield answer


class _NotFoundError(Exception):
    """HTTP 404."""


@contextmanager
def _http_errors(doing: str, *, file: bool = False) -> Iterator[None]:
    """The standard library's errors as the pipeline's: 408, 429, 5xx and broken connections are
    retried; 401 and 403 are refusals; a redirect elsewhere is not followed; 404 is
    `_NotFoundError` (an index) or `VersionChangedError` (a ``file`` the index listed)."""
    try:
        yield
    except urllib.error.HTTPError as error:
        status = error.code
        error.close()
        problem = f"{doing} failed: HTTP {status}"
        if status == 404 and file:
            raise VersionChangedError(f"{problem}: the file is gone since it was listed") from None
        if status == 404:
            raise _NotFoundError from None
        if 300 <= status < 400:
            raise StoreUnavailableError(
                f"{problem}: a redirect to another origin is not followed"
            ) from None
        if status in (401, 403):
            raise StoreRefusedError(
                f"{problem}: check {URI.name} and the server's access"
            ) from None
        transient = status in (408, 429) or status >= 500
        raise (TransientStoreError if transient else StoreUnavailableError)(problem) from None
    except (OSError, http.client.HTTPException) as error:  # URLError, resets, time-outs
        reason = getattr(error, "reason", None)
        cause = type(reason if isinstance(reason, BaseException) else error).__name__
        raise TransientStoreError(f"{doing} failed: {cause}") from None


def _stream(
    answer: http.client.HTTPResponse,
    count: int | None,
    write: Callable[[bytes], None],
    doing: str,
) -> None:
    """Hand ``write`` the next ``count`` bytes of ``answer`` (``None``: all) as they come
    (``write`` runs outside the store's error mapping: a full disk is the cache's error, not the
    store's). A body that ends early is left to the caller (a download's part resumes where it
    broke)."""
    while count is None or count > 0:
        with _http_errors(doing):
            chunk = answer.read(_CHUNK if count is None else min(_CHUNK, count))
        if not chunk:
            return
        if count is not None:
            count -= len(chunk)
        write(chunk)


def write_index(folder: Path) -> Path:
    """Write ``folder``'s ``index.json``: its files (but the index) with their sizes and SHA-256,
    and its folders (but hidden ones). Returns its path."""
    files, folders = [], []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or entry.name == INDEX:
            continue
        if entry.is_dir():
            folders.append(entry.name)
        elif entry.is_file():
            digest = hashlib.sha256()
            with entry.open("rb") as stream:
                while chunk := stream.read(_CHUNK):
                    digest.update(chunk)
            files.append(
                IndexedFile(path=entry.name, size=entry.stat().st_size, sha256=digest.hexdigest())
            )
    index = folder / INDEX
    temporary = folder / f".{INDEX}.new"
    temporary.write_text(FolderIndex(files=tuple(files), folders=tuple(folders)).model_dump_json())
    temporary.replace(index)
    return index


def write_indexes(root: Path) -> list[Path]:
    """Write the index of ``root`` and of every folder below it (see `write_index`)."""
    written = []
    for folder in sorted({root, *(path for path in root.rglob("*") if path.is_dir())}):
        if not any(part.startswith(".") for part in folder.relative_to(root).parts):
            written.append(write_index(folder))
    return written


if __name__ == "__main__":  # python -m vllm_lora_resolvers.backends.http DIR
    for path in write_indexes(Path(sys.argv[1])):
        print(path)
