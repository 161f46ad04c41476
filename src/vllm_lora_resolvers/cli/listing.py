"""``vllm-lora ls URI``: the adapters in a store, and whether each config would be accepted.

A folder without an ``adapter_config.json`` that holds folders is a folder of adapters: the
adapters below it are listed, by the names clients ask for (``team-a/sql``), instead of it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import click
from rich.console import Console
from rich.text import Text

from vllm_lora_resolvers.adapter import CONFIG_FILE, WEIGHTS_FILES
from vllm_lora_resolvers.backends.published import VERSIONS_FOLDER
from vllm_lora_resolvers.cli.lint import LintPolicy, check_config
from vllm_lora_resolvers.cli.output import (
    Level,
    cannot_check,
    console,
    human_bytes,
    line,
    max_rank_option,
    plural,
    print_table,
    short_version,
    table,
)
from vllm_lora_resolvers.cli.stores import naming_stores, open_store, scratch_cache
from vllm_lora_resolvers.config import Settings
from vllm_lora_resolvers.errors import InvalidAdapterError, StoreUnavailableError
from vllm_lora_resolvers.remote import RemoteAdapter
from vllm_lora_resolvers.resolver import Resolver

A = TypeVar("A")
R = TypeVar("R")

#: Adapters looked up (and their configs fetched) at once.
_LOOKUPS_IN_FLIGHT = 8


@dataclass(frozen=True)
class ListedAdapter:
    """One row of ``ls``: a name, its version and size when found, and its problems if any."""

    name: str
    version: str = "-"
    size: int | None = None
    problems: tuple[str, ...] = ()


@naming_stores
@click.command("ls")
@click.argument("uri")
@click.option("--base-model", help="The server's --model; default: each adapter's own.")
@max_rank_option
def list_adapters(uri: str, base_model: str | None, max_rank: int | None) -> None:
    """The adapters in a store, with version, size, and whether each is valid and why not.

    URI is a store ({stores}) or a local directory.
    Adapters in folders of adapters are listed by the names clients ask for (team-a/sql).
    Only configs are checked (peft type, base model, rank, features, a weights file listed):
    weights are not downloaded; `vllm-lora validate URI/NAME` checks them too.
    """
    with cannot_check():
        settings = Settings.from_environ(argv=[])
        lint_policy = LintPolicy(
            base_model, max_rank or settings.max_rank, settings.base_model_aliases
        )
        with scratch_cache(uri) as (cache, scratch):
            resolver = open_store(uri, settings, cache)
            rows = _describe_store(resolver, lint_policy, scratch)
    _print_listing(console(), uri, lint_policy, rows)


def _describe_store(
    resolver: Resolver, lint_policy: LintPolicy, scratch: Path
) -> list[ListedAdapter]:
    """A row per adapter, by name; folders of adapters are looked into, a level at a time."""

    def describe(numbered: tuple[int, str]) -> ListedAdapter | list[str]:
        number, name = numbered
        return _describe(resolver, name, lint_policy, scratch / str(number))

    rows: list[ListedAdapter] = []
    names, described = sorted(resolver.store.list_names("")), 0
    while names:
        found = run_in_parallel(
            describe, list(enumerate(names, start=described)), _LOOKUPS_IN_FLIGHT
        )
        described += len(names)
        rows += [row for row in found if isinstance(row, ListedAdapter)]
        names = sorted(name for inside in found if isinstance(inside, list) for name in inside)
    return sorted(rows, key=lambda row: row.name)


def _describe(
    resolver: Resolver,
    name: str,
    lint_policy: LintPolicy,
    scratch: Path,
) -> ListedAdapter | list[str]:
    """The row of ``name``; for a folder of adapters (no config, folders in it), their names."""
    if name.rpartition("/")[2] == VERSIONS_FOLDER:
        unfinished = "versions of an unfinished `vllm-lora publish` (no pointer): publish again"
        return ListedAdapter(name, problems=(unfinished,))
    if not resolver.store.accepts_name(name):
        return ListedAdapter(name, problems=("not a name a client can ask for; rename it",))
    try:
        remote = resolver.lookup(name)
        if remote is None:
            inside = list(resolver.store.list_names(name))
            return inside or ListedAdapter(name, problems=(f"no {CONFIG_FILE}: not an adapter",))
        raw, size, file_names = _read_config(resolver, remote, scratch)
    except (InvalidAdapterError, StoreUnavailableError) as error:
        return ListedAdapter(name, problems=(str(error),))
    _, checks = check_config(name, raw, lint_policy)
    problems = [check.detail for check in checks if check.level is Level.FAIL]
    if not file_names & set(WEIGHTS_FILES):
        problems.append(f"no weights file; expected one of {', '.join(WEIGHTS_FILES)}")
    prefix = f"adapter {name!r}: "
    return ListedAdapter(
        name, remote.version, size, tuple(problem.removeprefix(prefix) for problem in problems)
    )


def _read_config(
    resolver: Resolver, remote: RemoteAdapter, scratch: Path
) -> tuple[bytes, int, frozenset[str]]:
    """The adapter's config, its size in bytes and its file names; only the config is fetched."""
    if remote.cached_snapshot is not None:  # a link into the node cache listed as a directory
        snapshot = resolver.cache.find(remote.cached_snapshot)
        if snapshot is None:
            raise StoreUnavailableError(f"{remote.name!r} was evicted while being listed")
        manifest = snapshot.manifest
        names = frozenset(file.path for file in manifest.files)
        return (snapshot.adapter_dir / CONFIG_FILE).read_bytes(), manifest.total_bytes, names
    config = remote.file(CONFIG_FILE)
    assert config is not None  # locate finds only folders with a config
    resolver.fetcher.fetch_to(remote, (config,), scratch)
    size = sum(file.size for file in remote.files)
    names = frozenset(file.path for file in remote.files)
    return (scratch / CONFIG_FILE).read_bytes(), size, names


def _print_listing(
    out: Console, uri: str, lint_policy: LintPolicy, rows: list[ListedAdapter]
) -> None:
    against = (
        f"base model {lint_policy.base_model!r}"
        if lint_policy.base_model
        else "each adapter's own base model (pass --base-model to check against your server's)"
    )
    out.print(line(f"Adapters in {uri}", style="bold"))
    out.print(
        f"configs checked against {against} and max rank {lint_policy.max_rank}; "
        "weights not downloaded (vllm-lora validate URI/NAME checks them)"
    )
    listing = table("NAME", "VERSION", "SIZE", "VALID", "WHY")
    for row in rows:
        size = "-" if row.size is None else human_bytes(row.size)
        valid = Text("no", style="red") if row.problems else Text("yes", style="green")
        listing.add_row(row.name, short_version(row.version), size, valid, "; ".join(row.problems))
    print_table(out, listing)
    valid_count = sum(not row.problems for row in rows)
    out.print(f"{plural(len(rows), 'folder')}, {valid_count} valid")


def run_in_parallel(function: Callable[[A], R], items: Sequence[A], workers: int) -> list[R]:
    """``[function(item) for item in items]`` on a thread pool; the first failure cancels what
    has not started and is raised once the running calls end."""
    if not items:
        return []
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        futures = [pool.submit(function, item) for item in items]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for future in pending:
            future.cancel()
        for future in done:
            error = future.exception()
            if error is not None:
                raise error
        return [future.result() for future in futures]
