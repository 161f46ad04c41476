"""From a URI on the command line to the resolver that reads that store.

A store's URI (``s3://bucket[/prefix]``, ... : each store's ``uri_form``) or a local directory
names a store; the same followed by ``/NAME``, or ``hf://org/repo[/folder][@revision]``, names one
adapter in one. Each is read by the same resolver class the server uses, over a node cache of the
caller's choosing (usually a temporary one).

Where an adapter's URI ends and its store begins, only the server's configuration says: an S3 or
GCS adapter's name is its path below the configured store (``VLLM_LORA_RESOLVER_S3_URI``), and its
last segment, said to be a guess, for a URI outside it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import click

from vllm_lora_resolvers.cache import STATE_DIR, NodeCache
from vllm_lora_resolvers.config import Settings, Variable
from vllm_lora_resolvers.resolver import Resolver
from vllm_lora_resolvers.stores import BY_SCHEME, FS, HF, URI_FORMS, StoreDeclaration

REMOTE_SCHEMES = tuple(BY_SCHEME)


def naming_stores(command: click.Command) -> click.Command:
    """``command`` with ``{stores}`` in its help replaced by the URI forms of the stores, as
    their declarations give them (a new store's shows up in every command that reads stores)."""
    command.help = (command.help or "").replace("{stores}", URI_FORMS)
    return command


def is_remote(uri: str) -> bool:
    """Whether ``uri`` names a remote store (rather than a local directory)."""
    return uri.startswith(REMOTE_SCHEMES)


@dataclass(frozen=True)
class AdapterUri:
    """An adapter's URI read as a store and the name a client asks that store for."""

    store: str
    name: str
    #: The variable naming the server's store, when ``uri`` is not below the store it names:
    #: then ``store`` is a guess (the URI without its last segment).
    guessed_without: Variable | None = None


def split_adapter_uri(uri: str, settings: Settings) -> AdapterUri:
    """An adapter's URI -> its store's URI and its name there (see the module's docstring).

    >>> split_adapter_uri("s3://adapters/prod/team/sql", settings)  # doctest: +SKIP
    AdapterUri(store='s3://adapters/prod', name='team/sql', guessed_without=None)
    >>> split_adapter_uri("hf://acme/adapters/sql@v2", settings)  # doctest: +SKIP
    AdapterUri(store='hf://acme/adapters', name='acme/adapters/sql@v2', guessed_without=None)
    """
    declared = _store_of(uri)
    if declared is HF:
        name = uri.removeprefix(str(HF.scheme)).strip("/")
        path = name.partition("@")[0]
        if path.count("/") < 1:
            raise click.BadParameter(f"{uri!r} is not hf://ORG/REPO[/FOLDER][@REVISION]")
        return AdapterUri(f"{HF.scheme}{'/'.join(path.split('/')[:2])}", name)
    variable = declared.variable
    store = (declared.source(settings) or "").rstrip("/")
    name = uri[len(store) :].strip("/") if store and uri.startswith(f"{store}/") else ""
    if name:
        return AdapterUri(store, name)
    store, _, name = uri.rstrip("/").rpartition("/")
    if store.endswith(":/") or not name:
        raise click.BadParameter(f"{uri!r} names no adapter: write SCHEME://BUCKET[/PREFIX]/NAME")
    return AdapterUri(store, name, guessed_without=variable)


def open_store(uri: str, settings: Settings, cache: NodeCache) -> Resolver:
    """The resolver of the store ``uri`` names, over ``cache``.

    Raises `ConfigurationError` for a malformed URI and `click.ClickException` when the
    package's extra for that store is not installed.
    """
    store = _store_of(uri)
    try:
        return store.open(uri, settings, cache)
    except ImportError as error:
        if store.extra is None:
            raise
        raise click.ClickException(
            f"reading {store.scheme} needs an extra ({error}); {store.install_hint}"
        ) from None


def _store_of(uri: str) -> StoreDeclaration:
    """The store ``uri`` names by its scheme; the filesystem's for a URI of none."""
    return next((BY_SCHEME[s] for s in REMOTE_SCHEMES if uri.startswith(s)), FS)


@contextmanager
def scratch_cache(store_uri: str) -> Iterator[tuple[NodeCache, Path]]:
    """A node cache for one command and a scratch folder, both deleted afterwards.

    A local directory that is itself a node cache root is read over its own cache, so that the
    ``NAME`` links in it lead to snapshots the filesystem resolver recognises.
    """
    with tempfile.TemporaryDirectory(prefix="vllm-lora-") as temporary:
        scratch = Path(temporary)
        root = Path(store_uri)
        own = not is_remote(store_uri) and (root / STATE_DIR).is_dir()
        yield NodeCache(root if own else scratch / "cache"), scratch
