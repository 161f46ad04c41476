"""``vllm-lora pull NAME...``: warm this node's cache, for a Kubernetes init container.

Names are resolved exactly as the server will: by the resolvers the environment configures, in
``VLLM_PLUGINS`` order, checked against ``--base-model``. The bars show the bytes of the snapshot
being fetched that have landed in the cache (`NodeCache.bytes_in_flight`), which also shows another
process's download when that process got there first.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text

from vllm_lora_resolvers.cache import NodeCache
from vllm_lora_resolvers.cli.output import (
    CannotCheckError,
    cannot_check,
    console,
    human_bytes,
    line,
    max_rank_option,
    short_version,
)
from vllm_lora_resolvers.config import Settings
from vllm_lora_resolvers.configured import configured_resolvers
from vllm_lora_resolvers.errors import ResolverError, StoreUnavailableError
from vllm_lora_resolvers.remote import RemoteAdapter
from vllm_lora_resolvers.resolver import Resolver
from vllm_lora_resolvers.stores import STORES

_POLL_SECONDS = 0.1


@dataclass(frozen=True)
class Pulled:
    """An adapter now in the node cache."""

    name: str
    plugin: str
    source: str
    version: str
    size: int
    fetched: bool
    path: Path
    seconds: float


class NotFoundError(ResolverError):
    """No configured resolver has the adapter."""


class Reporter(Protocol):
    """Where a pull reports to: bars on a terminal, plain lines otherwise."""

    def __enter__(self) -> Reporter:
        """Start reporting."""
        ...

    def __exit__(self, *_: object) -> None:
        """Stop reporting."""
        ...

    def downloading(
        self, name: str, source: str, total: int, cache: NodeCache, key: str
    ) -> AbstractContextManager[None]:
        """Around the download of ``total`` bytes of snapshot ``key`` of ``name``."""
        ...

    def done(self, pulled: Pulled) -> None:
        """``pulled`` is in the cache."""
        ...

    def failed(self, name: str, reason: str) -> None:
        """``name`` could not be pulled."""
        ...


@click.command()
@click.argument("names", nargs=-1, metavar="NAME...")
@click.option(
    "--from-file", type=click.File("r"), help="Read names from F, one a line ('-': stdin)."
)
@click.option("--base-model", required=True, help="The server's --model: adapters are checked.")
@max_rank_option
def pull(
    names: tuple[str, ...], from_file: IO[str] | None, base_model: str, max_rank: int | None
) -> None:
    """Fetch adapters into this node's cache with the resolvers the environment configures.

    Exit 0 when every adapter is cached, 1 when any failed (each listed with the reason).
    """
    wanted = list(dict.fromkeys([*names, *_names_in(from_file)]))
    if not wanted:
        raise click.UsageError("name at least one adapter, or pass --from-file")
    with cannot_check():
        settings = Settings.from_environ(argv=[])
        if max_rank is not None:
            settings = dataclasses.replace(settings, max_rank=max_rank)
        resolvers = configured_resolvers(settings)
    if not resolvers:
        *others, last = [store.variable.name for store in STORES]
        raise CannotCheckError(
            f"no resolver is configured: set {', '.join(others)} or {last} "
            "(and list its plugin in VLLM_PLUGINS, if set)"
        )
    out = console()
    reporter: Reporter = BarReporter(out) if out.is_terminal else LineReporter(out)
    failures = _pull_all(wanted, base_model, resolvers, reporter)
    pulled = len(wanted) - len(failures)
    out.print(f"{pulled} of {len(wanted)} adapters in the cache")
    if failures:
        errors = console(stderr=True)
        errors.print(Text(f"{len(failures)} failed:", style="bold red"))
        for name, reason in failures.items():
            errors.print(line(f"  {name}: {reason}"))
        sys.exit(1)


def _names_in(source: IO[str] | None) -> list[str]:
    """Names in a file, one a line; blank lines and ``#`` comments are skipped."""
    if source is None:
        return []
    lines = (line.split("#", 1)[0].strip() for line in source)
    return [line for line in lines if line]


def _pull_all(
    names: list[str],
    base_model: str,
    resolvers: list[tuple[str, Resolver]],
    reporter: Reporter,
) -> dict[str, str]:
    """Pull each name in turn; the reason of each failure, by name."""
    failures = {}
    with reporter:
        for name in names:
            try:
                pulled = _pull_one(name, base_model, resolvers, reporter)
            except ResolverError as error:
                failures[name] = str(error)
                reporter.failed(name, str(error))
            else:
                reporter.done(pulled)
    return failures


