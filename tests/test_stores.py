"""The table of stores: each declaration is whole, its own, and agrees with ``pyproject.toml``.

A store missing a piece, or taking another's, fails here rather than at a user: every row of
`stores.STORES` is checked against the package's entry points and extras, its backend class, and
what ``doctor`` makes of it. (tests/test_docs.py checks the rows against the documentation.)
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner
from conftest import REPO

from vllm_lora_resolvers import configured, plugin
from vllm_lora_resolvers.backends.base import Store
from vllm_lora_resolvers.backends.bucket import BucketStore
from vllm_lora_resolvers.cache import NodeCache
from vllm_lora_resolvers.cli import main
from vllm_lora_resolvers.cli.doctor import probe_store, shown_value
from vllm_lora_resolvers.cli.output import Level
from vllm_lora_resolvers.cli.stores import is_remote, open_store
from vllm_lora_resolvers.config import ConfigurationError, Settings
from vllm_lora_resolvers.errors import StoreUnavailableError
from vllm_lora_resolvers.resolver import Resolver
from vllm_lora_resolvers.stores import (
    ALL_VARIABLES,
    BUCKET_SCHEMES,
    BY_BACKEND,
    BY_PLUGIN,
    BY_SCHEME,
    STORES,
    StoreDeclaration,
)

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())

#: Plugins users may list in ``VLLM_PLUGINS`` already: never renamed.
PUBLISHED_PLUGINS = (
    "lora_fs_resolver",
    "lora_s3_resolver",
    "lora_gcs_resolver",
    "lora_hf_resolver",
    "lora_azure_resolver",
)

each_store = pytest.mark.parametrize("store", STORES, ids=[store.backend for store in STORES])


def requirement_name(requirement: str) -> str:
    """A requirement's distribution name, normalised (PEP 503)."""
    name = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert name is not None, requirement
    return re.sub(r"[-_.]+", "-", name.group()).lower()


def test_the_stores_share_no_backend_plugin_or_scheme() -> None:
    assert len(BY_BACKEND) == len(BY_PLUGIN) == len(STORES)
    schemes = [scheme for store in STORES for scheme in store.schemes]
    assert len(BY_SCHEME) == len(schemes)
    for scheme in schemes:
        assert re.fullmatch(r"[a-z0-9]+://", scheme), scheme
    assert [store.scheme for store in STORES].count(None) == 1  # one store reads a local path


def test_the_entry_points_of_pyproject_are_exactly_the_stores_registrations() -> None:
    entry_points = PYPROJECT["project"]["entry-points"]["vllm.general_plugins"]
    # The names vLLM users list in VLLM_PLUGINS never change.
    assert set(PUBLISHED_PLUGINS) <= set(entry_points)
    assert set(entry_points) == set(BY_PLUGIN)
    for name, target in entry_points.items():
        module, _, attribute = target.partition(":")
        assert module == plugin.__name__, name
        assert getattr(plugin, attribute) == plugin.EntryPoint(BY_PLUGIN[name]), name


def test_the_default_order_tries_our_stores_as_declared_and_vllms_own_last() -> None:
    ours, vllms = configured.DEFAULT_ORDER[: len(STORES)], configured.DEFAULT_ORDER[len(STORES) :]
    assert ours == tuple(store.plugin for store in STORES)
    assert vllms == (configured.VLLM_FS_PLUGIN, configured.VLLM_HF_PLUGIN)


@each_store
def test_a_store_is_turned_on_by_a_variable_of_config(store: StoreDeclaration) -> None:
    assert store.variable in ALL_VARIABLES
    assert [s.variable for s in STORES].count(store.variable) == 1


@each_store
def test_a_store_names_its_own_backend_class(store: StoreDeclaration) -> None:
    store_class = store.store_class()
    assert issubclass(store_class, Store)
    assert store_class.__name__ == store.class_name
    assert store_class.backend == store.backend


@each_store
def test_a_store_is_declared_a_bucket_exactly_when_its_class_is_one(
    store: StoreDeclaration,
) -> None:
    assert store.bucket == issubclass(store.store_class(), BucketStore)
    assert bool(set(store.schemes) & set(BUCKET_SCHEMES)) == store.bucket


