"""Moving an adapter's files from a store into a staging folder: in parallel, retried, verified.

Backends only copy one file to one local path; sizes, checksums, retries and parallelism live here.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import google_crc32c

from vllm_lora_resolvers.adapter import CONFIG_FILE, WEIGHTS_FILES
from vllm_lora_resolvers.cache import SnapshotFile
from vllm_lora_resolvers.errors import IntegrityError, TransientStoreError
from vllm_lora_resolvers.retry import RetryPolicy, call_with_retries

_CHUNK = 1 << 20
A = TypeVar("A")
R = TypeVar("R")


@dataclass(frozen=True)
class RemoteFile:
    """One file of an adapter in a store.

    ``checksums`` maps an algorithm (``md5``, ``sha1``, ``sha256``, ``crc32``, ``crc32c``,
    ``crc64nvme``) to the lowercase hex digest the store declares; each is verified after download,
    together with any a backend's `download` returns. ``etag`` is the store's opaque version of the
    file, if it has one.
    """

    path: str
    size: int
    checksums: Mapping[str, str] = field(default_factory=dict)
    etag: str = ""


@dataclass(frozen=True)
class RemoteAdapter:
    """An adapter found in a store: its version and the files that make it up.

    ``version`` is opaque and changes whenever the content may have changed. A backend that
    finds an adapter already snapshotted in the node cache names it in ``cached_snapshot``.
    """

    name: str
    version: str
    location: str
    files: tuple[RemoteFile, ...]
    cached_snapshot: str | None = None

    def file(self, path: str) -> RemoteFile | None:
        """The file at ``path`` (relative to the adapter folder), if the adapter has it."""
        return next((file for file in self.files if file.path == path), None)


def adapter_from_listing(
    name: str, location: str, listed: Mapping[str, RemoteFile]
) -> RemoteAdapter | None:
    """The adapter in one listed folder (file name -> file), or ``None`` if it has no config.

    It is made of the config and the first weights file in vLLM's order of preference; its
    version changes whenever the etag (object version) or size of one of those does.
    """
    config = listed.get(CONFIG_FILE)
    weights = next((listed[n] for n in WEIGHTS_FILES if n in listed), None)
    if config is None:
        return None
    files = (config,) if weights is None else (config, weights)
    fingerprint = hashlib.sha256()
    for file in files:
        fingerprint.update(f"{file.path}\0{file.etag}\0{file.size}\n".encode())
    return RemoteAdapter(name, fingerprint.hexdigest()[:32], location, files)


class _Hasher(Protocol):
    def update(self, data: bytes, /) -> object: ...
    def hexdigest(self) -> str: ...


class _Crc32:
    def __init__(self) -> None:
        self.value = 0

    def update(self, data: bytes, /) -> None:
        self.value = zlib.crc32(data, self.value)

    def hexdigest(self) -> str:
        return f"{self.value:08x}"


class _Crc32c:
    def __init__(self) -> None:
        self._checksum = google_crc32c.Checksum()

    def update(self, data: bytes, /) -> None:
        self._checksum.update(data)

    def hexdigest(self) -> str:
        return str(self._checksum.digest().hex())


class _Crc64Nvme:
    """S3's default full-object checksum; computed with awscrt when it is installed."""

    def __init__(self, crc64nvme: Callable[[bytes, int], int]) -> None:
        self._crc64nvme = crc64nvme
        self.value = 0

    @classmethod
    def create(cls) -> _Crc64Nvme | None:
        try:
            from awscrt.checksums import crc64nvme
        except ImportError:
            return None
        return cls(crc64nvme)

    def update(self, data: bytes, /) -> None:
        self.value = self._crc64nvme(data, self.value)

    def hexdigest(self) -> str:
        return f"{self.value:016x}"


def _hasher(algorithm: str) -> _Hasher | None:
    if algorithm in ("md5", "sha1", "sha256"):
        return hashlib.new(algorithm, usedforsecurity=False)
    if algorithm == "crc32":
        return _Crc32()
    if algorithm == "crc32c":
        return _Crc32c()
    if algorithm == "crc64nvme":
        return _Crc64Nvme.create()
    return None


