"""``vllm-lora cache ls|prune|verify``: what this node's adapter cache holds, and its upkeep."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from vllm_lora_resolvers.cache import LEASE, STATE_DIR, NodeCache, Snapshot
from vllm_lora_resolvers.cli.output import (
    CannotCheckError,
    Finding,
    Level,
    cannot_check,
    console,
    human_bytes,
    line,
    local_time,
    plural,
    print_finding,
    print_table,
    short_version,
    table,
)
from vllm_lora_resolvers.cli.system import PROC_LOCKS, FileId, flock_holders, holders_of, read_proc
from vllm_lora_resolvers.config import (
    CACHE_DIR,
    CACHE_MAX_BYTES,
    ConfigurationError,
    Settings,
    parse_byte_size,
)


def _byte_size(_: click.Context, __: click.Parameter, value: str | None) -> int | None:
    """``--max-bytes``: ``500MB``, ``20GiB`` or a byte count."""
    try:
        return None if value is None else parse_byte_size(value, "--max-bytes")
    except ConfigurationError as error:
        raise click.BadParameter(str(error)) from None


@click.group("cache")
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help=f"The cache root; default: {CACHE_DIR.name}.",
)
@click.pass_context
def cache_group(ctx: click.Context, cache_dir: Path | None) -> None:
    """Inspect and maintain this node's adapter cache."""
    ctx.obj = cache_dir  # None: the configured one


def _open(cache_dir: Path | None) -> tuple[NodeCache | None, Settings]:
    """The cache (``None`` if nothing was ever cached there) and the configuration."""
    with cannot_check():
        settings = Settings.from_environ(argv=[])
        root = cache_dir or settings.cache_dir
        if root is None:
            raise CannotCheckError(f"no cache: pass --cache-dir or set {CACHE_DIR.name}")
        if not (root / STATE_DIR).is_dir():
            return None, settings
        return NodeCache(root, settings.cache_max_bytes), settings


@cache_group.command("ls")
@click.pass_obj
def cache_ls(cache_dir: Path | None) -> None:
    """Every snapshot: name, version, source, size, last use, and the PIDs leasing it."""
    cache, settings = _open(cache_dir)
    out = console()
    snapshots = [] if cache is None else cache.all_snapshots()
    if cache is None or not snapshots:
        out.print("the cache is empty")
        return
    holders = flock_holders(read_proc(PROC_LOCKS))
    listing = table("NAME", "VERSION", "SOURCE", "SIZE", "LAST USED", "LEASED BY")
    for snapshot in sorted(snapshots, key=cache.last_used, reverse=True):
        manifest = snapshot.manifest
        listing.add_row(
            manifest.name,
            short_version(manifest.version),
            manifest.source,
            human_bytes(manifest.total_bytes),
            local_time(cache.last_used(snapshot)),
            _leased_by(cache, snapshot, holders),
        )
    print_table(out, listing)
    total = sum(snapshot.manifest.total_bytes for snapshot in snapshots)
    cap = settings.cache_max_bytes
    limit = f"cap {human_bytes(cap)}" if cap is not None else "no cap"
    out.print(
        f"{plural(len(snapshots), 'snapshot')}, {human_bytes(total)} in {cache.root} ({limit})"
    )


def _leased_by(cache: NodeCache, snapshot: Snapshot, holders: dict[FileId, list[int]]) -> str:
    """``PID 12, 34``; a lease whose holder this PID namespace cannot see; or ``-``."""
    visible = sorted({pid for pid in holders_of(snapshot.path / LEASE, holders) if pid > 0})
    if visible:
        return "PID " + ", ".join(str(pid) for pid in visible)
    if cache.is_leased_by_anyone(snapshot.key):
        return "a process in another PID namespace"
    return "-"


@cache_group.command()
@click.option(
    "--max-bytes", metavar="SIZE", callback=_byte_size, help=f"Default: {CACHE_MAX_BYTES.name}."
)
@click.pass_obj
def prune(cache_dir: Path | None, max_bytes: int | None) -> None:
    """Evict least-recently-used snapshots until the cache fits SIZE.

    A snapshot that any live process leases is never evicted, so the cache may stay above SIZE.
    """
    cache, settings = _open(cache_dir)
    cap = max_bytes if max_bytes is not None else settings.cache_max_bytes
    if cap is None:
        raise click.UsageError(f"no cap: pass --max-bytes SIZE or set {CACHE_MAX_BYTES.name}")
    out = console()
    if cache is None:
        out.print("the cache is empty")
        return
    with cannot_check():
        evicted = cache.prune(cap)
    for snapshot in evicted:
        manifest = snapshot.manifest
        out.print(
            line(
                f"evicted {manifest.name} version {short_version(manifest.version)} "
                f"from {manifest.source} ({human_bytes(manifest.total_bytes)})"
            )
        )
    kept = cache.all_snapshots()
    total = sum(snapshot.manifest.total_bytes for snapshot in kept)
    out.print(
        f"{plural(len(kept), 'snapshot')}, {human_bytes(total)} kept (cap {human_bytes(cap)})"
    )
    if total > cap:
        in_use = ", ".join(sorted({snapshot.manifest.name for snapshot in kept}))
        out.print(
            line(f"above the cap: every snapshot left is leased by a live process ({in_use})")
        )


@cache_group.command()
@click.pass_obj
def verify(cache_dir: Path | None) -> None:
    """Re-read every snapshot and check each file's size and CRC32C against its manifest.

    Exit 1 when any file is damaged, naming the snapshot and the file.
    """
    cache, _ = _open(cache_dir)
    out = console()
    if cache is None:
        out.print("the cache is empty")
        return
    problems = cache.verify()
    snapshots = cache.all_snapshots()
    files = sum(len(snapshot.manifest.files) for snapshot in snapshots)
    if not problems:
        intact = f"{plural(len(snapshots), 'snapshot')}, {plural(files, 'file')} intact"
        print_finding(out, Finding(Level.OK, intact))
        return
    fix = (
        "a damaged snapshot is served as it is: evict it (vllm-lora cache prune --max-bytes 0 "
        "evicts every snapshot not in use) so that the next request fetches it again"
    )
    for problem in problems:
        print_finding(out, Finding(Level.FAIL, problem))
    print_finding(out, Finding(Level.FAIL, f"{plural(len(problems), 'damaged file')}", fix))
    sys.exit(1)
