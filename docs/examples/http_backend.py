"""Adapters on a plain HTTP file server (nginx, Caddy, ...): NAME is the folder ``URL/NAME/``."""

import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar
from urllib.parse import unquote

import requests

from vllm_lora_resolvers.adapter import CONFIG_FILE, adapter_from_listing
from vllm_lora_resolvers.backends.base import Store
from vllm_lora_resolvers.config import Variable
from vllm_lora_resolvers.errors import (
    StoreUnavailableError,
    TransientStoreError,
    VersionChangedError,
)
from vllm_lora_resolvers.names import is_safe_adapter_name
from vllm_lora_resolvers.plugin import EntryPoint
from vllm_lora_resolvers.remote import RemoteAdapter, RemoteFile
from vllm_lora_resolvers.stores import StoreDeclaration


class HttpStore(Store):
    """``source`` is the base URL: ``HEAD`` for sizes and versions, ranged ``GET`` for bytes."""

    backend: ClassVar[str] = "http"

    def locate(self, name: str) -> RemoteAdapter | None:
        """A ``HEAD`` of the config and of the weights (safetensors only: no pickles here)."""
        listed = {}
        for path in (CONFIG_FILE, "adapter_model.safetensors"):  # the name is checked: URL-safe
            with http_errors(f"looking up {name!r}"):
                response = requests.head(
                    f"{self.source}/{name}/{path}", timeout=self.transfer.lookup_timeout
                )
                if response.status_code == 404:
                    continue
                response.raise_for_status()
            version = response.headers.get("ETag") or response.headers.get("Last-Modified", "")
            listed[path] = RemoteFile(path, int(response.headers["Content-Length"]), etag=version)
        return adapter_from_listing(name, f"{self.source}/{name}/", listed)

    def list_names(self, folder: str = "") -> Iterator[str]:
        """The folders the server's index of ``folder`` links to (nginx ``autoindex on``)."""
        with http_errors(f"listing {folder or 'the server'}"):
            url = f"{self.source}/{folder}/" if folder else f"{self.source}/"
            index = requests.get(url, timeout=self.transfer.lookup_timeout)
            index.raise_for_status()
        for link in sorted(set(re.findall(r'href="([^"/?#]+)/"', index.text))):
            if is_safe_adapter_name(unquote(link)):
                yield f"{folder}/{unquote(link)}" if folder else unquote(link)

    def download(
        self, adapter: RemoteAdapter, file: RemoteFile, destination: Path
    ) -> Mapping[str, str]:
        """Ranged ``GET``s of the version `locate` saw; the base runs them in parallel, resumes
        broken parts and checks sizes."""
        url = f"{adapter.location}{file.path}"

        def fetch_range(start: int, end: int, write: Callable[[bytes], None]) -> None:
            headers = {"Range": f"bytes={start}-{end - 1}"}
            if file.etag.startswith('"'):  # a strong ETag, not a Last-Modified date
                headers["If-Match"] = file.etag
            with (
                http_errors(f"reading bytes {start}-{end} of {url}"),
                requests.get(
                    url, headers=headers, stream=True, timeout=self.transfer.transfer_timeout
                ) as got,
            ):
                if got.status_code == 412:
                    raise VersionChangedError(f"{url} changed while it was being fetched")
                got.raise_for_status()
                if got.status_code != 206 and (start, end) != (0, file.size):
                    raise StoreUnavailableError(f"{url}: the server ignores Range requests")
                for chunk in got.iter_content(1 << 20):
                    write(chunk)

        self.download_ranges(destination, file.size, fetch_range)
        return {}  # no checksums declared: sizes are verified


@contextmanager
def http_errors(doing: str) -> Iterator[None]:
    """``requests`` errors as the pipeline's types: 408, 429, 5xx and broken connections retry."""
    try:
        yield
    except requests.RequestException as error:
        status = getattr(error.response, "status_code", None)  # None: no answer at all
        problem = f"{doing} failed: {f'HTTP {status}' if status else type(error).__name__}"
        transient = status is None or status in (408, 429) or status >= 500
        raise (TransientStoreError if transient else StoreUnavailableError)(problem) from None


URL = Variable("LORA_HTTP_URL", "unset: HTTP resolver off", "Base URL; NAME is `URL/NAME/`.")
HTTP = StoreDeclaration(
    backend=HttpStore.backend,
    plugin="lora_http_resolver",
    variable=URL,
    source=lambda settings: settings.value(URL).rstrip("/"),
    module=__name__,
    class_name=HttpStore.__name__,
    fix=f"check {URL.name} and that the server answers HEAD and ranged GET",
)
#: Entry point ``lora_http_resolver``: registered as this package's own plugins are.
register = EntryPoint(HTTP)