@each_store
def test_a_store_with_a_client_is_installed_by_an_extra_that_holds_it(
    store: StoreDeclaration,
) -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]
    if store.extra is None:  # the standard library's: nothing to install, always importable
        assert store.client_package is None
        assert store.store_class().__module__ == store.module
        return
    assert store.extra in extras and store.client_package is not None
    clients = {requirement_name(requirement) for requirement in extras[store.extra]}
    assert requirement_name(store.client_package) in clients
    # The extra's own requirements, which an index has (the package is on none yet).
    hinted = re.findall(r"'([^']+)'", store.install_hint)
    assert {requirement_name(r) for r in hinted} == clients
    assert store.install_hint.endswith(f" (the [{store.extra}] extra)")


def test_an_install_that_does_not_declare_an_extra_is_told_to_reinstall_with_it(
    tmp_path: Path,
) -> None:
    # An install older than the [signing] extra: its metadata declares only [s3].
    info = tmp_path / "vllm_lora_resolvers-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: vllm-lora-resolvers\nVersion: 0.0.1\n"
        "Provides-Extra: s3\nRequires-Dist: boto3>=1.35; extra == 's3'\n"
    )
    hints = subprocess.run(
        [sys.executable, "-c", HINTS, "s3", "signing"],
        env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO / 'src'}"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert hints == [
        "pip install 'boto3>=1.35' (the [s3] extra)",
        "reinstall vllm-lora-resolvers with its [signing] extra (pip install '.[signing]' in "
        "its source folder): the installed one does not declare it",
    ]


HINTS = "import sys; from vllm_lora_resolvers.config import install_hint as h; " + (
    "[print(h(extra)) for extra in sys.argv[1:]]"
)


@each_store
@pytest.mark.parametrize("command", ["ls", "validate"])
def test_the_commands_that_read_stores_name_every_stores_uris_in_their_help(
    store: StoreDeclaration, command: str
) -> None:
    shown = CliRunner().invoke(main, [command, "--help"], terminal_width=1000)
    assert shown.exit_code == 0
    assert "{stores}" not in shown.output
    if store.uri_form is not None:
        assert store.uri_form in shown.output
        assert is_remote(store.uri_form)


@each_store
def test_doctor_hides_a_stores_secrets_and_shows_its_other_variables(
    store: StoreDeclaration,
) -> None:
    assert store.secrets <= set(store.environment)
    others = [name for s in STORES if s is not store for name in s.environment]
    assert not set(store.environment) & set(others)
    for name in store.environment:
        shown = shown_value(name, {name: "s3cr3t"})
        assert shown == ("set" if name in store.secrets else "s3cr3t"), name


class DownStore(Store):
    """A store of any backend that never answers (``backend`` is set per test)."""

    repos = ("acme/adapters",)

    def locate(self, name: str) -> None:
        raise StoreUnavailableError(f"looking up {name!r} failed")

    def list_names(self, folder: str = "") -> Iterator[str]:
        raise StoreUnavailableError("listing failed")

    def download(self, adapter: Any, file: Any, destination: Path) -> dict[str, str]:
        raise AssertionError("never reached")


@each_store
def test_doctor_probes_a_store_and_suggests_its_fix(
    store: StoreDeclaration, cache_dir: Path, make_settings: Any
) -> None:
    settings: Settings = make_settings()
    down = type(f"Down{store.class_name}", (DownStore,), {"backend": store.backend})
    resolver = Resolver(down("somewhere", settings, NodeCache(cache_dir)))
    finding = probe_store(store.plugin, resolver, 5)
    assert finding.level is Level.FAIL
    assert finding.message.startswith(f"{store.plugin}: ") and "failed" in finding.message
    assert finding.fix == store.fix
    assert store.variable.name in store.fix


@each_store
def test_a_store_whose_client_is_missing_says_which_extra_installs_it(
    store: StoreDeclaration, make_settings: Any, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, store.module, None)  # import fails as without the client
    settings = make_settings(**{s.variable.name: s.example for s in STORES if s.scheme})
    if store.extra is None:
        with pytest.raises(ImportError):
            configured.build_resolver(store.plugin, settings)
        return
    with pytest.raises(ConfigurationError) as refused:
        configured.build_resolver(store.plugin, settings)
    assert str(refused.value).startswith(f"{store.variable.name} is set but ")
    missing = f"{store.client_package} is missing (import of {store.module} halted; None in "
    assert str(refused.value).endswith(f"{missing}sys.modules); {store.install_hint}")
    with pytest.raises(click.ClickException) as needed:
        open_store(f"{store.scheme}acme/adapters", settings, NodeCache(cache_dir))
    assert needed.value.message.startswith(f"reading {store.scheme} needs an extra (")
    assert needed.value.message.endswith(f"); {store.install_hint}")
