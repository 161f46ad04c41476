"""The filesystem resolver, and through it the shared pipeline every backend runs."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import BASE_MODEL, snapshot_dirs, staging_entries, start_worker, worker_result

from devtools.models import write_lora_adapter
from vllm_lora_resolvers import metrics
from vllm_lora_resolvers.backends.filesystem import LOCAL_TRANSFER, FilesystemResolver
from vllm_lora_resolvers.cache import NodeCache
from vllm_lora_resolvers.config import Settings
from vllm_lora_resolvers.errors import (
    IntegrityError,
    InvalidAdapterError,
    StoreUnavailableError,
    TransientStoreError,
)
from vllm_lora_resolvers.remote import RemoteAdapter, RemoteFile
from vllm_lora_resolvers.retry import RetryPolicy
from vllm_lora_resolvers.transfer import TransferConfig


def test_resolves_an_adapter_into_an_immutable_snapshot(
    fs_resolver: FilesystemResolver, adapters_dir: Path, cache_dir: Path
) -> None:
    source = write_lora_adapter(adapters_dir / "sql", base_model=BASE_MODEL)
    resolved = fs_resolver.resolve(BASE_MODEL, "sql")
    assert resolved is not None
    assert resolved.path.is_absolute()
    assert resolved.path.is_relative_to(cache_dir)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (resolved.path / name).read_bytes() == (source / name).read_bytes()
        assert not os.access(resolved.path / name, os.W_OK) or os.geteuid() == 0
        assert (resolved.path / name).stat().st_mode & 0o222 == 0


def test_editing_or_deleting_the_source_does_not_change_a_served_snapshot(
    fs_resolver: FilesystemResolver, adapters_dir: Path
) -> None:
    source = write_lora_adapter(adapters_dir / "sql", base_model=BASE_MODEL, seed=1)
    first = fs_resolver.resolve(BASE_MODEL, "sql")
    assert first is not None
    served = (first.path / "adapter_model.safetensors").read_bytes()

    write_lora_adapter(source, base_model=BASE_MODEL, seed=2)
    second = fs_resolver.resolve(BASE_MODEL, "sql")
    assert second is not None
    assert second.path != first.path
    assert (first.path / "adapter_model.safetensors").read_bytes() == served
    assert (second.path / "adapter_model.safetensors").read_bytes() != served

    shutil.rmtree(source)
    assert fs_resolver.resolve(BASE_MODEL, "sql") is None
    assert (first.path / "adapter_model.safetensors").read_bytes() == served


def test_second_resolve_is_a_cache_hit_with_the_same_answer(
    fs_resolver: FilesystemResolver, adapters_dir: Path, cache_dir: Path
) -> None:
    write_lora_adapter(adapters_dir / "sql", base_model=BASE_MODEL)
    first = fs_resolver.resolve(BASE_MODEL, "sql")
    hits_before = metrics.RESOLUTIONS.labels("fs", "hit")._value.get()
    second = fs_resolver.resolve(BASE_MODEL, "sql")
    assert first == second
    assert metrics.RESOLUTIONS.labels("fs", "hit")._value.get() == hits_before + 1
    assert len(snapshot_dirs(cache_dir)) == 1


def test_lora_int_id_is_stable_positive_and_per_version(
    fs_resolver: FilesystemResolver, adapters_dir: Path, cache_dir: Path
) -> None:
    source = write_lora_adapter(adapters_dir / "sql", base_model=BASE_MODEL, seed=1)
    first = fs_resolver.resolve(BASE_MODEL, "sql")
    other_process = worker_result(start_worker(str(adapters_dir), str(cache_dir), "sql"))
    assert first is not None
    assert 1 <= first.lora_int_id < 2**31
    assert other_process["lora_int_id"] == first.lora_int_id
    write_lora_adapter(source, base_model=BASE_MODEL, seed=2)
    second = fs_resolver.resolve(BASE_MODEL, "sql")
    assert second is not None
    assert second.lora_int_id != first.lora_int_id


def test_name_link_in_cache_root_points_at_current_snapshot(
    fs_resolver: FilesystemResolver, adapters_dir: Path, cache_dir: Path
) -> None:
    write_lora_adapter(adapters_dir / "team" / "sql", base_model=BASE_MODEL)
    resolved = fs_resolver.resolve(BASE_MODEL, "team/sql")
    assert resolved is not None
    link = cache_dir / "team" / "sql"
    assert link.is_symlink()
    assert not Path(os.readlink(link)).is_absolute()  # survives mounting the cache elsewhere
    assert link.resolve() == resolved.path.resolve()
    assert json.loads((link / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_a_real_folder_in_the_cache_root_is_never_replaced(
    adapters_dir: Path, cache_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    own = write_lora_adapter(cache_dir / "sql", base_model=BASE_MODEL, seed=3)
    before = (own / "adapter_model.safetensors").read_bytes()
    write_lora_adapter(adapters_dir / "sql", base_model=BASE_MODEL, seed=4)
    resolver = FilesystemResolver(adapters_dir, make_settings(), NodeCache(cache_dir))
    assert resolver.resolve(BASE_MODEL, "sql") is not None
    assert not (cache_dir / "sql").is_symlink()
    assert (own / "adapter_model.safetensors").read_bytes() == before


def test_serves_links_made_by_other_resolvers_without_copying(
    cache_dir: Path, adapters_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    write_lora_adapter(adapters_dir / "sql", base_model=BASE_MODEL)
    cache = NodeCache(cache_dir)
    upstream = FilesystemResolver(adapters_dir, make_settings(), cache)
    first = upstream.resolve(BASE_MODEL, "sql")
    # The drop-in for vLLM's built-in resolver: reads the cache root itself.
    over_cache = FilesystemResolver(cache_dir, make_settings(), cache)
    second = over_cache.resolve(BASE_MODEL, "sql")
    assert first is not None and second is not None
    assert second.path == first.path
    assert len(snapshot_dirs(cache_dir)) == 1


@pytest.mark.parametrize(
    "name",
    ["../outside", "a/../../outside", "/tmp", "..", "%2e%2e/outside", "sql\x00", "\uff53ql"],
)
def test_hostile_names_return_none_without_touching_anything(
    fs_resolver: FilesystemResolver, adapters_dir: Path, cache_dir: Path, name: str
) -> None:
    write_lora_adapter(adapters_dir.parent / "outside", base_model=BASE_MODEL)
    write_lora_adapter(adapters_dir / "sql", base_model=BASE_MODEL)
    assert fs_resolver.resolve(BASE_MODEL, name) is None
    assert snapshot_dirs(cache_dir) == []
    assert sorted(p.name for p in cache_dir.iterdir()) == [".vllm-lora"]


def test_adapter_folder_linking_outside_the_root_is_refused(
    fs_resolver: FilesystemResolver, adapters_dir: Path, cache_dir: Path
) -> None:
    outside = write_lora_adapter(adapters_dir.parent / "outside", base_model=BASE_MODEL)
    (adapters_dir / "sneaky").symlink_to(outside)
    with pytest.raises(InvalidAdapterError, match="outside"):
        fs_resolver.resolve(BASE_MODEL, "sneaky")
    assert snapshot_dirs(cache_dir) == []


def test_file_linking_outside_the_adapter_folder_is_refused(
    fs_resolver: FilesystemResolver, adapters_dir: Path, cache_dir: Path
) -> None:
    folder = write_lora_adapter(adapters_dir / "sql", base_model=BASE_MODEL)
    secret = adapters_dir.parent / "secret.safetensors"
    (folder / "adapter_model.safetensors").rename(secret)
    (folder / "adapter_model.safetensors").symlink_to(secret)
    with pytest.raises(InvalidAdapterError, match="link to a file outside"):
        fs_resolver.resolve(BASE_MODEL, "sql")
    assert snapshot_dirs(cache_dir) == []


def test_invalid_adapter_raises_and_leaves_nothing_behind(
    fs_resolver: FilesystemResolver, adapters_dir: Path, cache_dir: Path
) -> None:
    write_lora_adapter(adapters_dir / "big", base_model=BASE_MODEL, rank=64)
    with pytest.raises(InvalidAdapterError, match="rank 64 is above this server's limit of 16"):
        fs_resolver.resolve(BASE_MODEL, "big")
    assert snapshot_dirs(cache_dir) == []
    assert staging_entries(cache_dir) == []
    assert not (cache_dir / "big").exists()


def test_rank_limit_comes_from_the_environment(
    adapters_dir: Path, cache_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    write_lora_adapter(adapters_dir / "big", base_model=BASE_MODEL, rank=64)
    settings = make_settings(VLLM_LORA_RESOLVER_MAX_RANK="64")
    resolver = FilesystemResolver(adapters_dir, settings, NodeCache(cache_dir))
    assert resolver.resolve(BASE_MODEL, "big") is not None


def test_folder_without_config_is_not_an_adapter(
    fs_resolver: FilesystemResolver, adapters_dir: Path
) -> None:
    (adapters_dir / "notes").mkdir()
    (adapters_dir / "notes" / "README.md").write_text("hello")
    assert fs_resolver.resolve(BASE_MODEL, "notes") is None


class CountingResolver(FilesystemResolver):
    """Counts store lookups, and can make them fail as an unreachable store would."""

    lookups = 0
    failure: Exception | None = None

    def locate(self, name: str) -> RemoteAdapter | None:
        self.lookups += 1
        if self.failure is not None:
            raise self.failure
        return super().locate(name)


def test_missing_name_costs_one_lookup_per_ttl(
    adapters_dir: Path, cache_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(VLLM_LORA_RESOLVER_NEGATIVE_TTL="0.3")
    resolver = CountingResolver(adapters_dir, settings, NodeCache(cache_dir))
    for _ in range(1000):
        assert resolver.resolve(BASE_MODEL, "absent") is None
    assert resolver.lookups == 1
    time.sleep(0.35)
    assert resolver.resolve(BASE_MODEL, "absent") is None
    assert resolver.lookups == 2


def test_unreachable_store_serves_the_cached_snapshot(
    adapters_dir: Path, cache_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    write_lora_adapter(adapters_dir / "sql", base_model=BASE_MODEL)
    resolver = CountingResolver(adapters_dir, make_settings(), NodeCache(cache_dir))
    first = resolver.resolve(BASE_MODEL, "sql")
    resolver.failure = TransientStoreError("mount is gone")
    assert resolver.resolve(BASE_MODEL, "sql") == first


def test_unreachable_store_with_nothing_cached_says_so(
    adapters_dir: Path, cache_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    resolver = CountingResolver(adapters_dir, make_settings(), NodeCache(cache_dir))
    resolver.failure = StoreUnavailableError("mount is gone")
    with pytest.raises(StoreUnavailableError, match="mount is gone"):
        resolver.resolve(BASE_MODEL, "sql")


class FlakyDownloadResolver(FilesystemResolver):
    """Fails the first ``failures`` downloads the way a dropped connection would."""

    failures = 2

    def download(
        self, adapter: RemoteAdapter, file: RemoteFile, destination: Path
    ) -> Mapping[str, str]:
        if self.failures > 0:
            self.failures -= 1
            destination.write_bytes(b"partial")
            raise TransientStoreError("connection reset by peer")
        return super().download(adapter, file, destination)


def _retrying(policy: RetryPolicy) -> TransferConfig:
    return replace(LOCAL_TRANSFER, transfer_retry=policy)


def test_transient_download_failures_are_retried(
    adapters_dir: Path, cache_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    write_lora_adapter(adapters_dir / "sql", base_model=BASE_MODEL)
    retries_before = metrics.RETRIES.labels("fs")._value.get()
    resolver = FlakyDownloadResolver(adapters_dir, make_settings(), NodeCache(cache_dir))
    resolver.transfer = replace(
        resolver.transfer, transfer_retry=RetryPolicy(attempts=4, base_delay=0.01)
    )
    assert resolver.resolve(BASE_MODEL, "sql") is not None
    assert metrics.RETRIES.labels("fs")._value.get() == retries_before + 2


def test_persistent_download_failure_publishes_nothing(
    adapters_dir: Path, cache_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    write_lora_adapter(adapters_dir / "sql", base_model=BASE_MODEL)
    resolver = FlakyDownloadResolver(adapters_dir, make_settings(), NodeCache(cache_dir))
    resolver.failures = 100
    resolver.transfer = replace(
        resolver.transfer, transfer_retry=RetryPolicy(attempts=3, base_delay=0.01)
    )
    with pytest.raises(TransientStoreError, match="connection reset"):
        resolver.resolve(BASE_MODEL, "sql")
    assert snapshot_dirs(cache_dir) == []
    assert staging_entries(cache_dir) == []


async def test_resolve_lora_runs_off_the_event_loop_and_answers_a_lora_request(
    fs_resolver: FilesystemResolver, adapters_dir: Path
) -> None:
    pytest.importorskip("vllm")
    write_lora_adapter(adapters_dir / "sql", base_model=BASE_MODEL)
    request = await fs_resolver.resolve_lora(BASE_MODEL, "sql")
    assert request is not None
    assert request.lora_name == "sql"
    assert Path(request.lora_path).is_absolute()
    assert request.lora_int_id >= 1
    assert await fs_resolver.resolve_lora(BASE_MODEL, "../sql") is None


def test_eight_processes_resolving_one_new_adapter_fetch_it_once(
    adapters_dir: Path, cache_dir: Path
) -> None:
    source = write_lora_adapter(adapters_dir / "sql", base_model=BASE_MODEL, rank=16)
    start_at = time.time() + 2.0
    workers = [
        start_worker(str(adapters_dir), str(cache_dir), "sql", "--start-at", str(start_at))
        for _ in range(8)
    ]
    results = [worker_result(worker) for worker in workers]
    for worker in workers:
        assert worker.wait(timeout=60) == 0
    assert len({result["path"] for result in results}) == 1
    fetchers = [result for result in results if result["fetched"] > 0]
    assert len(fetchers) == 1
    assert len(snapshot_dirs(cache_dir)) == 1
    served = Path(results[0]["path"]) / "adapter_model.safetensors"
    assert served.read_bytes() == (source / "adapter_model.safetensors").read_bytes()


def test_killed_mid_download_leaves_nothing_loadable_and_next_start_cleans_up(
    adapters_dir: Path, cache_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    write_lora_adapter(adapters_dir / "sql", base_model=BASE_MODEL)
    worker = start_worker(str(adapters_dir), str(cache_dir), "sql", "--stall")
    stalled = Path(worker_result(worker)["stalled"])
    assert stalled.exists()
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()

    assert snapshot_dirs(cache_dir) == []
    assert not os.path.lexists(cache_dir / "sql")
    assert len(staging_entries(cache_dir)) == 1  # debris of the dead process

    resolver = FilesystemResolver(adapters_dir, make_settings(), NodeCache(cache_dir))
    assert staging_entries(cache_dir) == []  # cleaned when the cache is opened
    resolved = resolver.resolve(BASE_MODEL, "sql")
    assert resolved is not None
    assert (resolved.path / "adapter_model.safetensors").stat().st_size > 0


def test_eviction_never_removes_a_snapshot_leased_by_a_live_process(
    adapters_dir: Path, cache_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    for index, name in enumerate(("held", "b", "c")):
        write_lora_adapter(adapters_dir / name, base_model=BASE_MODEL, seed=index)
    one_adapter = sum(f.stat().st_size for f in (adapters_dir / "held").iterdir())
    holder = start_worker(str(adapters_dir), str(cache_dir), "held", hold=True)
    held = Path(worker_result(holder)["path"])

    settings = make_settings(VLLM_LORA_RESOLVER_CACHE_MAX_BYTES=str(one_adapter))
    resolver = FilesystemResolver(
        adapters_dir, settings, NodeCache(cache_dir, settings.cache_max_bytes)
    )
    assert resolver.resolve(BASE_MODEL, "b") is not None
    assert resolver.resolve(BASE_MODEL, "c") is not None
    assert held.exists()  # leased by the live holder: kept above the cap

    holder.kill()
    holder.wait()
    write_lora_adapter(adapters_dir / "d", base_model=BASE_MODEL, seed=9)
    assert resolver.resolve(BASE_MODEL, "d") is not None
    assert not held.exists()  # its process is gone: evictable now
    assert not os.path.lexists(cache_dir / "held")  # and no dangling name link


class LyingStoreResolver(FilesystemResolver):
    """A store whose declared checksum never matches the bytes it delivers."""

    downloads = 0

    def download(
        self, adapter: RemoteAdapter, file: RemoteFile, destination: Path
    ) -> Mapping[str, str]:
        self.downloads += 1
        super().download(adapter, file, destination)
        return {"crc32c": "00000000"}


def test_checksum_mismatch_is_retried_then_refused_and_never_published(
    adapters_dir: Path, cache_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    write_lora_adapter(adapters_dir / "sql", base_model=BASE_MODEL)
    resolver = LyingStoreResolver(adapters_dir, make_settings(), NodeCache(cache_dir))
    resolver.transfer = replace(
        resolver.transfer, transfer_retry=RetryPolicy(attempts=3, base_delay=0.01)
    )
    with pytest.raises(IntegrityError, match="crc32c does not match"):
        resolver.resolve(BASE_MODEL, "sql")
    assert resolver.downloads == 3
    assert snapshot_dirs(cache_dir) == []
    assert staging_entries(cache_dir) == []
    assert not os.path.lexists(cache_dir / "sql")


_RESOLVE_AND_REPORT = """
import sys
from pathlib import Path
from vllm_lora_resolvers.backends.filesystem import FilesystemResolver
from vllm_lora_resolvers.cache import NodeCache
from vllm_lora_resolvers.config import Settings
from vllm_lora_resolvers.errors import CacheError
adapters, cache = Path(sys.argv[1]), Path(sys.argv[2])
settings = Settings.from_environ({"VLLM_LORA_RESOLVER_CACHE_DIR": str(cache)}, argv=[])
try:
    FilesystemResolver(adapters, settings, NodeCache(cache)).resolve("/models/tiny-llama", "sql")
except CacheError as error:
    print(error)
"""


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG


def test_a_full_disk_is_explained_and_leaves_nothing_behind(
    adapters_dir: Path, cache_dir: Path
) -> None:
    write_lora_adapter(adapters_dir / "sql", base_model=BASE_MODEL)  # weights: ~30 KB
    completed = subprocess.run(
        [sys.executable, "-c", _RESOLVE_AND_REPORT, str(adapters_dir), str(cache_dir)],
        preexec_fn=_limit_file_size,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "cannot write to the adapter cache" in completed.stdout
    assert "the disk is full" in completed.stdout
    assert snapshot_dirs(cache_dir) == []
    assert staging_entries(cache_dir) == []
