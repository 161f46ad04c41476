"""The filesystem resolver, and through it the shared pipeline every backend runs."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import google_crc32c
import pytest
from conftest import BASE_MODEL, snapshot_dirs, staging_entries, start_worker, worker_result

from devtools.models import write_large_adapter, write_lora_adapter
from vllm_lora_resolvers.backends.filesystem import FilesystemStore
from vllm_lora_resolvers.cache import NodeCache
from vllm_lora_resolvers.config import Settings
from vllm_lora_resolvers.errors import (
    InvalidAdapterError,
)
from vllm_lora_resolvers.fetch import Fetcher
from vllm_lora_resolvers.resolver import Resolver


def test_resolves_an_adapter_into_an_immutable_snapshot(
    fs_resolver: Resolver, adapters_dir: Path, cache_dir: Path
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


def test_the_first_copy_records_the_checksums_of_the_very_bytes_it_serves(
    adapters_dir: Path, cache_dir: Path, tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    """Hashed as it is copied, never read back: the manifest's CRC32C of each file, over many
    reads and writeback steps and a short last read, is that of the bytes served, and a digest
    a signature's check asks for (SHA-256) is that of the store's file."""
    source = write_large_adapter(adapters_dir / "big", base_model=BASE_MODEL, size_bytes=20 << 20)
    weights = (source / "adapter_model.safetensors").read_bytes()
    assert len(weights) % (1 << 20)  # a short last read
    store = FilesystemStore(
        adapters_dir, make_settings(VLLM_LORA_RESOLVER_MAX_RANK="100000"), NodeCache(cache_dir)
    )
    resolved = Resolver(store).resolve(BASE_MODEL, "big")
    assert resolved is not None
    for file in resolved.snapshot.manifest.files:
        served = (resolved.path / file.path).read_bytes()
        assert served == (source / file.path).read_bytes()
        assert file.crc32c == google_crc32c.Checksum(served).digest().hex()
    assert store.cache.verify() == []

    remote = store.locate("big")
    assert remote is not None
    fetcher = Fetcher(store, trust=None)
    [fetched] = fetcher.fetch_to(remote, fetcher.files_of(remote)[1:], tmp_path, ("sha256",))
    assert fetched.digests == {"sha256": hashlib.sha256(weights).hexdigest()}


def test_lora_int_id_is_stable_positive_and_per_version(
    fs_resolver: Resolver, adapters_dir: Path, cache_dir: Path
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
    fs_resolver: Resolver, adapters_dir: Path, cache_dir: Path
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
    resolver = Resolver(FilesystemStore(adapters_dir, make_settings(), NodeCache(cache_dir)))
    assert resolver.resolve(BASE_MODEL, "sql") is not None
    assert not (cache_dir / "sql").is_symlink()
    assert (own / "adapter_model.safetensors").read_bytes() == before


def test_serves_links_made_by_other_resolvers_without_copying(
    cache_dir: Path, adapters_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    write_lora_adapter(adapters_dir / "sql", base_model=BASE_MODEL)
    cache = NodeCache(cache_dir)
    upstream = Resolver(FilesystemStore(adapters_dir, make_settings(), cache))
    first = upstream.resolve(BASE_MODEL, "sql")
    # The drop-in for vLLM's built-in resolver: reads the cache root itself.
    over_cache = Resolver(FilesystemStore(cache_dir, make_settings(), cache))
    second = over_cache.resolve(BASE_MODEL, "sql")
    assert first is not None and second is not None
    assert second.path == first.path
    assert len(snapshot_dirs(cache_dir)) == 1


def test_adapter_folder_linking_outside_the_root_is_refused(
    fs_resolver: Resolver, adapters_dir: Path, cache_dir: Path
) -> None:
    outside = write_lora_adapter(adapters_dir.parent / "outside", base_model=BASE_MODEL)
    (adapters_dir / "sneaky").symlink_to(outside)
    with pytest.raises(InvalidAdapterError, match="outside"):
        fs_resolver.resolve(BASE_MODEL, "sneaky")
    assert snapshot_dirs(cache_dir) == []


def test_file_linking_outside_the_adapter_folder_is_refused(
    fs_resolver: Resolver, adapters_dir: Path, cache_dir: Path
) -> None:
    folder = write_lora_adapter(adapters_dir / "sql", base_model=BASE_MODEL)
    secret = adapters_dir.parent / "secret.safetensors"
    (folder / "adapter_model.safetensors").rename(secret)
    (folder / "adapter_model.safetensors").symlink_to(secret)
    with pytest.raises(InvalidAdapterError, match="link to a file outside"):
        fs_resolver.resolve(BASE_MODEL, "sql")
    assert snapshot_dirs(cache_dir) == []


def test_file_linking_to_a_file_inside_the_adapter_folder_is_served(
    fs_resolver: Resolver, adapters_dir: Path
) -> None:
    folder = write_lora_adapter(adapters_dir / "sql", base_model=BASE_MODEL)
    weights = (folder / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").rename(folder / "weights-v1.safetensors")
    (folder / "adapter_model.safetensors").symlink_to("weights-v1.safetensors")
    resolved = fs_resolver.resolve(BASE_MODEL, "sql")
    assert resolved is not None
    assert (resolved.path / "adapter_model.safetensors").read_bytes() == weights


def test_rank_limit_comes_from_the_environment(
    adapters_dir: Path, cache_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    write_lora_adapter(adapters_dir / "big", base_model=BASE_MODEL, rank=64)
    settings = make_settings(VLLM_LORA_RESOLVER_MAX_RANK="64")
    resolver = Resolver(FilesystemStore(adapters_dir, settings, NodeCache(cache_dir)))
    assert resolver.resolve(BASE_MODEL, "big") is not None


def test_folder_without_config_is_not_an_adapter(fs_resolver: Resolver, adapters_dir: Path) -> None:
    (adapters_dir / "notes").mkdir()
    (adapters_dir / "notes" / "README.md").write_text("hello")
    assert fs_resolver.resolve(BASE_MODEL, "notes") is None


def test_eviction_never_removes_a_snapshot_leased_by_a_live_process(
    adapters_dir: Path, cache_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    for index, name in enumerate(("held", "b", "c")):
        write_lora_adapter(adapters_dir / name, base_model=BASE_MODEL, seed=index)
    one_adapter = sum(f.stat().st_size for f in (adapters_dir / "held").iterdir())
    holder = start_worker(str(adapters_dir), str(cache_dir), "held", hold=True)
    held = Path(worker_result(holder)["path"])

    settings = make_settings(VLLM_LORA_RESOLVER_CACHE_MAX_BYTES=str(one_adapter))
    resolver = Resolver(
        FilesystemStore(adapters_dir, settings, NodeCache(cache_dir, settings.cache_max_bytes))
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


def test_a_cache_link_made_for_another_store_is_not_served(
    tmp_path: Path, cache_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    prod, staging = tmp_path / "prod", tmp_path / "staging"
    staging.mkdir()
    write_lora_adapter(prod / "sql", base_model=BASE_MODEL)
    prod_pod = Resolver(FilesystemStore(prod, make_settings(), NodeCache(cache_dir)))
    assert prod_pod.resolve(BASE_MODEL, "sql") is not None
    assert (cache_dir / "sql").is_symlink()  # the node-wide link the prod pod made

    # A pod of the staging store on the same node: its own store, and the cache dir (the
    # default layout of lora_fs_resolver, as vLLM's built-in resolver reads it).
    staging_cache = NodeCache(cache_dir)
    staging_pod = Resolver(FilesystemStore(staging, make_settings(), staging_cache))
    over_cache = Resolver(FilesystemStore(cache_dir, make_settings(), staging_cache))
    assert staging_pod.resolve(BASE_MODEL, "sql") is None
    assert over_cache.resolve(BASE_MODEL, "sql") is None


_RESOLVE_AND_REPORT = """
import sys
from pathlib import Path
from vllm_lora_resolvers.backends.filesystem import FilesystemStore
from vllm_lora_resolvers.cache import NodeCache
from vllm_lora_resolvers.config import Settings
from vllm_lora_resolvers.resolver import Resolver
from vllm_lora_resolvers.errors import CacheError
adapters, cache = Path(sys.argv[1]), Path(sys.argv[2])
settings = Settings.from_environ({"VLLM_LORA_RESOLVER_CACHE_DIR": str(cache)}, argv=[])
try:
    resolver = Resolver(FilesystemStore(adapters, settings, NodeCache(cache)))
    resolver.resolve("/models/tiny-llama", "sql")
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
