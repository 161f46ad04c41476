"""The Azure Blob Storage resolver against Azurite on loopback, through a fault relay: what is
specific to Azure (URIs, accounts and credentials, ETags, Content-MD5) and the essentials."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from azure.storage.blob import ContainerSasPermissions, ContentSettings, generate_container_sas
from azure_fixtures import AZURE_VARIABLES, AzureContainer
from conftest import BASE_MODEL, files_of, snapshot_dirs, staging_entries, vllm_lora
from resolver_setup import fast_transfer

from devtools.models import write_large_adapter, write_lora_adapter
from devtools.relay import Fault
from vllm_lora_resolvers.backends.azure import AzureBlobStore, parse_azure_uri
from vllm_lora_resolvers.backends.published import POINTER_FILE
from vllm_lora_resolvers.config import ConfigurationError
from vllm_lora_resolvers.errors import StoreRefusedError, StoreUnavailableError
from vllm_lora_resolvers.resolver import Resolver


def adapter(folder: Path, seed: int = 0) -> Path:
    return write_lora_adapter(folder, base_model=BASE_MODEL, seed=seed)


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("az://adapters", ("adapters", None, "")),
        ("azure://adapters/prod/", ("adapters", None, "prod")),
        ("abfss://ads@a.dfs.core.windows.net/x/y", ("ads", "a.dfs.core.windows.net", "x/y")),
        ("abfs://adapters@a.blob.core.windows.net", ("adapters", "a.blob.core.windows.net", "")),
    ],
)  # fmt: skip
def test_azure_uri_forms(uri: str, expected: tuple[str, str | None, str]) -> None:
    assert parse_azure_uri(uri) == expected


@pytest.mark.parametrize("uri", ["az://", "az://AB", "az://a--b", "az://ab", "s3://bucket", "x"])
def test_bad_azure_uri_is_a_configuration_error(uri: str) -> None:
    with pytest.raises(ConfigurationError, match="VLLM_LORA_RESOLVER_AZURE_URI"):
        parse_azure_uri(uri)


def test_the_account_comes_from_the_uri_or_the_environment_and_keys_the_cache(
    make_settings: Callable[[], object], cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vllm_lora_resolvers.cache import NodeCache

    for variable in AZURE_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    settings, cache = make_settings(), NodeCache(cache_dir)
    with pytest.raises(ConfigurationError, match="AZURE_STORAGE_ACCOUNT_NAME"):
        AzureBlobStore("az://adapters/prod", settings, cache)  # type: ignore[arg-type]
    abfss = "abfss://adapters@acct.dfs.core.windows.net/prod"
    from_uri = AzureBlobStore(abfss, settings, cache)  # type: ignore[arg-type]
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_NAME", "acct")
    from_environment = AzureBlobStore("az://adapters/prod", settings, cache)  # type: ignore[arg-type]
    assert from_uri.source == from_environment.source
    assert from_uri.source == "az://adapters/prod@https://acct.blob.core.windows.net"
    assert from_uri.location("prod/sql/") == "az://adapters/prod/sql/"


def test_resolves_hits_updates_and_forgets_a_deleted_adapter(
    azure_container: AzureContainer, tmp_path: Path, cache_dir: Path
) -> None:
    v1 = adapter(tmp_path / "v1", seed=1)
    azure_container.upload("sql", v1)
    resolver = azure_container.resolver(cache_dir, fast_transfer(8192))
    first = resolver.resolve(BASE_MODEL, "sql")
    assert first is not None and files_of(first.path) == files_of(v1)
    assert (cache_dir / "sql").resolve() == first.path.resolve()

    azure_container.relay.reset_counters()
    assert resolver.resolve(BASE_MODEL, "sql") == first
    [(method, listing)] = azure_container.requests()  # a hit: one listing of the adapter's files
    assert (
        method == "GET" and "comp=list" in listing and "prefix=adapters%2Fsql%2Fadapter_" in listing
    )

    v2 = adapter(tmp_path / "v2", seed=2)
    azure_container.upload("sql", v2)
    second = resolver.resolve(BASE_MODEL, "sql")
    assert second is not None and second.path != first.path and first.path.exists()
    assert files_of(second.path) == files_of(v2)

    azure_container.delete("sql")
    assert resolver.resolve(BASE_MODEL, "sql") is None
    assert resolver.resolve(BASE_MODEL, "absent") is None


def test_the_lookup_skips_the_rest_of_the_folder(
    azure_container: AzureContainer, tmp_path: Path, cache_dir: Path
) -> None:
    for clutter in ("0001/checkpoint", "adapter_config.json.bak/x", "adapter_zz", "zz/logs"):
        azure_container.client.upload_blob(f"adapters/sql/{clutter}", b"x")
    azure_container.upload("sql", adapter(tmp_path / "sql"))
    found = azure_container.resolver(cache_dir).store.locate("sql")
    assert found is not None
    assert [file.path for file in found.files] == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert all(set(file.checksums) == {"md5"} for file in found.files)


def relay_port(container: AzureContainer) -> int:
    return int(container.relay.url.rsplit(":", 1)[1])


def sas_token(container: AzureContainer) -> str:
    return generate_container_sas(
        container.server.account,
        container.name,
        account_key=container.server.key,
        permission=ContainerSasPermissions(read=True, list=True),
        expiry=datetime.now(UTC) + timedelta(hours=1),
    )


@pytest.mark.parametrize("way", ["key", "sas"])
def test_an_account_url_with_a_key_or_a_sas_token(
    way: str,
    azure_container: AzureContainer,
    tmp_path: Path,
    cache_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    azure_container.upload("sql", adapter(tmp_path / "sql"))
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING")
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_NAME", azure_container.server.account)
    port = relay_port(azure_container)
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_URL", azure_container.server.url_via(port))
    secret = azure_container.server.key if way == "key" else sas_token(azure_container)
    monkeypatch.setenv(
        "AZURE_STORAGE_ACCOUNT_KEY" if way == "key" else "AZURE_STORAGE_SAS_TOKEN", secret
    )
    resolver = azure_container.resolver(cache_dir)
    assert resolver.resolve(BASE_MODEL, "sql") is not None
    assert resolver.source == f"{azure_container.uri}@{azure_container.server.url_via(port)}"


def test_refused_credentials_are_explained_without_the_secret(
    azure_container: AzureContainer,
    tmp_path: Path,
    cache_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    azure_container.upload("sql", adapter(tmp_path / "sql"))
    wrong = "V3Jvbmcta2V5LW5ldmVyLXNob3du" * 3
    relayed = azure_container.server.connection_string(relay_port(azure_container))
    connection = re.sub("AccountKey=[^;]+", f"AccountKey={wrong}", relayed)
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", connection)
    ours = logging.getLogger("vllm.lora_resolvers")
    ours.addHandler(caplog.handler)  # vLLM, once imported, stops its loggers propagating
    caplog.set_level(logging.DEBUG, logger=ours.name)
    try:
        resolver = azure_container.resolver(cache_dir)
        with pytest.raises(StoreRefusedError, match="refused our credentials") as raised:
            resolver.resolve(BASE_MODEL, "sql")
    finally:
        ours.removeHandler(caplog.handler)
    assert "AuthorizationFailure (HTTP 403)" in str(raised.value)
    for shown in (str(raised.value), caplog.text, resolver.source):
        assert wrong not in shown and azure_container.server.key not in shown


def test_a_missing_container_is_explained(azure_container: AzureContainer, cache_dir: Path) -> None:
    azure_container.name = "no-such-container"
    with pytest.raises(StoreRefusedError, match="container does not exist"):
        azure_container.resolver(cache_dir).resolve(BASE_MODEL, "sql")


def test_a_blob_replaced_mid_download_is_fetched_again_at_its_new_version(
    azure_container: AzureContainer, tmp_path: Path, cache_dir: Path
) -> None:
    v1 = write_large_adapter(tmp_path / "v1", base_model=BASE_MODEL, size_bytes=1 << 20, seed=1)
    v2 = write_large_adapter(tmp_path / "v2", base_model=BASE_MODEL, size_bytes=1 << 20, seed=2)
    azure_container.upload("big", v1)
    built = azure_container.resolver(cache_dir, VLLM_LORA_RESOLVER_MAX_RANK="1000000")

    class ReplacedAfterTheFirstPart(AzureBlobStore):
        replaced = False

        def download_ranges(self, destination, size, fetch_range, declared_algorithms=()):  # type: ignore[no-untyped-def]
            def fetch(start, end, write):  # type: ignore[no-untyped-def]
                fetch_range(start, end, write)
                if not self.replaced:
                    self.replaced = True
                    azure_container.upload("big", v2)

            super().download_ranges(destination, size, fetch, declared_algorithms)

    # The parts one after the other: the second one sees the new blob.
    one_at_a_time = replace(fast_transfer(256 << 10), parts_in_flight=1)
    store = ReplacedAfterTheFirstPart(
        azure_container.uri, built.settings, built.cache, one_at_a_time
    )
    resolved = Resolver(store).resolve(BASE_MODEL, "big")
    assert store.replaced and resolved is not None
    assert files_of(resolved.path) == files_of(v2)
    assert len(snapshot_dirs(cache_dir)) == 1


def test_a_content_md5_mismatch_is_refused(
    azure_container: AzureContainer, tmp_path: Path, cache_dir: Path
) -> None:
    azure_container.upload("sql", adapter(tmp_path / "sql"))
    weights = azure_container.client.get_blob_client("adapters/sql/adapter_model.safetensors")
    weights.set_http_headers(ContentSettings(content_md5=bytearray(16)))
    with pytest.raises(StoreUnavailableError, match="md5 does not match"):
        azure_container.resolver(cache_dir).resolve(BASE_MODEL, "sql")
    assert snapshot_dirs(cache_dir) == []


def test_503_is_retried_and_a_persistent_failure_is_a_clear_error_within_seconds(
    azure_container: AzureContainer, tmp_path: Path, cache_dir: Path
) -> None:
    source = write_large_adapter(tmp_path / "big", base_model=BASE_MODEL, size_bytes=1 << 20)
    azure_container.upload("big", source)
    azure_container.relay.add_fault(Fault("status", path_contains="comp=list", times=1))
    azure_container.relay.add_fault(Fault("status", path_contains="adapter_model", times=3))
    resolver = azure_container.resolver(cache_dir, VLLM_LORA_RESOLVER_MAX_RANK="1000000")
    resolved = resolver.resolve(
        BASE_MODEL,
        "big",
    )
    assert resolved is not None and files_of(resolved.path) == files_of(source)

    azure_container.upload("sql", adapter(tmp_path / "sql"))
    azure_container.relay.add_fault(Fault("status", path_contains="adapters%2Fsql", times=10_000))
    azure_container.relay.add_fault(Fault("status", path_contains="adapters/sql", times=10_000))
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError, match=r"az://.*\(HTTP 503\)"):
        resolver.resolve(BASE_MODEL, "sql")
    assert time.monotonic() - started < 10
    assert staging_entries(cache_dir) == []


def test_publish_pins_and_the_command_line(
    azure_container: AzureContainer, tmp_path: Path, cache_dir: Path
) -> None:
    v1, v2 = adapter(tmp_path / "v1", seed=1), adapter(tmp_path / "v2", seed=2)
    published = vllm_lora("publish", str(v1), f"{azure_container.uri}/sql", "--version", "v1")
    assert published.returncode == 0, published.stderr
    assert f"pointer: {azure_container.uri}/sql/{POINTER_FILE}" in published.stdout
    assert (
        vllm_lora("publish", str(v2), f"{azure_container.uri}/sql", "--version", "v2").returncode
        == 0
    )
    again = vllm_lora("publish", str(v2), f"{azure_container.uri}/sql", "--version", "v2")
    assert "nothing to move" in again.stdout  # the listed Content-MD5 matched: nothing uploaded

    resolver = azure_container.resolver(cache_dir)
    current, pinned = resolver.resolve(BASE_MODEL, "sql"), resolver.resolve(BASE_MODEL, "sql@v1")
    assert current is not None and files_of(current.path) == files_of(v2)
    assert pinned is not None and files_of(pinned.path) == files_of(v1)

    listing = vllm_lora("ls", azure_container.uri)
    assert listing.returncode == 0, listing.stderr
    assert re.search(r"^sql +v2:", listing.stdout, re.MULTILINE), listing.stdout
    validated = vllm_lora("validate", f"{azure_container.uri}/sql@v1", "--base-model", BASE_MODEL)
    assert validated.returncode == 0, validated.stdout
    pulled = vllm_lora(
        "pull", "sql", "--base-model", BASE_MODEL,
        VLLM_LORA_RESOLVER_AZURE_URI=azure_container.uri,
        VLLM_LORA_RESOLVER_CACHE_DIR=str(tmp_path / "node-cache"),
        VLLM_PLUGINS="lora_azure_resolver",
    )  # fmt: skip
    assert pulled.returncode == 0, pulled.stderr
    assert f"pulled sql from {azure_container.uri}" in pulled.stdout


def test_doctor_shows_the_azure_row_with_its_secrets_hidden(
    azure_container: AzureContainer, cache_dir: Path
) -> None:
    result = vllm_lora(
        "doctor",
        VLLM_ALLOW_RUNTIME_LORA_UPDATING="true",
        VLLM_LORA_RESOLVER_AZURE_URI=azure_container.uri,
        VLLM_LORA_RESOLVER_CACHE_DIR=str(cache_dir),
        VLLM_PLUGINS="lora_azure_resolver",
        AZURE_STORAGE_ACCOUNT_NAME=azure_container.server.account,
    )
    assert result.returncode == 0, result.stdout
    assert "lora_azure_resolver" in result.stdout and "0 failed" in result.stdout
    assert re.search(r"AZURE_STORAGE_CONNECTION_STRING\W+set", result.stdout), result.stdout
    assert azure_container.server.key not in result.stdout
    assert "AZURE_STORAGE_ACCOUNT_NAME" in result.stdout


def test_an_error_answer_longer_than_the_range_asked_is_the_error_it_is(
    azure_container: AzureContainer, tmp_path: Path, cache_dir: Path
) -> None:
    """The size checks made from a blob answer's headers concern its bytes only: a 503 whose
    body is longer than the config it answers for is retried, not taken for more bytes than
    declared."""
    source = adapter(tmp_path / "sql")
    azure_container.upload("sql", source)
    config_size = (source / "adapter_config.json").stat().st_size
    azure_container.relay.add_fault(
        Fault("status", code="ServerBusy" * config_size, path_contains="adapter_config", times=2)
    )
    resolved = azure_container.resolver(cache_dir).resolve(BASE_MODEL, "sql")
    assert resolved is not None and files_of(resolved.path) == files_of(source)
