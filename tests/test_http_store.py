"""The HTTP store's own rules, beyond the store contract (tests/test_store_contract.py runs every
behaviour on it, with and without ``Range``): what URIs it reads, what it makes of an index, a
server without ``Range``, a redirect elsewhere, a refusal, and its registration as a vLLM plugin."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import BASE_MODEL, files_of

from devtools.file_server import FileServer
from devtools.models import write_lora_adapter
from vllm_lora_resolvers import plugin, stores
from vllm_lora_resolvers.backends.http import INDEX, HttpStore, write_index, write_indexes
from vllm_lora_resolvers.cache import NodeCache
from vllm_lora_resolvers.config import ConfigurationError, Settings
from vllm_lora_resolvers.errors import (
    InvalidAdapterError,
    StoreRefusedError,
    StoreUnavailableError,
)
from vllm_lora_resolvers.resolver import Resolver
from vllm_lora_resolvers.transfer import TransferConfig

Resolve = Callable[[str], Resolver]


@pytest.fixture
def site(tmp_path: Path) -> Path:
    root = tmp_path / "site"
    write_lora_adapter(root / "team" / "sql", base_model=BASE_MODEL)
    write_indexes(root)
    return root


@pytest.fixture
def resolver_of(cache_dir: Path, make_settings: Callable[..., Settings]) -> Resolve:
    def make(url: str) -> Resolver:
        store = HttpStore(
            url, make_settings(), NodeCache(cache_dir), TransferConfig(part_size=4096)
        )
        return Resolver(store)

    return make


@pytest.mark.parametrize(
    "uri",
    [
        "ftp://adapters.internal/prod",
        "file:///srv/adapters",
        "https://",
        "https://user:s3cr3t@adapters.internal/prod",
        "https://adapters.internal/prod?token=s3cr3t",
        "https://adapters.internal/prod#x",
    ],
)
def test_only_plain_http_uris_are_read_and_no_credential_is_repeated(
    uri: str, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(VLLM_LORA_RESOLVER_HTTP_URI=uri)
    with pytest.raises(ConfigurationError, match="VLLM_LORA_RESOLVER_HTTP_URI=") as refused:
        stores.HTTP.source(settings)
    assert "s3cr3t" not in str(refused.value)


def test_the_uri_is_read_without_its_last_slash(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(VLLM_LORA_RESOLVER_HTTP_URI=" https://adapters.internal/prod/ ")
    assert stores.HTTP.source(settings) == "https://adapters.internal/prod"
    assert stores.HTTP.source(make_settings()) == ""


def test_an_index_lists_the_files_with_sizes_and_sha256_and_the_folders(site: Path) -> None:
    top = json.loads((site / INDEX).read_text())
    assert top == {"files": [], "folders": ["team"]}
    index = json.loads((site / "team" / "sql" / INDEX).read_text())
    files = sorted(set(files_of(site / "team" / "sql")) - {INDEX})
    assert [entry["path"] for entry in index["files"]] == files
    for entry in index["files"]:
        assert entry["size"] == (site / "team" / "sql" / entry["path"]).stat().st_size
        assert len(entry["sha256"]) == 64


def test_the_module_writes_the_indexes_of_a_folder(tmp_path: Path) -> None:
    write_lora_adapter(tmp_path / "sql", base_model=BASE_MODEL)
    ran = subprocess.run(
        [sys.executable, "-m", "vllm_lora_resolvers.backends.http", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert ran.stdout.split() == [str(tmp_path / INDEX), str(tmp_path / "sql" / INDEX)]


def test_a_server_without_range_is_read_one_whole_file_at_a_time(
    site: Path, resolver_of: Resolve, cache_dir: Path
) -> None:
    with FileServer(site, ranges=False) as server:
        resolver = resolver_of(server.url)
        resolved = resolver.resolve(BASE_MODEL, "team/sql")
        assert resolved is not None
        assert files_of(resolved.path) == {
            name: data for name, data in files_of(site / "team" / "sql").items() if name != INDEX
        }
        assert resolver.store.ranges is False  # type: ignore[attr-defined]
        write_lora_adapter(site / "chat", base_model=BASE_MODEL, seed=3)
        write_index(site / "chat")
        before = len(server.requests)
        assert resolver.resolve(BASE_MODEL, "chat") is not None
        reads = [r for r in server.requests[before:] if not r[1].endswith(INDEX)]
        assert len(reads) == 2  # the config and the weights, whole, once each


def test_a_malformed_index_is_refused_with_the_reason(site: Path, resolver_of: Resolve) -> None:
    (site / "team" / "sql" / INDEX).write_text('{"files": [{"path": "../x", "size": 1}]}')
    with FileServer(site) as server, pytest.raises(InvalidAdapterError, match="is not an index"):
        resolver_of(server.url).resolve(BASE_MODEL, "team/sql")


def test_a_name_without_an_index_is_missing_and_a_folder_without_one_lists_nothing(
    site: Path, resolver_of: Resolve
) -> None:
    (site / INDEX).unlink()
    with FileServer(site) as server:
        resolver = resolver_of(server.url)
        assert resolver.resolve(BASE_MODEL, "team/chat") is None
        assert list(resolver.store.list_names()) == []
        assert list(resolver.store.list_names("team")) == ["team/sql"]


class _Answering(BaseHTTPRequestHandler):
    """Answers every ``GET`` with ``status`` and, for a redirect, ``Location: location``."""

    status = 302
    location = ""

    def do_GET(self) -> None:
        self.send_response(self.status)
        if self.location:
            self.send_header("Location", self.location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def answering() -> Iterator[Callable[[int, str], str]]:
    servers = []

    def serve(status: int, location: str = "") -> str:
        handler = type("Handler", (_Answering,), {"status": status, "location": location})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def test_a_redirect_to_another_origin_is_not_followed(
    site: Path, resolver_of: Resolve, answering: Callable[[int, str], str]
) -> None:
    with FileServer(site) as elsewhere:
        url = answering(302, f"{elsewhere.url}/team/sql/{INDEX}")
        with pytest.raises(StoreUnavailableError, match="another origin is not followed"):
            resolver_of(url).resolve(BASE_MODEL, "team/sql")
        assert elsewhere.requests == []


@pytest.mark.parametrize("status", [401, 403])
def test_an_unauthorised_answer_is_a_refusal(
    status: int, resolver_of: Resolve, answering: Callable[[int, str], str]
) -> None:
    with pytest.raises(StoreRefusedError, match=f"HTTP {status}"):
        resolver_of(answering(status, "")).resolve(BASE_MODEL, "team/sql")


async def test_the_store_registers_as_a_vllm_plugin_and_answers_vllm(
    site: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = pytest.importorskip("vllm.lora.resolver").LoRAResolverRegistry
    with FileServer(site) as server:
        monkeypatch.setenv("VLLM_LORA_RESOLVER_HTTP_URI", server.url + "/")
        monkeypatch.setenv("VLLM_LORA_RESOLVER_CACHE_DIR", str(cache_dir))
        monkeypatch.setenv("VLLM_PLUGINS", "lora_fs_resolver,lora_http_resolver")
        monkeypatch.setattr(registry, "resolvers", {})
        plugin.register_http_resolver()
        plugin.register_http_resolver()  # vLLM loads plugins in several processes: idempotent
        plugin.register_fs_resolver()  # listed first: tried first, whatever the loading order
        assert list(registry.resolvers) == ["lora_fs_resolver", "lora_http_resolver"]
        request = await registry.get_resolver("lora_http_resolver").resolve_lora(
            BASE_MODEL, "team/sql"
        )
    assert request.lora_name == "team/sql"
    assert Path(request.lora_path).is_relative_to(cache_dir)
