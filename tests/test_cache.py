"""The node cache's promises under crashes, caps, full disks and races with eviction."""

from __future__ import annotations

import ast
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
from conftest import BASE_MODEL, snapshot_dirs, staging_entries, start_worker, worker_result
from prometheus_client import REGISTRY

from devtools.models import write_large_adapter, write_lora_adapter
from vllm_lora_resolvers import cache as cache_package
from vllm_lora_resolvers import metrics
from vllm_lora_resolvers.adapter import CONFIG_FILE
from vllm_lora_resolvers.backends.filesystem import FilesystemStore
from vllm_lora_resolvers.cache import EVICTIONS, NodeCache
from vllm_lora_resolvers.config import Settings
from vllm_lora_resolvers.errors import CacheError, CacheFullError
from vllm_lora_resolvers.remote import RemoteAdapter, RemoteFile
from vllm_lora_resolvers.resolver import Resolver

# Resolves "sql" and dies (SIGKILL) at exactly the moment a name link is being swapped in: the
# temporary link exists, the rename over CACHE_DIR/NAME has not happened.
_DIE_WHILE_SWAPPING_THE_NAME_LINK = """
import os, signal, sys
from pathlib import Path
from vllm_lora_resolvers.backends.filesystem import FilesystemStore
from vllm_lora_resolvers import metrics
from vllm_lora_resolvers.cache import EVICTIONS, NodeCache
from vllm_lora_resolvers.config import Settings
from vllm_lora_resolvers.resolver import Resolver

swap = Path.replace
def die_before_the_swap(self, target):
    if self.name.startswith("link."):
        os.kill(os.getpid(), signal.SIGKILL)
    return swap(self, target)
Path.replace = die_before_the_swap

adapters, cache = Path(sys.argv[1]), Path(sys.argv[2])
settings = Settings.from_environ({"VLLM_LORA_RESOLVER_CACHE_DIR": str(cache)}, argv=[])
Resolver(FilesystemStore(adapters, settings, NodeCache(cache))).resolve("/models/tiny-llama", "sql")
"""


def test_a_process_killed_while_swapping_a_name_link_leaves_no_debris_after_restart(
    adapters_dir: Path, cache_dir: Path
) -> None:
    write_lora_adapter(adapters_dir / "sql", base_model=BASE_MODEL)
    died = subprocess.run(
        [
            sys.executable,
            "-c",
            _DIE_WHILE_SWAPPING_THE_NAME_LINK,
            str(adapters_dir),
            str(cache_dir),
        ],
        check=False,
    )
    assert died.returncode == -signal.SIGKILL
    assert not os.path.lexists(cache_dir / "sql")  # killed before the swap
    assert staging_entries(cache_dir) != []  # the temporary link it left

    NodeCache(cache_dir)  # any process opening the cache, at any time after the death
    assert staging_entries(cache_dir) == []
    assert len(snapshot_dirs(cache_dir)) == 1  # the published snapshot is kept


