"""Moving files from a store into a staging folder: in parallel, retried, verified.

It knows files, not adapters: a backend copies one file to one local path (usually in ranged
parts, `download_in_parts`; from a local file, `copy_into`); sizes, checksums, retries and
parallelism live here, configured by one `TransferConfig`. Every retry starts from
`call_with_retries`, within the time budget of the resolution it serves (`retry.time_budget`), and
a failure one layer gave up on is never retried by another, so the worst case a dead store costs
is one number (`TransferConfig.worst_case_seconds`).
"""

from __future__ import annotations

import contextvars
import ctypes
import os
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from vllm_lora_resolvers.checksums import RECORDED, Digests, file_digests
from vllm_lora_resolvers.errors import IntegrityError, TransientStoreError, VersionChangedError
from vllm_lora_resolvers.remote import RemoteFile
from vllm_lora_resolvers.retry import RetryPolicy, call_with_retries

_T = TypeVar("_T")

#: Ranged reads in flight in this process, all stores and files together.
PARALLEL_READS = 32
_READS = ThreadPoolExecutor(max_workers=PARALLEL_READS, thread_name_prefix="lora-read")
#: Calls a resolution makes beside its own thread (`beside`); they may use `_READS`, never this
#: pool, so they never wait for one another.
_BESIDE = ThreadPoolExecutor(max_workers=PARALLEL_READS, thread_name_prefix="lora-beside")
#: Lookups: up to 3 tries, a retry only within 2 s, so quick failures (503, resets) get three
#: while a store that accepts connections and never answers costs two time limits (about 3 s).
LOOKUP_RETRY = RetryPolicy(attempts=3, base_delay=0.05, max_delay=0.2, budget_seconds=2.0)
#: A ranged part, or a file read whole: up to 5 tries.
TRANSFER_RETRY = RetryPolicy(attempts=5, base_delay=0.2, max_delay=2.0)
#: Bytes of a file hashed at a time as a download writes it.
_HASHED_AT_ONCE = 1 << 20
#: Bytes a download's part or a local copy writes between two starts of their writeback.
_WRITEBACK_STEP = 8 << 20
_SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start writing the range's dirty pages, do not wait
_sync_file_range = getattr(ctypes.CDLL(None), "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)


@dataclass(frozen=True)
class TransferConfig:
    """How every store is read: sizes, parallelism, time limits and the one retry policy.

    ``resolution_seconds`` is the time budget of one resolution: no retry of a lookup, a file or a
    part starts after it (first attempts do, so a healthy, large download is never cut short).
    """

    part_size: int = 16 << 20
    #: Ranged parts of one file read at once (on a pool of `PARALLEL_READS` for the process).
    parts_in_flight: int = 8
    #: Per request, (connect, read) seconds: a lookup's and a transfer's (the read limit is the
    #: longest stall tolerated in the middle of a body).
    lookup_timeout: tuple[float, float] = (1.5, 1.5)
    transfer_timeout: tuple[float, float] = (2.0, 10.0)
    lookup_retry: RetryPolicy = LOOKUP_RETRY
    transfer_retry: RetryPolicy = TRANSFER_RETRY
    resolution_seconds: float = 15.0

    def worst_case_seconds(self) -> float:
        """The longest a store that accepts connections and never answers can hold a resolution:
        retries stop at the budget, and the attempts in flight then end at their time limits."""
        return self.resolution_seconds + max(sum(self.lookup_timeout), sum(self.transfer_timeout))


#: What every store uses unless a caller (a test, a benchmark) says otherwise.
DEFAULT_TRANSFER = TransferConfig()


@dataclass(frozen=True)
class FetchedFile:
    """A file downloaded and verified: its size and CRC32C, for the cache's manifest, and the
    digests asked for besides (algorithm -> hex), computed in the same pass."""

    path: str
    size: int
    crc32c: str
    digests: Mapping[str, str] = field(default_factory=dict)


def verify_file(
    path: Path,
    expected: RemoteFile,
    declared: Mapping[str, str] | None = None,
    digests: Sequence[str] = (),
    computed: Digests | None = None,
) -> FetchedFile:
    """Check ``path`` against the size and checksums of ``expected`` (and ``declared``).

    Raises `IntegrityError` on any mismatch (a body cut short or damaged in transit: worth
    fetching again), `VersionChangedError` for more bytes than declared (no transfer fault makes
    those: the store serves another version than it declared). The file's CRC32C
    (hardware-accelerated) is always computed, for the manifest that ``cache verify`` uses, and
    so are ``digests`` (``sha256`` for a signature's check), returned. All are taken from
    ``computed`` (what `download_in_parts` or `copy_into` computed of the file's bytes as they
    wrote them) when it covers every byte of the file and every checksum needed, else computed in
    one read of it.
    """
    size = path.stat().st_size
    check_received(expected.path, 0, size, end=expected.size, size=expected.size)
    if size != expected.size:
        raise IntegrityError(
            f"{expected.path}: got {size} bytes, the store declared {expected.size}"
        )
    checksums = _worth_verifying({**expected.checksums, **(declared or {})})
    needed = [*checksums, *digests]
    if computed is not None and computed.length == size and computed.covers(needed):
        found = computed.hexdigests()
    else:
        found = file_digests(path, needed)
    for algorithm, value in checksums.items():
        if algorithm in found and found[algorithm] != value.lower():
            raise IntegrityError(
                f"{expected.path}: {algorithm} does not match what the store declared"
            )
    wanted = {algorithm: found[algorithm] for algorithm in digests if algorithm in found}
    return FetchedFile(path=expected.path, size=size, crc32c=found[RECORDED], digests=wanted)


def stored_size(content_range: str | None) -> int | None:
    """The size of the whole object a ranged answer came from, as its ``Content-Range`` says.

    >>> stored_size("bytes 0-99/41943040"), stored_size("bytes 0-99/*"), stored_size(None)
    (41943040, None, None)
    """
    match = re.fullmatch(r"bytes \d+-\d+/(\d+)", (content_range or "").strip())
    return int(match.group(1)) if match else None


def check_stored_size(file: RemoteFile, stored: int | None) -> None:
    """Raise `VersionChangedError` if the store says the object it reads ``file`` from is not the
    size it declared for it (``stored``; ``None``: it did not say), before a byte is written."""
    if stored is not None and stored != file.size:
        raise VersionChangedError(
            f"{file.path} is {stored} bytes in the store, which declared {file.size}"
        )


def check_received(name: str, start: int, length: int, *, end: int, size: int) -> None:
    """Refuse ``length`` bytes at ``start`` of file ``name``, declared ``size`` bytes and asked
    for up to ``end``: past ``size`` the store sends more than it declared (`VersionChangedError`),
    past ``end`` only more than it was asked (`IntegrityError`)."""
    if start + length > size:
        raise VersionChangedError(f"{name}: the store sent more than the {size} bytes it declared")
    if start + length > end:
        raise IntegrityError(f"{name}: the store sent more than asked")


def _worth_verifying(checksums: Mapping[str, str]) -> dict[str, str]:
    """The declared checksums to verify: MD5 and SHA-1 (slow) only when nothing faster and at
    least as strong for transfer errors (CRC32C, CRC64NVME, SHA-256) is declared."""
    if checksums.keys() & {"crc32c", "crc64nvme", "sha256"}:
        return {k: v for k, v in checksums.items() if k not in ("md5", "sha1")}
    return dict(checksums)


@dataclass
class _FileDownload:
    """The download `fetch_file` runs: its ``target``, the ``algorithms`` to compute of the
    target's bytes as they are written (besides `RECORDED`), and the ``digests`` the last
    `download_in_parts` or `copy_into` of the target computed."""

    target: Path
    algorithms: tuple[str, ...]
    digests: Digests | None = None


#: The download `fetch_file` runs in this context, if any.
_FILE_DOWNLOAD: ContextVar[_FileDownload | None] = ContextVar("file_download", default=None)


def fetch_file(
    file: RemoteFile,
    target: Path,
    download: Callable[[RemoteFile, Path], Mapping[str, str]],
    *,
    policy: RetryPolicy,
    on_retry: Callable[[TransientStoreError], None],
    digests: Sequence[str] = (),
) -> FetchedFile:
    """Download ``file`` to ``target`` with ``download`` and verify it (computing ``digests``
    too: see `verify_file`).

    A download in ranged parts (`download_in_parts`) computes the file's digests while it
    downloads, and a local copy (`copy_into`) as it copies, so the verification reads nothing
    again. A failed attempt is retried as ``policy`` allows, unless a retry layer below (its
    ranged parts') already gave up on it; bytes that do not match what the store declared are
    deleted. A store that serves other bytes than it declared (`VersionChangedError`) is not
    retried: the pipeline looks the adapter up again.
    """

    def attempt() -> FetchedFile:
        running = _FileDownload(target, (*_worth_verifying(file.checksums), *digests))
        token = _FILE_DOWNLOAD.set(running)
        try:
            declared = download(file, target)
        except ConnectionError as error:  # a backend that let a broken socket through
            raise TransientStoreError(f"{file.path}: {type(error).__name__}") from None
        finally:
            _FILE_DOWNLOAD.reset(token)
        try:
            return verify_file(target, file, declared, digests, running.digests)
        except (IntegrityError, VersionChangedError):
            target.unlink(missing_ok=True)
            raise

    return call_with_retries(attempt, policy, f"download of {file.path}", on_retry)


def download_in_parts(
    destination: Path,
    size: int,
    fetch_range: Callable[[int, int, Callable[[bytes], None]], None],
    *,
    config: TransferConfig,
    on_retry: Callable[[TransientStoreError], None],
    declared_algorithms: Iterable[str] = (),
) -> None:
    """Write bytes ``[0, size)`` of a remote object to ``destination``, parts in parallel.

    ``fetch_range(start, end, write)`` streams the bytes ``[start, end)`` to ``write`` in chunks.
    Each part is written in place with ``pwrite`` as it streams (memory stays at one chunk per
    part in flight), and a part that breaks resumes from the byte where it broke; finished parts
    are never fetched again (a part that fails once all its bytes came, a client's checksum
    say, is left to the file's verification). Nothing is written past a part's end (see
    `check_received`).

    For `fetch_file`, the calling thread meanwhile computes the file's digests (those it asks
    for, and those of ``declared_algorithms``, the store's checksums declared since `locate`),
    reading back each byte once it is final: every byte before the position each unfinished part
    has reached (a part resumes from there). Only what the last part writes is left to hash when
    it ends.
    """
    descriptor = os.open(destination, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(descriptor, size)
        step = config.part_size
        parts = [(start, min(start + step, size)) for start in range(0, size, step)]
        # The byte each part has reached: all of its bytes before it are written (and final).
        reached = [start for start, _ in parts]
        progress = threading.Condition()

        def fetch_part(index: int) -> None:
            start, end = parts[index]
            written_back = start

            def write(chunk: bytes) -> None:
                nonlocal written_back
                view, position = memoryview(chunk), reached[index]
                check_received(destination.name, position, len(view), end=end, size=size)
                while view:
                    written = os.pwrite(descriptor, view, position)
                    view, position = view[written:], position + written
                with progress:
                    reached[index] = position
                    progress.notify()
                if position - written_back >= _WRITEBACK_STEP or position == end:
                    _start_writeback(descriptor, written_back, position)
                    written_back = position

            def attempt() -> None:
                if reached[index] < end:  # a try that failed past its last byte left nothing
                    fetch_range(reached[index], end, write)
                if reached[index] != end:
                    raise TransientStoreError(
                        f"{destination.name}: part ended at byte {reached[index]}"
                    )

            call_with_retries(
                attempt,
                config.transfer_retry,
                f"part {start}-{end} of {destination.name}",
                on_retry,
            )

        def final() -> int:
            """The end of the file's final bytes: where the first unfinished part has reached."""
            return next((at for at, (_, end) in zip(reached, parts, strict=True) if at < end), size)

        digests = _digests_for(destination, declared_algorithms)
        lanes = _start_lanes(fetch_part, len(parts), config.parts_in_flight)
        try:
            if digests is not None:
                _digest_as_final(descriptor, digests, final, progress, lanes)
        finally:
            _join(lanes)
    finally:
        os.close(descriptor)


def _start_writeback(descriptor: int, start: int, end: int) -> None:
    """Start writing bytes ``[start, end)`` of the file to the disk, waiting for nothing
    (``sync_file_range`` where the system has it, which promises nothing): the disk writes while
    the transfer goes on, and the ``fsync`` that makes a snapshot durable before it is published
    waits only for the last bytes. A failure changes nothing: ignored."""
    if _sync_file_range is not None:
        _sync_file_range(descriptor, start, end - start, _SYNC_FILE_RANGE_WRITE)


def copy_into(destination: Path, reader: int, size: int) -> None:
    """Copy the first ``size`` bytes of ``reader`` into ``destination`` (never more, however long
    it has grown; fewer if it ends sooner): 1 MiB read, then, for `fetch_file`, hashed, then
    written, so the copy is never read again (at 2 MiB the copy took several times longer here).

    Every 8 MiB written is started on its way to the disk at once (`_start_writeback`).
    """
    digests = _digests_for(destination)
    writer = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        copied = started = 0
        while copied < size and (
            chunk := os.pread(reader, min(_HASHED_AT_ONCE, size - copied), copied)
        ):
            if digests is not None:
                digests.update(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(writer, view) :]
            copied += len(chunk)
            if copied - started >= _WRITEBACK_STEP or copied == size:
                _start_writeback(writer, started, copied)
                started = copied
    finally:
        os.close(writer)


def _digests_for(destination: Path, declared_algorithms: Iterable[str] = ()) -> Digests | None:
    """New digests of ``destination``, for `fetch_file` to verify it with, if it is the target of
    the download `fetch_file` runs in this context (else ``None``: none is needed)."""
    running = _FILE_DOWNLOAD.get()
    if running is None or running.target != destination:
        return None
    running.digests = Digests([*running.algorithms, *declared_algorithms])
    return running.digests


def _digest_as_final(
    descriptor: int,
    digests: Digests,
    final: Callable[[], int],
    progress: threading.Condition,
    lanes: Sequence[Future[None]],
) -> None:
    """Feed ``digests`` the file's bytes as they become final (up to ``final()``, which grows as
    the parts notify ``progress``), until they all are or the ``lanes`` writing them ended."""

    def wake(_: Future[None]) -> None:
        with progress:
            progress.notify()

    for lane in lanes:
        lane.add_done_callback(wake)
    while True:
        with progress:
            progress.wait_for(
                lambda: final() > digests.length or all(lane.done() for lane in lanes)
            )
            end = final()
        if end == digests.length:
            return
        while digests.length < end:
            length = min(_HASHED_AT_ONCE, end - digests.length)
            chunk = os.pread(descriptor, length, digests.length)
            if not chunk:
                raise IntegrityError("the file being downloaded was cut short")
            digests.update(chunk)


def beside(call: Callable[[], _T]) -> Future[_T]:
    """Start ``call`` on another thread, in the caller's context (its time budget), so that a
    resolution makes two store requests at once; the caller waits for its result."""
    return _BESIDE.submit(contextvars.copy_context().run, call)


def _start_lanes(function: Callable[[int], None], count: int, lanes: int) -> list[Future[None]]:
    """Start ``function(i)`` for every ``i`` below ``count``, in order, ``lanes`` at a time on
    the process's read pool (in the caller's context: its time budget); after the first failure
    no lane starts another. `_join` waits for them. A single item runs on the calling thread,
    done when this returns: a small file costs no hand-over to another thread and back."""
    if count == 1:
        done: Future[None] = Future()
        try:
            function(0)
            done.set_result(None)
        except BaseException as error:  # raised by _join, as a lane's would be
            done.set_exception(error)
        return [done]
    remaining = iter(range(count))
    guard = threading.Lock()
    failed = threading.Event()

    def lane() -> None:
        while not failed.is_set():
            with guard:
                item = next(remaining, None)
            if item is None:
                return
            try:
                function(item)
            except BaseException:
                failed.set()
                raise

    return [_READS.submit(contextvars.copy_context().run, lane) for _ in range(min(lanes, count))]


def _join(lanes: Sequence[Future[None]]) -> None:
    """Wait until every lane ended; raise the first failure."""
    wait(lanes)
    for lane in lanes:
        error = lane.exception()
        if error is not None:
            raise error
