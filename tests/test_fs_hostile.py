"""A writer of the adapter folder racing the filesystem resolver: swapping a file for a link to
a private file, swapping whole folders, rewriting files in place. Every snapshot handed out is the
folder as it was at one moment (a file that changes while it is copied, or a folder swapped
meanwhile, makes the resolver look again), and nothing outside the folder is ever read.

A writer rewriting a file in place passes through torn states that are on disk for real: one that
stalls half way leaves a torn file, which is what the folder then holds. Atomic replacement
(write elsewhere, then rename) is the way to update a folder (docs/security.md)."""

from __future__ import annotations

import asyncio
import ctypes
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import BASE_MODEL, snapshot_dirs

from devtools.models import write_lora_adapter
from vllm_lora_resolvers.adapter import CONFIG_FILE
from vllm_lora_resolvers.backends.filesystem import FilesystemStore
from vllm_lora_resolvers.cache import NodeCache
from vllm_lora_resolvers.config import Settings
from vllm_lora_resolvers.edge import VllmResolver
from vllm_lora_resolvers.errors import (
    InvalidAdapterError,
    ResolverError,
    StoreUnavailableError,
    VersionChangedError,
)
from vllm_lora_resolvers.remote import RemoteAdapter, RemoteFile
from vllm_lora_resolvers.resolver import Resolver

WEIGHTS = "adapter_model.safetensors"
MARKER = b"PRIVATE-MARKER-7f3a"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


@contextmanager
def running(action: Callable[[int], None]) -> Iterator[None]:
    """Run ``action(0)``, ``action(1)``, ... on a thread until the block ends."""
    stop = threading.Event()

    def loop() -> None:
        count = 0
        while not stop.is_set():
            action(count)
            count += 1

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _resolver(adapters: Path, cache: Path, make_settings: Callable[..., Settings]) -> Resolver:
    settings = make_settings(VLLM_LORA_RESOLVER_NEGATIVE_TTL="0")
    return Resolver(FilesystemStore(adapters, settings, NodeCache(cache)))


def _pair(folder: Path) -> tuple[bytes, bytes]:
    return (folder / CONFIG_FILE).read_bytes(), (folder / WEIGHTS).read_bytes()