def test_a_live_process_keeps_its_scratch_space_while_others_open_the_cache(
    adapters_dir: Path, cache_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    write_lora_adapter(adapters_dir / "sql", base_model=BASE_MODEL, seed=1)
    holder = start_worker(str(adapters_dir), str(cache_dir), "sql", hold=True)
    worker_result(holder)
    scratch = sorted((cache_dir / ".vllm-lora" / "staging").iterdir())
    assert len(scratch) == 1  # the live holder's, locked by it
    assert staging_entries(cache_dir) == []  # so not debris

    NodeCache(cache_dir)
    assert sorted((cache_dir / ".vllm-lora" / "staging").iterdir()) == scratch

    holder.kill()
    holder.wait()
    NodeCache(cache_dir)
    assert staging_entries(cache_dir) == []


def _adapter_bytes(folder: Path) -> int:
    return sum(file.stat().st_size for file in folder.iterdir())


def _cached_bytes(cache_dir: Path) -> int:
    return sum(
        file.stat().st_size
        for snapshot in snapshot_dirs(cache_dir)
        for file in (snapshot / "adapter").iterdir()
    )


def _resolve_in_processes_that_exit(
    adapters_dir: Path, cache_dir: Path, *names: str, max_rank: int = 16
) -> None:
    for name in names:
        worker = start_worker(str(adapters_dir), str(cache_dir), name, "--max-rank", str(max_rank))
        worker_result(worker)
        assert worker.wait(timeout=60) == 0


def test_opening_the_cache_evicts_down_to_the_cap_what_no_live_process_leases(
    adapters_dir: Path, cache_dir: Path
) -> None:
    for seed, name in enumerate(("a", "b", "c")):
        write_lora_adapter(adapters_dir / name, base_model=BASE_MODEL, seed=seed)
    _resolve_in_processes_that_exit(adapters_dir, cache_dir, "a", "b", "c")
    one = _adapter_bytes(adapters_dir / "a")
    assert _cached_bytes(cache_dir) == 3 * one

    NodeCache(cache_dir, max_bytes=one)
    assert _cached_bytes(cache_dir) == one
    assert os.path.lexists(cache_dir / "c")  # the most recently used one stays
    assert not os.path.lexists(cache_dir / "a")


def test_the_cache_metrics_count_what_any_process_fetched_or_evicted(
    adapters_dir: Path, cache_dir: Path
) -> None:
    def scraped(sample: str) -> float | None:
        return REGISTRY.get_sample_value(sample)

    server_cache = NodeCache(cache_dir)  # a server's: it fetches nothing itself here
    metrics.report_node_cache(server_cache.usage)
    evictions = scraped("vllm_lora_resolver_evictions_total") or 0.0
    for seed, name in enumerate(("a", "b", "c")):
        write_lora_adapter(adapters_dir / name, base_model=BASE_MODEL, seed=seed)
    _resolve_in_processes_that_exit(adapters_dir, cache_dir, "a", "b", "c")  # other pods
    one = _adapter_bytes(adapters_dir / "a")
    assert scraped("vllm_lora_resolver_cache_snapshots") == 3
    assert scraped("vllm_lora_resolver_cache_bytes") == 3 * one

    NodeCache(cache_dir, max_bytes=one)  # a process starting with a cap evicts at once
    assert scraped("vllm_lora_resolver_evictions_total") == evictions + 2
    NodeCache(cache_dir).prune(0)  # `vllm-lora cache prune --max-bytes 0`
    assert scraped("vllm_lora_resolver_evictions_total") == evictions + 3
    assert scraped("vllm_lora_resolver_cache_snapshots") == 0
    assert scraped("vllm_lora_resolver_cache_bytes") == 0


def test_a_damaged_eviction_count_reads_as_zero_and_is_rewritten(
    adapters_dir: Path, cache_dir: Path
) -> None:
    cache = NodeCache(cache_dir)
    for damaged in (b"nan", b"-3", b"1e300", b"", b"9" * 40, b"\xff"):
        (cache.layout.state / EVICTIONS).write_bytes(damaged)
        assert cache.evictions() == 0
    write_lora_adapter(adapters_dir / "a", base_model=BASE_MODEL)
    _resolve_in_processes_that_exit(adapters_dir, cache_dir, "a")
    assert len(cache.prune(0)) == 1
    assert cache.evictions() == 1


def test_a_cache_without_a_cap_makes_room_for_a_fetch_without_the_eviction_lock(
    cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With no cap and room on the disk there is nothing to evict: no lock is taken (a lock that
    cannot be taken would be logged), so a small adapter's fetch pays for no lock file."""
    cache, capped = NodeCache(cache_dir), NodeCache(cache_dir, max_bytes=1 << 30)
    shutil.rmtree(cache.layout.locks)
    cache.layout.locks.write_text("a file, where the eviction lock would go\n")
    with caplog.at_level(logging.WARNING, logger="vllm.lora_resolvers.cache"):
        assert cache.evict(incoming_bytes=1 << 20) == []
        assert cache.evict() == []
    assert "cannot evict" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="vllm.lora_resolvers.cache"):
        assert capped.evict(incoming_bytes=1 << 20) == []
    assert "cannot evict" in caplog.text  # with a cap, the lock is taken (and here it cannot be)


class CacheWatchingStore(FilesystemStore):
    """Records the bytes of complete snapshots when each weights file starts downloading."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.cached_at_weights_download: list[int] = []

    def download(
        self, adapter: RemoteAdapter, file: RemoteFile, destination: Path
    ) -> Mapping[str, str]:
        if file.path != CONFIG_FILE:
            self.cached_at_weights_download.append(_cached_bytes(self.cache.root))
        return super().download(adapter, file, destination)


def test_room_is_made_under_the_cap_before_the_weights_are_downloaded(
    adapters_dir: Path, cache_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    for seed, name in enumerate(("a", "b", "new")):
        write_lora_adapter(adapters_dir / name, base_model=BASE_MODEL, seed=seed)
    _resolve_in_processes_that_exit(adapters_dir, cache_dir, "a", "b")
    one = _adapter_bytes(adapters_dir / "a")
    cap = 2 * one
    settings = make_settings(VLLM_LORA_RESOLVER_CACHE_MAX_BYTES=str(cap))
    store = CacheWatchingStore(adapters_dir, settings, NodeCache(cache_dir, cap))
    assert _cached_bytes(cache_dir) == cap  # at the cap, not above: opening evicted nothing

    assert Resolver(store).resolve(BASE_MODEL, "new") is not None
    [cached_then] = store.cached_at_weights_download
    assert cached_then + one <= cap
    assert _cached_bytes(cache_dir) <= cap


#: The rank `write_large_adapter` gives a 1 MiB adapter is above the default limit of 16.
LARGE_RANK = 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs (the tests run as root, as CI does)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "--lazy", str(mount_point)], check=True)


class DiskFillingStore(FilesystemStore):
    """Another tenant of the disk writes ``filler_bytes`` just as our first weights download
    starts, so the download runs out of space half way."""

    filler_bytes = 0

    def download(
        self, adapter: RemoteAdapter, file: RemoteFile, destination: Path
    ) -> Mapping[str, str]:
        filler = self.cache.root.parent / "filler"
        if file.path != CONFIG_FILE and not filler.exists():
            filler.write_bytes(b"\0" * self.filler_bytes)
        return super().download(adapter, file, destination)


def test_a_full_disk_evicts_unleased_snapshots_and_the_fetch_is_tried_again(
    small_disk: Path, adapters_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    cache_dir = small_disk / "cache"
    cache_dir.mkdir()
    for seed, name in enumerate(("a", "b", "new")):
        write_large_adapter(
            adapters_dir / name, base_model=BASE_MODEL, size_bytes=1 << 20, seed=seed
        )
    _resolve_in_processes_that_exit(adapters_dir, cache_dir, "a", "b", max_rank=LARGE_RANK)
    settings = make_settings(
        VLLM_LORA_RESOLVER_CACHE_DIR=str(cache_dir), VLLM_LORA_RESOLVER_MAX_RANK=str(LARGE_RANK)
    )
    store = DiskFillingStore(adapters_dir, settings, NodeCache(cache_dir))
    store.filler_bytes = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    store.filler_bytes -= 512 << 10  # leaves half a weights file's room: ENOSPC half way
    resolver = Resolver(store)

    resolved = resolver.resolve(BASE_MODEL, "new")
    assert resolved is not None
    assert _adapter_bytes(resolved.path) == _adapter_bytes(adapters_dir / "new")
    assert len(snapshot_dirs(cache_dir)) == 1  # a and b were evicted to make room
    assert staging_entries(cache_dir) == []


def test_a_disk_full_of_leased_snapshots_is_explained_and_leaves_nothing_behind(
    small_disk: Path,
    adapters_dir: Path,
    make_settings: Callable[..., Settings],
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache_dir = small_disk / "cache"
    cache_dir.mkdir()
    for seed, name in enumerate(("held", "new")):
        write_large_adapter(
            adapters_dir / name, base_model=BASE_MODEL, size_bytes=1 << 20, seed=seed
        )
    holder = start_worker(
        str(adapters_dir), str(cache_dir), "held", "--max-rank", str(LARGE_RANK), hold=True
    )
    worker_result(holder)
    try:
        settings = make_settings(
            VLLM_LORA_RESOLVER_CACHE_DIR=str(cache_dir),
            VLLM_LORA_RESOLVER_MAX_RANK=str(LARGE_RANK),
        )
        store = DiskFillingStore(adapters_dir, settings, NodeCache(cache_dir))
        store.filler_bytes = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
        store.filler_bytes -= 512 << 10
        resolver = Resolver(store)
        with (
            caplog.at_level(logging.WARNING, "vllm.lora_resolvers"),
            pytest.raises(CacheFullError, match="the disk is full"),
        ):
            resolver.resolve(BASE_MODEL, "new")
        assert len(snapshot_dirs(cache_dir)) == 1  # the leased one, untouched
        assert staging_entries(cache_dir) == []
    finally:
        holder.kill()
        holder.wait()


class EvictedAfterLookupStore(FilesystemStore):
    """Evicts every unleased snapshot right after each of its first ``races`` lookups, as
    another process's eviction might."""

    races = 1

    def locate(self, name: str) -> RemoteAdapter | None:
        found = super().locate(name)
        if self.races > 0:
            self.races -= 1
            self.cache.prune(0)
        return found


def test_a_cached_snapshot_evicted_between_lookup_and_lease_is_never_refused(
    adapters_dir: Path, cache_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    write_lora_adapter(adapters_dir / "sql", base_model=BASE_MODEL)
    _resolve_in_processes_that_exit(adapters_dir, cache_dir, "sql")  # CACHE_DIR/sql -> snapshot
    settings = make_settings(VLLM_LORA_RESOLVER_NEGATIVE_TTL="0")
    cache = NodeCache(cache_dir)
    Resolver(FilesystemStore(adapters_dir, settings, cache))  # this process serves that store too
    # The default layout: the filesystem resolver reads the cache dir, links included.
    resolver = Resolver(EvictedAfterLookupStore(cache_dir, settings, cache))

    assert resolver.resolve(BASE_MODEL, "sql") is None  # evicted, so no longer here

    _resolve_in_processes_that_exit(adapters_dir, cache_dir, "sql")  # the same version again
    resolved = resolver.resolve(BASE_MODEL, "sql")
    assert resolved is not None  # not refused for the race
    assert (resolved.path / CONFIG_FILE).is_file()


class ReuploadedDuringFetchStore(FilesystemStore):
    """The adapter is rewritten in the store between its lookup and its weights download."""

    rewrite: Callable[[], None] | None = None

    def download(
        self, adapter: RemoteAdapter, file: RemoteFile, destination: Path
    ) -> Mapping[str, str]:
        if file.path != CONFIG_FILE and self.rewrite is not None:
            rewrite, self.rewrite = self.rewrite, None
            rewrite()
        return super().download(adapter, file, destination)


def test_an_adapter_rewritten_while_being_fetched_is_served_at_its_new_version(
    adapters_dir: Path, cache_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    write_lora_adapter(adapters_dir / "sql", base_model=BASE_MODEL, seed=1)
    new = write_lora_adapter(adapters_dir.parent / "v2", base_model=BASE_MODEL, seed=2)
    store = ReuploadedDuringFetchStore(adapters_dir, make_settings(), NodeCache(cache_dir))

    def rewrite() -> None:
        weights = adapters_dir / "sql" / "adapter_model.safetensors"
        weights.write_bytes((new / "adapter_model.safetensors").read_bytes())

    store.rewrite = rewrite
    resolved = Resolver(store).resolve(BASE_MODEL, "sql")
    assert resolved is not None
    served = (resolved.path / "adapter_model.safetensors").read_bytes()
    assert served == (new / "adapter_model.safetensors").read_bytes()
    current = store.locate("sql")
    assert current is not None
    assert resolved.snapshot.manifest.version == current.version


def test_a_damaged_manifest_is_quarantined_and_everything_else_goes_on(
    adapters_dir: Path, cache_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    for seed, name in enumerate(("a", "b", "c")):
        write_lora_adapter(adapters_dir / name, base_model=BASE_MODEL, seed=seed)
    _resolve_in_processes_that_exit(adapters_dir, cache_dir, "a", "b")
    damaged = (cache_dir / "a").resolve().parent
    (damaged / "manifest.json").write_text('{"source": 1')
    one = _adapter_bytes(adapters_dir / "a")

    cache = NodeCache(cache_dir, max_bytes=2 * one)  # opening it evicts: must not stop there
    resolver = Resolver(FilesystemStore(adapters_dir, make_settings(), cache))
    assert resolver.resolve(BASE_MODEL, "c") is not None  # other adapters' first fetch
    assert cache.quarantined() and cache.quarantined()[0].startswith(damaged.name)
    assert not damaged.exists()
    again = resolver.resolve(BASE_MODEL, "a")  # the damaged one is fetched afresh
    assert again is not None and (again.path / CONFIG_FILE).is_file()
    assert cache.verify() == []

    environment = {**os.environ, "VLLM_LORA_RESOLVER_CACHE_DIR": str(cache_dir)}
    for command in (["cache", "ls"], ["cache", "verify"], ["cache", "prune", "--max-bytes", "0"]):
        completed = subprocess.run(
            [str(Path(sys.executable).parent / "vllm-lora"), *command],
            env=environment,
            capture_output=True,
            text=True,
            check=False,
        )
        assert completed.returncode == 0, completed.stderr
        assert "Traceback" not in completed.stderr
    assert NodeCache(cache_dir).quarantined() == []  # prune deleted it


def test_a_cache_remounted_read_only_serves_what_it_holds_and_explains_the_rest(
    small_disk: Path, adapters_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    cache_dir = small_disk / "cache"
    cache_dir.mkdir()
    for seed, name in enumerate(("cached", "new")):
        write_lora_adapter(adapters_dir / name, base_model=BASE_MODEL, seed=seed)
    _resolve_in_processes_that_exit(adapters_dir, cache_dir, "cached")
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)

    settings = make_settings(VLLM_LORA_RESOLVER_CACHE_DIR=str(cache_dir))
    resolver = Resolver(FilesystemStore(adapters_dir, settings, NodeCache(cache_dir)))
    served = resolver.resolve(BASE_MODEL, "cached")
    assert served is not None and (served.path / CONFIG_FILE).is_file()
    with pytest.raises(CacheError) as refused:
        resolver.resolve(BASE_MODEL, "new")
    assert "not writable" in str(refused.value)
    assert str(small_disk) not in str(refused.value)  # no server paths for clients


def test_a_cache_folder_removed_under_a_running_server_is_recreated(
    adapters_dir: Path, cache_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    for seed, name in enumerate(("a", "b")):
        write_lora_adapter(adapters_dir / name, base_model=BASE_MODEL, seed=seed)
    resolver = Resolver(FilesystemStore(adapters_dir, make_settings(), NodeCache(cache_dir)))
    assert resolver.resolve(BASE_MODEL, "a") is not None
    for entry in cache_dir.iterdir():
        if entry.is_symlink():
            entry.unlink()
        else:
            subprocess.run(["rm", "-rf", str(entry)], check=True)

    again = resolver.resolve(BASE_MODEL, "a")
    assert again is not None and (again.path / CONFIG_FILE).is_file()
    other = resolver.resolve(BASE_MODEL, "b")
    assert other is not None and (other.path / CONFIG_FILE).is_file()


def test_lock_files_do_not_pile_up(
    adapters_dir: Path, cache_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    for seed in range(5):
        write_lora_adapter(adapters_dir / f"a{seed}", base_model=BASE_MODEL, seed=seed)
    _resolve_in_processes_that_exit(adapters_dir, cache_dir, "a0", "a1")
    resolver = Resolver(FilesystemStore(adapters_dir, make_settings(), NodeCache(cache_dir)))
    for seed in range(2, 5):
        assert resolver.resolve(BASE_MODEL, f"a{seed}") is not None
    locks = cache_dir / ".vllm-lora" / "locks"
    assert sorted(path.name for path in locks.iterdir() if path.name != "evict.lock") == []


def test_bytes_in_flight_count_what_a_fetch_in_progress_wrote(cache_dir: Path) -> None:
    cache = NodeCache(cache_dir)
    key = "ab" * 20
    assert cache.bytes_in_flight(key) == 0
    with cache.fetch_lock(key):
        staging = cache.new_staging(key)
        (staging / "adapter" / "adapter_config.json").write_bytes(b"x" * 100)
        (staging / "adapter" / "adapter_model.safetensors").write_bytes(b"y" * 5000)
        assert cache.bytes_in_flight(key) == 5100
        assert cache.bytes_in_flight("cd" * 20) == 0
        cache.discard_staging(staging)
    assert cache.bytes_in_flight(key) == 0


def test_a_string_that_is_not_a_snapshot_key_leases_and_finds_nothing(cache_dir: Path) -> None:
    cache = NodeCache(cache_dir)
    outside = cache_dir / "outside"
    (outside / "adapter").mkdir(parents=True)
    (outside / "lease").touch()
    (outside / "manifest.json").write_text("{}")
    for hostile in ("../../outside", "../outside", "", "/etc", "A" * 40, "0" * 39):
        assert cache.lease(hostile) is None
        assert cache.find(hostile) is None
    assert cache.leased_keys() == set()
    assert (outside / "manifest.json").exists()  # never taken for a damaged snapshot and moved


def test_each_part_of_the_cache_keeps_its_private_names_to_itself() -> None:
    """No module of the cache package imports another's private names or reaches into another
    object's private attributes: `NodeCache` is a facade over parts that share only their public
    methods."""
    package = Path(cache_package.__file__).parent
    modules = sorted(package.glob("*.py"))
    assert len(modules) >= 8
    for module in modules:
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.ImportFrom):
                private = [alias.name for alias in node.names if alias.name.startswith("_")]
                assert not private, f"{module.name} imports {private}"
            dunder = node.attr.endswith("__") if isinstance(node, ast.Attribute) else False
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not dunder:
                owner = node.value
                assert isinstance(owner, ast.Name) and owner.id in ("self", "cls"), (
                    f"{module.name}:{node.lineno} reaches {ast.unparse(node)}"
                )