def _pull_one(
    name: str,
    base_model: str,
    resolvers: list[tuple[str, Resolver]],
    reporter: Reporter,
) -> Pulled:
    """The first resolver that has ``name`` fetches it; one that fails ends the search (as in
    the server, where an error from a resolver fails the request)."""
    tried = []
    for plugin, resolver in resolvers:
        if not resolver.store.accepts_name(name):
            continue
        tried.append(f"{plugin} ({resolver.source})")
        pulled = _pull_from(plugin, resolver, name, base_model, reporter)
        if pulled is not None:
            return pulled
    if not tried:
        raise NotFoundError("no configured resolver accepts this name")
    raise NotFoundError(f"not found in {', '.join(tried)}")


def _pull_from(
    plugin: str, resolver: Resolver, name: str, base_model: str, reporter: Reporter
) -> Pulled | None:
    started = time.perf_counter()
    try:
        remote = resolver.lookup(name)
    except StoreUnavailableError:
        remote = None  # the pipeline serves a cached copy, or explains
    else:
        if remote is None:
            return None
    download = None if remote is None else _pending_download(resolver, remote)
    if download is None:
        resolved = resolver.resolve(base_model, name)
    else:
        key, total = download
        with reporter.downloading(name, resolver.source, total, resolver.cache, key):
            resolved = resolver.resolve(base_model, name)
    if resolved is None:
        return None
    manifest = resolved.snapshot.manifest
    return Pulled(
        name=name,
        plugin=plugin,
        source=manifest.source,
        version=manifest.version,
        size=manifest.total_bytes,
        fetched=download is not None,
        path=resolved.path,
        seconds=time.perf_counter() - started,
    )


def _pending_download(resolver: Resolver, remote: RemoteAdapter) -> tuple[str, int] | None:
    """The snapshot key and bytes resolving ``remote`` will fetch; ``None`` if it is cached."""
    key = resolver.store.snapshot_key_of(remote)
    if resolver.cache.find(key) is not None:
        return None
    return key, sum(file.size for file in remote.files)


def _summary(pulled: Pulled) -> str:
    verb = "pulled" if pulled.fetched else "cached"
    return (
        f"{verb} {pulled.name} from {pulled.source} ({pulled.plugin}) version "
        f"{short_version(pulled.version)}, {human_bytes(pulled.size)} in {pulled.seconds:.2f} s "
        f"-> {pulled.path}"
    )


class LineReporter:
    """Plain lines, for logs (not a terminal)."""

    def __init__(self, out: Console) -> None:
        self.out = out

    def __enter__(self) -> LineReporter:
        return self

    def __exit__(self, *_: object) -> None:
        return None

    @contextmanager
    def downloading(
        self, name: str, source: str, total: int, cache: NodeCache, key: str
    ) -> Iterator[None]:
        """One line as the download starts."""
        self.out.print(line(f"fetching {name} from {source} ({human_bytes(total)})"))
        yield

    def done(self, pulled: Pulled) -> None:
        """One line per adapter in the cache."""
        self.out.print(line(_summary(pulled)))

    def failed(self, name: str, reason: str) -> None:
        """One line per failure."""
        self.out.print(line(f"FAILED {name}: {reason}"))


class BarReporter:
    """A progress bar per download (bytes, rate, time left) on a terminal."""

    def __init__(self, out: Console) -> None:
        self.out = out
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=out,
        )

    def __enter__(self) -> BarReporter:
        self.progress.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.progress.stop()

    @contextmanager
    def downloading(
        self, name: str, source: str, total: int, cache: NodeCache, key: str
    ) -> Iterator[None]:
        """A bar fed by a thread that watches the staging folder until the download ends."""
        task = self.progress.add_task(name, total=total)
        finished = threading.Event()
        watcher = threading.Thread(
            target=self._watch, args=(task, cache, key, finished), daemon=True
        )
        watcher.start()
        try:
            yield
        finally:
            finished.set()
            watcher.join()
        self.progress.update(task, completed=total)

    def _watch(self, task: TaskID, cache: NodeCache, key: str, finished: threading.Event) -> None:
        while not finished.wait(_POLL_SECONDS):
            self.progress.update(task, completed=cache.bytes_in_flight(key))

    def done(self, pulled: Pulled) -> None:
        """A line above the bars."""
        self.progress.console.print(line(_summary(pulled), style="green"))

    def failed(self, name: str, reason: str) -> None:
        """A line above the bars."""
        self.progress.console.print(line(f"FAILED {name}: {reason}", style="bold red"))
