"""Adapters on a plain HTTP file server (nginx, Caddy, ...): NAME is the folder ``URL/NAME/``."""

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar, cast

import requests

from vllm_lora_resolvers.adapter import CONFIG_FILE, adapter_from_listing
from vllm_lora_resolvers.config import Settings
from vllm_lora_resolvers.errors import StoreUnavailableError, TransientStoreError
from vllm_lora_resolvers.plugin import node_cache
from vllm_lora_resolvers.remote import RemoteAdapter, RemoteFile
from vllm_lora_resolvers.resolver import BaseStorageResolver


class HttpResolver(BaseStorageResolver):
    """``source`` is the base URL: ``HEAD`` for sizes and versions, ranged ``GET`` for bytes."""

    backend: ClassVar[str] = "http"

    def locate(self, name: str) -> RemoteAdapter | None:
        """A ``HEAD`` of the config and of the weights (safetensors only: no pickles here)."""
        listed = {}
        for path in (CONFIG_FILE, "adapter_model.safetensors"):  # the name is checked: URL-safe
            url = f"{self.source}/{name}/{path}"
            with http_errors(f"looking up {name!r}"):
                response = requests.head(url, timeout=(5, 60), allow_redirects=True)
                if response.status_code == 404:
                    continue
                response.raise_for_status()
            version = response.headers.get("ETag") or response.headers.get("Last-Modified", "")
            listed[path] = RemoteFile(path, int(response.headers["Content-Length"]), etag=version)
        return adapter_from_listing(name, f"{self.source}/{name}/", listed)

    def download(
        self, adapter: RemoteAdapter, file: RemoteFile, destination: Path
    ) -> Mapping[str, str]:
        """Ranged ``GET``s; the base runs them in parallel, resumes broken parts, checks sizes."""
        url = f"{self.source}/{adapter.name}/{file.path}"

        def fetch_range(start: int, end: int, write: Callable[[bytes], None]) -> None:
            headers = {"Range": f"bytes={start}-{end - 1}"}
            with (
                http_errors(f"reading bytes {start}-{end} of {url}"),
                requests.get(url, headers=headers, stream=True, timeout=(5, 60)) as response,
            ):
                response.raise_for_status()
                if response.status_code != 206 and (start, end) != (0, file.size):
                    raise StoreUnavailableError(f"{url}: the server ignores Range requests")
                for chunk in response.iter_content(1 << 20):
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


def register() -> None:
    """Entry point ``lora_http_resolver``: adapters from ``LORA_HTTP_URL`` when it is set."""
    from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

    if url := os.environ.get("LORA_HTTP_URL", "").strip().rstrip("/"):
        settings = Settings.from_environ()
        resolver = HttpResolver(url, settings, node_cache(settings, "lora_http_resolver"))
        LoRAResolverRegistry.register_resolver("lora_http_resolver", cast("LoRAResolver", resolver))
