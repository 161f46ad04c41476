"""Every store this package resolves adapters from, each declared once, in `STORES`.

A `StoreDeclaration` holds all the package knows of a store besides its backend's code: the plugin
(entry point) that registers it, the variable that turns it on and how its value is read, where its
backend class lives, the URI scheme the command line reads it by, the extra that installs its
client (none for a store of the standard library), the client's own environment variables (and
which are secrets), and how ``vllm-lora doctor`` probes it and what it suggests when the store does
not answer. Registration and the entry points (`plugin`), the variables (`ALL_VARIABLES`: the
settings, ``doctor``, the configuration page), the command line's URIs and install hints
(`cli.stores`), its plugin plan (`cli.plugins`), ``doctor`` and ``pull`` all read this table;
tests/test_stores.py checks it against ``pyproject.toml``, tests/test_docs.py against the
documentation.

Backends that import a client library are imported only when a resolver is built: a store whose
extra is not installed costs nothing until its variable is set.
"""

from __future__ import annotations

import importlib
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from vllm_lora_resolvers.backends import http
from vllm_lora_resolvers.backends.base import Store
from vllm_lora_resolvers.config import (
    AZURE_URI,
    CACHE_DIR,
    FS_DIR,
    GCS_URI,
    HF_REPO_LIST,
    PIPELINE_VARIABLES,
    S3_URI,
    Settings,
    Variable,
    comma_list,
    install_hint,
)
from vllm_lora_resolvers.resolver import Resolver

if TYPE_CHECKING:
    from vllm_lora_resolvers.backends.hf_hub import HfHubStore

_BACKENDS = "vllm_lora_resolvers.backends"


def _missing_name() -> str:
    return f"vllm-lora-doctor-{secrets.token_hex(4)}"


def _look_up_a_missing_name(store: Store) -> None:
    """Look a name that is not there up in the store."""
    store.locate(_missing_name())


def _look_up_a_missing_name_in_a_repo(store: Store) -> None:
    """Look a name that is not there up in the first repo (a name outside the repos is refused
    unasked)."""
    hub = cast("HfHubStore", store)
    hub.locate(f"{hub.repos[0]}/{_missing_name()}")


def _list_one_name(store: Store) -> None:
    """List the directory (a local one answers any name without a question)."""
    next(store.list_names(), None)


def _text(value: str, _: Settings) -> str | None:
    return value or None


def _directory(value: str, settings: Settings) -> Path | None:
    """The folder the variable names, else the cache root."""
    folder = value or settings.value(CACHE_DIR)
    return Path(folder) if folder else None


@dataclass(frozen=True)
class StoreDeclaration:
    """One store: everything the package derives for it, declared once."""

    #: The backend's name, as its store class's ``backend`` and the metrics' label say it.
    backend: str
    #: The ``vllm.general_plugins`` entry point that registers its resolver.
    plugin: str
    #: The variable that turns it on.
    variable: Variable
    #: A value of it, as the configuration page shows it.
    example: str
    #: The module and class of its `Store`, imported lazily.
    module: str
    class_name: str
    #: What ``doctor`` suggests when the store does not answer.
    fix: str
    #: ``doctor``'s cheap question to the store.
    probe: Callable[[Store], None] = _look_up_a_missing_name
    #: The form of the URIs the command line reads it by, its scheme first (``None``: a local
    #: directory); the commands' help lists them.
    uri_form: str | None = None
    #: Other prefixes of URIs of the same store (the forms other tools write them in).
    other_schemes: tuple[str, ...] = ()
    #: The store's source for a URI of that scheme.
    source_of_uri: Callable[[str], Any] = str
    #: The store's source for the variable's (stripped) value: a falsy one leaves it off.
    source_of_value: Callable[[str, Settings], Any] = _text
    #: The pip extra that installs its client package (``None``: the standard library's).
    extra: str | None = None
    client_package: str | None = None
    #: Its client's environment variables, which ``doctor`` shows (we never read them).
    environment: tuple[str, ...] = ()
    #: Those of them ``doctor`` shows only as set or unset.
    secrets: frozenset[str] = frozenset()
    #: Whether its store is a `BucketStore`, to which ``vllm-lora publish`` writes versions.
    bucket: bool = False

    @property
    def scheme(self) -> str | None:
        """The prefix of its URIs, up to ``://`` (``None``: a local directory)."""
        return None if self.uri_form is None else self.uri_form.split("://", 1)[0] + "://"

    @property
    def schemes(self) -> tuple[str, ...]:
        """Every prefix of its URIs, `scheme` first."""
        return () if self.scheme is None else (self.scheme, *self.other_schemes)

    def source(self, settings: Settings) -> Any:
        """The store's source as ``settings`` set it; falsy when its variable is unset."""
        return self.source_of_value(settings.value(self.variable), settings)

    @property
    def install_hint(self) -> str:
        """The command that installs the store's client (its extra's requirements)."""
        return install_hint(str(self.extra))

    def store_class(self) -> type[Store]:
        """The store's class, imported now; `ImportError` when its client is missing."""
        store_class: type[Store] = getattr(importlib.import_module(self.module), self.class_name)
        return store_class

    def open(self, uri: str, settings: Settings, cache: Any) -> Resolver:
        """The resolver of the store ``uri`` names, over the `NodeCache` ``cache``."""
        return Resolver(self.store_class()(self.source_of_uri(uri), settings, cache))