def verify_file(
    path: Path, expected: RemoteFile, declared: Mapping[str, str] | None = None
) -> SnapshotFile:
    """Check ``path`` against the size and checksums of ``expected`` (and ``declared``).

    Raises `IntegrityError` on any mismatch. The file is read once whatever the checksums; its
    CRC32C (hardware-accelerated) is always computed, for the manifest that ``cache verify`` uses.
    """
    size = path.stat().st_size
    if size != expected.size:
        raise IntegrityError(
            f"{expected.path}: got {size} bytes, the store declared {expected.size}"
        )
    checksums = _worth_verifying({**expected.checksums, **(declared or {})})
    hashers: dict[str, _Hasher] = {"crc32c": _Crc32c()}
    for algorithm in checksums:
        hasher = _hasher(algorithm)
        if hasher is not None:
            hashers[algorithm] = hasher
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK):
            for hasher in hashers.values():
                hasher.update(chunk)
    for algorithm, value in checksums.items():
        hasher = hashers.get(algorithm)
        if hasher is not None and hasher.hexdigest() != value.lower():
            raise IntegrityError(
                f"{expected.path}: {algorithm} does not match what the store declared"
            )
    return SnapshotFile(path=expected.path, size=size, crc32c=hashers["crc32c"].hexdigest())


def _worth_verifying(checksums: Mapping[str, str]) -> dict[str, str]:
    """The declared checksums to verify: MD5 and SHA-1 (slow) only when nothing faster and at
    least as strong for transfer errors (CRC32C, CRC64NVME, SHA-256) is declared."""
    if checksums.keys() & {"crc32c", "crc64nvme", "sha256"}:
        return {k: v for k, v in checksums.items() if k not in ("md5", "sha1")}
    return dict(checksums)


def fetch_files(
    files: tuple[RemoteFile, ...],
    destination: Path,
    download: Callable[[RemoteFile, Path], Mapping[str, str]],
    *,
    policy: RetryPolicy,
    on_retry: Callable[[TransientStoreError], None],
    max_workers: int = 4,
) -> list[SnapshotFile]:
    """Download every file into ``destination`` in parallel and verify each.

    Each file is retried on its own (a transient failure re-fetches that file only); the first
    failure that survives its retries cancels what has not started and is raised.
    """

    def fetch_one(file: RemoteFile) -> SnapshotFile:
        target = destination / file.path

        def attempt() -> SnapshotFile:
            try:
                declared = download(file, target)
            except ConnectionError as error:  # a backend that let a broken socket through
                raise TransientStoreError(f"{file.path}: {type(error).__name__}") from None
            try:
                return verify_file(target, file, declared)
            except IntegrityError:
                target.unlink(missing_ok=True)
                raise

        return call_with_retries(attempt, policy, f"download of {file.path}", on_retry)

    return run_in_parallel(fetch_one, files, max_workers)


def download_in_parts(
    destination: Path,
    size: int,
    fetch_range: Callable[[int, int, Callable[[bytes], None]], None],
    *,
    part_size: int,
    workers: int,
    policy: RetryPolicy,
    on_retry: Callable[[TransientStoreError], None],
) -> None:
    """Write bytes ``[0, size)`` of a remote object to ``destination``, parts in parallel.

    ``fetch_range(start, end, write)`` streams the bytes ``[start, end)`` to ``write`` in chunks.
    Each part is written in place with ``pwrite`` as it streams (memory stays at one chunk per
    worker), and a part that breaks resumes from the byte where it broke; finished parts are never
    fetched again.
    """
    descriptor = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(descriptor, size)

        def fetch_part(part: tuple[int, int]) -> None:
            start, end = part
            position = start

            def write(chunk: bytes) -> None:
                nonlocal position
                view = memoryview(chunk)
                if position + len(view) > end:
                    raise IntegrityError(f"{destination.name}: the store sent more than asked")
                while view:
                    written = os.pwrite(descriptor, view, position)
                    view, position = view[written:], position + written

            def attempt() -> None:
                fetch_range(position, end, write)
                if position != end:
                    raise TransientStoreError(f"{destination.name}: part ended at byte {position}")

            call_with_retries(
                attempt, policy, f"part {start}-{end} of {destination.name}", on_retry
            )

        parts = [(start, min(start + part_size, size)) for start in range(0, size, part_size)]
        run_in_parallel(fetch_part, parts, workers)
    finally:
        os.close(descriptor)


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