def test_a_config_swapped_for_a_link_to_a_private_file_never_leaks_it(
    adapters_dir: Path, cache_dir: Path, tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    folder = write_lora_adapter(adapters_dir / "sql", base_model=BASE_MODEL)
    good = (folder / CONFIG_FILE).read_bytes()
    private = tmp_path / "private.json"  # as long as the real config: no size mismatch to trip
    secret = b'{"peft_type": "' + MARKER + b'"}'
    private.write_bytes(secret + b" " * (len(good) - len(secret)))
    resolver = _resolver(adapters_dir, cache_dir, make_settings)

    def swap(count: int) -> None:
        fresh, link = folder / f".new-{count}", folder / f".link-{count}"
        fresh.write_bytes(good)  # a new file each time: a new version to fetch
        fresh.replace(folder / CONFIG_FILE)
        link.symlink_to(private)
        link.replace(folder / CONFIG_FILE)

    messages, served = [], 0
    with running(swap):
        for _ in range(300):
            try:
                resolved = resolver.resolve(BASE_MODEL, "sql")
            except ResolverError as error:
                messages.append(str(error))
                continue
            if resolved is not None:
                served += 1
                assert (resolved.path / CONFIG_FILE).read_bytes() == good
    assert not [m for m in messages if MARKER.decode() in m or str(private) in m]
    for snapshot in snapshot_dirs(cache_dir):
        assert (snapshot / "adapter" / CONFIG_FILE).read_bytes() == good
    assert served + len(messages) == 300


class LookupRacedByALink(FilesystemStore):
    """Its lookup ends as a writer swapping a link in between the ``lstat`` and the ``stat`` of
    a file makes it end: with the identity of the file the link leads to, outside the folder."""

    @staticmethod
    def _stat_file(name: str, folder: str, file_name: str) -> os.stat_result | None:
        return os.stat(f"{folder}/{file_name}")


def test_a_file_looked_up_through_a_link_swapped_in_is_never_read_when_it_lies_elsewhere(
    adapters_dir: Path, cache_dir: Path, tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    folder = write_lora_adapter(adapters_dir / "sql", base_model=BASE_MODEL)
    private = tmp_path / "private.json"
    private.write_bytes(b'{"peft_type": "' + MARKER + b'"}')
    (folder / CONFIG_FILE).unlink()
    (folder / CONFIG_FILE).symlink_to(private)
    store = LookupRacedByALink(adapters_dir, make_settings(), NodeCache(cache_dir))
    remote = store.locate("sql")
    assert remote is not None
    config = remote.file(CONFIG_FILE)
    assert config is not None and config.size == private.stat().st_size  # the race's outcome
    copy = tmp_path / "copy"
    outside = "adapter_config.json is a link to a file outside the adapter folder"
    with pytest.raises(InvalidAdapterError, match=outside) as refused:
        store.download(remote, config, copy)
    assert not copy.exists()
    with pytest.raises(InvalidAdapterError, match=outside):
        store.read_head(remote, config, 64)
    assert str(private) not in str(refused.value)


def _exchange(first: Path, second: Path) -> None:
    """Swap two folders atomically (renameat2 with RENAME_EXCHANGE)."""
    libc = ctypes.CDLL(None, use_errno=True)
    done = libc.renameat2(
        _AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE
    )
    if done != 0:
        raise OSError(ctypes.get_errno(), "renameat2")


async def _resolve_concurrently(resolver: Resolver, times: int) -> list[Path]:
    async def one() -> Path | None:
        try:
            request = await VllmResolver(resolver).resolve_lora(BASE_MODEL, "sql")
        except ResolverError:
            return None  # changed twice under one resolution: an honest error
        return None if request is None else Path(request.lora_path)

    paths = await asyncio.gather(*(one() for _ in range(times)))
    return [path for path in paths if path is not None]


def test_folders_swapped_atomically_never_give_one_versions_config_with_the_others_weights(
    adapters_dir: Path, cache_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    one = write_lora_adapter(adapters_dir / "sql", base_model=BASE_MODEL, seed=1, alpha=16)
    other = write_lora_adapter(adapters_dir / "other", base_model=BASE_MODEL, seed=2, alpha=32)
    versions = {_pair(one), _pair(other)}
    resolver = _resolver(adapters_dir, cache_dir, make_settings)

    with running(lambda _: _exchange(one, other)):
        paths = [
            path for _ in range(5) for path in asyncio.run(_resolve_concurrently(resolver, 50))
        ]
    assert paths
    assert all(_pair(path) in versions for path in paths)


class SwappedAfterEachLookup(FilesystemStore):
    """Swaps the adapter's folder with ``twin`` right after each of its first ``swaps`` lookups,
    and back before the next one: every copy finds the files changed, every lookup the version
    it looked up before."""

    swaps = 2
    twin = Path()
    swapped = False

    def locate(self, name: str) -> RemoteAdapter | None:
        if self.swapped:
            _exchange(self.root / name, self.twin)
            self.swapped = False
        found = super().locate(name)
        if self.swaps > 0:
            self.swaps -= 1
            _exchange(self.root / name, self.twin)
            self.swapped = True
        return found


def test_a_folder_swapped_away_under_each_copy_and_back_is_looked_up_again_never_refused(
    adapters_dir: Path, cache_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    """The same version found again after its files changed under the copy is the same files
    back: the resolution fails as the store changed (a retry serves it), and the version is not
    refused as one the store serves otherwise than it declares."""
    one = write_lora_adapter(adapters_dir / "sql", base_model=BASE_MODEL, seed=1)
    other = write_lora_adapter(adapters_dir / "other", base_model=BASE_MODEL, seed=2)
    store = SwappedAfterEachLookup(
        adapters_dir, make_settings(VLLM_LORA_RESOLVER_NEGATIVE_TTL="0"), NodeCache(cache_dir)
    )
    store.twin = other
    resolver = Resolver(store)
    with pytest.raises(StoreUnavailableError, match="changed"):
        resolver.resolve(BASE_MODEL, "sql")
    resolved = resolver.resolve(BASE_MODEL, "sql")
    assert resolved is not None and _pair(resolved.path) == _pair(one)


class RewrittenInPlaceAfterLookup(FilesystemStore):
    """Rewrites the weights file in place (same file, new content) right after each of its first
    ``rewrites`` lookups, as a writer racing the resolver would."""

    rewrites = 1
    content = b""

    def locate(self, name: str) -> RemoteAdapter | None:
        found = super().locate(name)
        if self.rewrites > 0:
            self.rewrites -= 1
            with (self.root / name / WEIGHTS).open("r+b") as stream:
                stream.write(self.content)
        return found


def _adapter_and_its_next_weights(adapters_dir: Path, tmp_path: Path) -> tuple[Path, bytes]:
    """Adapter ``sql`` in ``adapters_dir``, and the weights of another version of it, as long."""
    folder = write_lora_adapter(adapters_dir / "sql", base_model=BASE_MODEL, seed=1)
    new = write_lora_adapter(tmp_path / "v2", base_model=BASE_MODEL, seed=2)
    return folder, (new / WEIGHTS).read_bytes()


def test_a_file_rewritten_in_place_after_its_lookup_is_looked_up_again(
    adapters_dir: Path, cache_dir: Path, tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    folder, new_weights = _adapter_and_its_next_weights(adapters_dir, tmp_path)
    store = RewrittenInPlaceAfterLookup(adapters_dir, make_settings(), NodeCache(cache_dir))
    store.content = new_weights
    resolver = Resolver(store)
    inode = (folder / WEIGHTS).stat().st_ino

    resolved = resolver.resolve(BASE_MODEL, "sql")
    assert resolved is not None
    assert (folder / WEIGHTS).stat().st_ino == inode  # the very same file, rewritten
    assert _pair(resolved.path) == _pair(folder)  # the new content, under the new version
    current = store.locate("sql")
    assert current is not None and resolved.snapshot.manifest.version == current.version


def _cache_disk_bytes(cache_dir: Path) -> int:
    """Bytes really allocated under the cache (holes of sparse files count nothing)."""
    return sum(
        Path(root, name).lstat().st_blocks * 512
        for root, _, names in os.walk(cache_dir)
        for name in names
    )


def test_an_adapter_above_the_size_limit_is_refused_before_any_byte_is_copied(
    adapters_dir: Path, cache_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    folder = write_lora_adapter(adapters_dir / "sql", base_model=BASE_MODEL)
    with (folder / WEIGHTS).open("r+b") as weights:
        weights.truncate(1 << 40)  # a sparse terabyte: costs the writer nothing
    resolver = _resolver(adapters_dir, cache_dir, make_settings)
    for _ in range(2):  # and again: remembered, not copied again
        with pytest.raises(InvalidAdapterError, match="VLLM_LORA_RESOLVER_MAX_ADAPTER_BYTES"):
            resolver.resolve(BASE_MODEL, "sql")
    assert _cache_disk_bytes(cache_dir) < 1 << 20
    assert snapshot_dirs(cache_dir) == []


def test_a_weights_file_larger_than_its_header_declares_is_refused_before_its_copy(
    adapters_dir: Path, cache_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    folder = write_lora_adapter(adapters_dir / "sql", base_model=BASE_MODEL)
    with (folder / WEIGHTS).open("r+b") as weights:
        weights.truncate(100 << 30)  # under a raised limit, still far more than declared
    settings = make_settings(VLLM_LORA_RESOLVER_MAX_ADAPTER_BYTES="1TiB")
    resolver = Resolver(FilesystemStore(adapters_dir, settings, NodeCache(cache_dir)))
    with pytest.raises(InvalidAdapterError, match="bytes of data"):
        resolver.resolve(BASE_MODEL, "sql")
    assert _cache_disk_bytes(cache_dir) < 1 << 20


class GrowingOnceOpened(FilesystemStore):
    """Grows the weights file by 8 MiB right after the copy opened it and found it the file
    looked up, as a writer appending to it would."""

    @staticmethod
    @contextmanager
    def _file(adapter: RemoteAdapter, file: RemoteFile, directory: int) -> Iterator[int]:
        with FilesystemStore._file(adapter, file, directory) as reader:
            if file.path == WEIGHTS:
                os.truncate(Path(adapter.location) / WEIGHTS, file.size + (8 << 20))
            yield reader


class RewrittenOnceOpened(FilesystemStore):
    """Rewrites the weights file in place (the same file and size, new bytes: ``new_weights``)
    right after the copy opened it and found it the file looked up, as a writer racing the copy
    would."""

    new_weights = b""

    @staticmethod
    @contextmanager
    def _file(adapter: RemoteAdapter, file: RemoteFile, directory: int) -> Iterator[int]:
        with FilesystemStore._file(adapter, file, directory) as reader:
            if file.path == WEIGHTS:
                (Path(adapter.location) / WEIGHTS).write_bytes(RewrittenOnceOpened.new_weights)
            yield reader


def test_a_file_rewritten_in_place_once_its_copy_opened_it_is_a_new_version(
    adapters_dir: Path, tmp_path: Path, cache_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    folder, RewrittenOnceOpened.new_weights = _adapter_and_its_next_weights(adapters_dir, tmp_path)
    assert len(RewrittenOnceOpened.new_weights) == (folder / WEIGHTS).stat().st_size
    store = RewrittenOnceOpened(adapters_dir, make_settings(), NodeCache(cache_dir))
    remote = store.locate("sql")
    assert remote is not None
    weights = remote.file(WEIGHTS)
    assert weights is not None
    with pytest.raises(VersionChangedError, match="changed"):  # looked up again, as a new version
        store.download(remote, weights, tmp_path / "copy")


def test_a_file_growing_while_it_is_copied_is_copied_no_further_than_looked_up(
    adapters_dir: Path, tmp_path: Path, cache_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    write_lora_adapter(adapters_dir / "sql", base_model=BASE_MODEL)
    store = GrowingOnceOpened(adapters_dir, make_settings(), NodeCache(cache_dir))
    remote = store.locate("sql")
    assert remote is not None
    weights = remote.file(WEIGHTS)
    assert weights is not None
    copy = tmp_path / "copy"
    with pytest.raises(VersionChangedError, match="changed"):  # looked up again, as a new version
        store.download(remote, weights, copy)
    assert copy.stat().st_size == weights.size