S3 = StoreDeclaration(
    backend="s3",
    plugin="lora_s3_resolver",
    variable=S3_URI,
    example="s3://my-adapters/prod",
    module=f"{_BACKENDS}.s3",
    class_name="S3Store",
    fix=f"check AWS_ENDPOINT_URL_S3, AWS_DEFAULT_REGION, the AWS credentials and {S3_URI.name}",
    uri_form="s3://BUCKET[/PREFIX]",
    bucket=True,
    extra="s3",
    client_package="boto3",
    environment=(
        "AWS_ENDPOINT_URL_S3",
        "AWS_ENDPOINT_URL",
        "AWS_DEFAULT_REGION",
        "AWS_PROFILE",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
    ),
    secrets=frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}),
)
GCS = StoreDeclaration(
    backend="gcs",
    plugin="lora_gcs_resolver",
    variable=GCS_URI,
    example="gs://my-adapters/prod",
    module=f"{_BACKENDS}.gcs",
    class_name="GcsStore",
    fix=f"check Google credentials (or STORAGE_EMULATOR_HOST) and {GCS_URI.name}",
    uri_form="gs://BUCKET[/PREFIX]",
    bucket=True,
    extra="gcs",
    client_package="google-cloud-storage",
    environment=("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS"),
    secrets=frozenset({"GOOGLE_APPLICATION_CREDENTIALS"}),
)
AZURE = StoreDeclaration(
    backend="azure",
    plugin="lora_azure_resolver",
    variable=AZURE_URI,
    example="abfss://my-adapters@account.dfs.core.windows.net/prod",
    module=f"{_BACKENDS}.azure",
    class_name="AzureBlobStore",
    fix=(
        "check AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT_NAME (or "
        "AZURE_STORAGE_ACCOUNT_URL) with a key, a SAS token or the workload identity, and "
        f"{AZURE_URI.name}"
    ),
    uri_form="az://CONTAINER[/PREFIX]",
    other_schemes=("azure://", "abfss://", "abfs://"),
    bucket=True,
    extra="azure",
    client_package="azure-storage-blob",
    environment=(
        "AZURE_STORAGE_CONNECTION_STRING",
        "AZURE_STORAGE_ACCOUNT_NAME",
        "AZURE_STORAGE_ACCOUNT_URL",
        "AZURE_STORAGE_ACCOUNT_KEY",
        "AZURE_STORAGE_SAS_TOKEN",
        "AZURE_CLIENT_ID",
        "AZURE_TENANT_ID",
        "AZURE_FEDERATED_TOKEN_FILE",
        "AZURE_CLIENT_SECRET",
    ),
    secrets=frozenset(
        {
            "AZURE_STORAGE_CONNECTION_STRING",
            "AZURE_STORAGE_ACCOUNT_KEY",
            "AZURE_STORAGE_SAS_TOKEN",
            "AZURE_CLIENT_SECRET",
        }
    ),
)
HF = StoreDeclaration(
    backend="hf",
    plugin="lora_hf_resolver",
    variable=HF_REPO_LIST,
    example="acme/adapters,acme/support-bot",
    module=f"{_BACKENDS}.hf_hub",
    class_name="HfHubStore",
    fix=f"check HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE and {HF_REPO_LIST.name}",
    probe=_look_up_a_missing_name_in_a_repo,
    uri_form="hf://ORG/REPO",
    source_of_uri=lambda uri: [uri.removeprefix("hf://").strip("/")],
    source_of_value=lambda value, _: comma_list(value),
    extra="hf",
    client_package="huggingface_hub",
    environment=("HF_ENDPOINT", "HF_TOKEN", "HF_HUB_OFFLINE"),
    secrets=frozenset({"HF_TOKEN"}),
)
HTTP = StoreDeclaration(
    backend="http",
    plugin="lora_http_resolver",
    variable=http.URI,
    example="https://adapters.internal/prod",
    module=f"{_BACKENDS}.http",
    class_name="HttpStore",
    fix=f"check {http.URI.name} and that the server serves {http.INDEX} in each adapter folder",
    uri_form="https://HOST[/PATH]",
    other_schemes=("http://",),
    source_of_uri=http.parse_http_uri,
    source_of_value=lambda value, _: value and http.parse_http_uri(value),
)
FS = StoreDeclaration(
    backend="fs",
    plugin="lora_fs_resolver",
    variable=FS_DIR,
    example="/mnt/adapters",
    module=f"{_BACKENDS}.filesystem",
    class_name="FilesystemStore",
    fix=f"make {FS_DIR.name} (or {CACHE_DIR.name}) a readable directory",
    probe=_list_one_name,
    source_of_uri=Path,
    source_of_value=_directory,
)

#: Every store, in the order their resolvers are tried when ``VLLM_PLUGINS`` is unset: remote
#: stores first, then the local one.
STORES: tuple[StoreDeclaration, ...] = (S3, GCS, AZURE, HF, HTTP, FS)
BY_PLUGIN: Mapping[str, StoreDeclaration] = {store.plugin: store for store in STORES}
BY_BACKEND: Mapping[str, StoreDeclaration] = {store.backend: store for store in STORES}
#: The remote stores, by each scheme of their URIs.
BY_SCHEME: Mapping[str, StoreDeclaration] = {
    scheme: store for store in STORES for scheme in store.schemes
}
#: How the command line names each remote store, for the commands' help.
URI_FORMS = ", ".join(str(store.uri_form) for store in STORES if store.uri_form)
#: The schemes of the stores ``vllm-lora publish`` writes to.
BUCKET_SCHEMES: tuple[str, ...] = tuple(
    scheme for store in STORES if store.bucket for scheme in store.schemes
)
#: Every variable of this package, in the order the configuration page lists them: the cache
#: root, each store's, then the pipeline's and the plugins'.
ALL_VARIABLES: tuple[Variable, ...] = (
    CACHE_DIR,
    *(store.variable for store in STORES),
    *PIPELINE_VARIABLES,
)
