"""File verification and the ranged download engine, on local bytes."""

from __future__ import annotations

import hashlib
import threading
import time
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path

import google_crc32c
import pytest

from vllm_lora_resolvers import transfer
from vllm_lora_resolvers.errors import IntegrityError, TransientStoreError, VersionChangedError
from vllm_lora_resolvers.remote import RemoteFile
from vllm_lora_resolvers.retry import RetryPolicy
from vllm_lora_resolvers.transfer import (
    DEFAULT_TRANSFER,
    FetchedFile,
    TransferConfig,
    copy_into,
    download_in_parts,
    fetch_file,
    stored_size,
    verify_file,
)

DATA = bytes(range(256)) * 4096  # 1 MiB
QUICK = RetryPolicy(attempts=3, base_delay=0.0, budget_seconds=5)


def _config(part_size: int, parts_in_flight: int) -> TransferConfig:
    return TransferConfig(
        part_size=part_size, parts_in_flight=parts_in_flight, transfer_retry=QUICK
    )


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "weights"
    path.write_bytes(DATA)
    return path


def test_every_declared_checksum_is_verified(data_file: Path) -> None:
    declared = {
        "md5": hashlib.md5(DATA).hexdigest(),
        "crc32": f"{zlib.crc32(DATA):08x}",
        "crc32c": google_crc32c.Checksum(DATA).digest().hex(),
    }
    for algorithm in ("md5", "crc32", "crc32c"):
        record = verify_file(
            data_file, RemoteFile("weights", len(DATA), {algorithm: declared[algorithm]})
        )
        assert record.crc32c == declared["crc32c"]
        wrong = {algorithm: "0" * len(declared[algorithm])}
        with pytest.raises(IntegrityError, match=algorithm):
            verify_file(data_file, RemoteFile("weights", len(DATA), wrong))


def test_size_mismatch_is_an_integrity_error(data_file: Path) -> None:
    with pytest.raises(IntegrityError, match="got 1048576 bytes, the store declared 1048577"):
        verify_file(data_file, RemoteFile("weights", len(DATA) + 1))


def test_md5_is_skipped_when_a_faster_strong_checksum_is_declared(data_file: Path) -> None:
    crc = google_crc32c.Checksum(DATA).digest().hex()
    verify_file(data_file, RemoteFile("weights", len(DATA), {"crc32c": crc, "md5": "0" * 32}))


def _flaky_source(
    breaks: list[int],
) -> tuple[Callable[[int, int, Callable[[bytes], None]], None], list[tuple[int, int]]]:
    """A range source that breaks after the given byte counts, once each, and logs ranges asked."""
    asked: list[tuple[int, int]] = []

    def fetch_range(start: int, end: int, write: Callable[[bytes], None]) -> None:
        asked.append((start, end))
        for offset in range(start, end, 4096):
            if breaks and offset - start >= breaks[0]:
                breaks.pop(0)
                raise TransientStoreError("connection reset")
            write(DATA[offset : min(offset + 4096, end)])

    return fetch_range, asked


def test_parts_are_assembled_in_place(tmp_path: Path) -> None:
    fetch_range, asked = _flaky_source([])
    target = tmp_path / "out"
    download_in_parts(
        target,
        len(DATA),
        fetch_range,
        config=_config(100_000, 4),
        on_retry=lambda _: None,
    )
    assert target.read_bytes() == DATA
    assert len(asked) == 11


def test_a_broken_part_resumes_where_it_broke(tmp_path: Path) -> None:
    fetch_range, asked = _flaky_source([65536])
    retries: list[TransientStoreError] = []
    target = tmp_path / "out"
    download_in_parts(
        target,
        len(DATA),
        fetch_range,
        config=_config(len(DATA), 1),
        on_retry=retries.append,
    )
    assert target.read_bytes() == DATA
    assert asked == [(0, len(DATA)), (65536, len(DATA))]
    assert len(retries) == 1


def test_a_part_that_keeps_breaking_fails_the_download(tmp_path: Path) -> None:
    fetch_range, _ = _flaky_source([0, 0, 0, 0])
    with pytest.raises(TransientStoreError):
        download_in_parts(
            tmp_path / "out",
            len(DATA),
            fetch_range,
            config=_config(len(DATA), 1),
            on_retry=lambda _: None,
        )


def test_a_part_longer_than_asked_is_refused_before_it_is_written(tmp_path: Path) -> None:
    def fetch_range(start: int, end: int, write: Callable[[bytes], None]) -> None:
        write(DATA[start : end + 10])

    target = tmp_path / "out"
    with pytest.raises(IntegrityError, match="more than asked"):
        download_in_parts(
            target, 1000, fetch_range, config=_config(500, 1), on_retry=lambda _: None
        )
    assert target.read_bytes() == bytes(1000)  # the first part's bytes never reached the file


def test_nothing_is_written_past_the_declared_size(tmp_path: Path) -> None:
    """A store sending more than it declared is not a transfer fault to retry: the download
    stops at once, with the file at its declared size."""
    asked: list[tuple[int, int]] = []

    def fetch_range(start: int, end: int, write: Callable[[bytes], None]) -> None:
        asked.append((start, end))
        for offset in range(start, len(DATA), 4096):  # the whole megabyte, whatever was asked
            write(DATA[offset : offset + 4096])

    target = tmp_path / "out"
    with pytest.raises(VersionChangedError, match="more than the 10000 bytes it declared"):
        download_in_parts(
            target, 10_000, fetch_range, config=_config(10_000, 1), on_retry=lambda _: None
        )
    assert target.read_bytes() == DATA[:8192] + bytes(10_000 - 8192)
    assert asked == [(0, 10_000)]  # not retried


FetchRange = Callable[[int, int, Callable[[bytes], None]], None]
SHA256 = hashlib.sha256(DATA).hexdigest()
CRC32C = google_crc32c.Checksum(DATA).digest().hex()


def _fetch_in_parts(
    target: Path,
    fetch_range: FetchRange,
    config: TransferConfig,
    checksums: Mapping[str, str] | None = None,
) -> FetchedFile:
    """`fetch_file` of `DATA` (with ``checksums`` declared) in ranged parts from ``fetch_range``,
    its SHA-256 asked for, as a signature's check asks."""

    def download(file: RemoteFile, path: Path) -> Mapping[str, str]:
        download_in_parts(path, file.size, fetch_range, config=config, on_retry=lambda _: None)
        return checksums or {}

    return fetch_file(
        RemoteFile("weights", len(DATA)),
        target,
        download,
        policy=QUICK,
        on_retry=lambda _: None,
        digests=("sha256",),
    )


def _hashed_once(at_least: int) -> int:
    """From a part's fetch: how many bytes of the file the running `fetch_file` has hashed, once
    that is ``at_least`` (or 10 s passed; ``-1``: it hashes nothing while downloading)."""
    running = transfer._FILE_DOWNLOAD.get()
    deadline = time.monotonic() + 10
    while running is not None and running.digests is not None:
        if running.digests.length >= at_least or time.monotonic() > deadline:
            return running.digests.length
        time.sleep(0.01)
    return -1


def test_the_file_is_hashed_while_it_downloads_up_to_the_bytes_still_to_come(
    tmp_path: Path,
) -> None:
    """The digests are computed while the file downloads, over the bytes already final: those
    before the byte where an unfinished part stands (where a broken part resumes), never past
    it, even once the parts after it are written. When the last part comes, every byte before it
    was hashed: its verification has that part left to hash, and reads nothing again."""
    part = len(DATA) // 8
    broken_at, last = 2 * part + part // 2, len(DATA) - part
    fourth_written = threading.Event()
    hashed: dict[str, int] = {}
    part_source, _ = _flaky_source([])

    def fetch_range(start: int, end: int, write: Callable[[bytes], None]) -> None:
        if start == last:
            hashed["when the last part came"] = _hashed_once(last)
        if start == 2 * part:  # half of the third part, then a broken connection
            part_source(start, broken_at, write)
            fourth_written.wait(10)
            hashed["when the third part broke"] = _hashed_once(broken_at)
            raise TransientStoreError("connection reset")
        part_source(start, end, write)
        if start == 3 * part:
            fourth_written.set()

    fetched = _fetch_in_parts(tmp_path / "out", fetch_range, _config(part, 4))
    assert fourth_written.is_set()
    assert hashed == {"when the third part broke": broken_at, "when the last part came": last}
    assert (fetched.crc32c, fetched.digests) == (CRC32C, {"sha256": SHA256})


def test_digests_computed_as_parts_resume_midway_are_the_files(tmp_path: Path) -> None:
    breaks = [70_000, 10_000, 150_000, 30_000]
    fetch_range, asked = _flaky_source(list(breaks))
    part_size = 200_000
    # Whichever parts the breaks fall on (the lanes race for them), none runs out of tries.
    retry = RetryPolicy(attempts=len(breaks) + 1, base_delay=0.0, budget_seconds=5)
    config = TransferConfig(part_size=part_size, parts_in_flight=4, transfer_retry=retry)
    fetched = _fetch_in_parts(tmp_path / "out", fetch_range, config)
    assert any(start % part_size for start, _ in asked)  # parts resumed from where they broke
    assert (fetched.crc32c, fetched.digests) == (CRC32C, {"sha256": SHA256})
    assert (tmp_path / "out").read_bytes() == DATA


def test_a_part_corrupted_in_transit_fails_the_verification(tmp_path: Path) -> None:
    """A byte flipped in the first part, hashed while the others download, is caught by the
    declared SHA-256; what is left of the file is deleted."""
    part_source, _ = _flaky_source([])

    def fetch_range(start: int, end: int, write: Callable[[bytes], None]) -> None:
        if start == 0:
            write(bytes([DATA[0] ^ 1]))
            start += 1
        part_source(start, end, write)

    target = tmp_path / "out"
    with pytest.raises(IntegrityError, match="sha256 does not match"):
        _fetch_in_parts(target, fetch_range, _config(100_000, 4), {"sha256": SHA256})
    assert not target.exists()


#: Just over 3 MiB: several reads of a local copy, and a short last one.
LONG = bytes(range(251)) * (3 * 4200) + b"tail"


def _fetch_copy(source: Path, size: int, target: Path) -> tuple[FetchedFile, int]:
    """`fetch_file` of the first ``size`` bytes of ``source`` copied by `copy_into`, its SHA-256
    asked for: the file fetched, and how many bytes the copy had hashed when it returned."""
    hashed: list[int] = []

    def download(file: RemoteFile, path: Path) -> Mapping[str, str]:
        with source.open("rb") as reader:
            copy_into(path, reader.fileno(), file.size)
        running = transfer._FILE_DOWNLOAD.get()
        hashed.append(-1 if running is None or running.digests is None else running.digests.length)
        return {}

    fetched = fetch_file(
        RemoteFile("weights", size),
        target,
        download,
        policy=QUICK,
        on_retry=lambda _: None,
        digests=("sha256",),
    )
    return fetched, hashed[-1]


def test_a_local_copy_is_hashed_as_it_is_copied_and_stops_at_the_size_looked_up(
    tmp_path: Path,
) -> None:
    source, target = tmp_path / "source", tmp_path / "target"
    source.write_bytes(LONG + b"grown since it was looked up")
    fetched, hashed = _fetch_copy(source, len(LONG), target)
    assert target.read_bytes() == LONG
    assert hashed == len(LONG)  # every byte: its verification reads nothing again
    assert fetched.crc32c == google_crc32c.Checksum(LONG).digest().hex()
    assert fetched.digests == {"sha256": hashlib.sha256(LONG).hexdigest()}


def test_a_local_copy_of_a_file_that_ended_sooner_is_refused_and_deleted(tmp_path: Path) -> None:
    source, target = tmp_path / "source", tmp_path / "target"
    source.write_bytes(LONG)
    with pytest.raises(IntegrityError, match=f"got {len(LONG)} bytes"):
        _fetch_copy(source, len(LONG) + 10, target)
    assert not target.exists()


def test_digests_computed_as_the_file_was_written_are_still_compared_with_the_declared(
    tmp_path: Path,
) -> None:
    """Digests of the bytes as they were written stand in for reading the file, never for the
    checksums the store declared (here in its lookup): a mismatch is refused, the file deleted."""
    source, target = tmp_path / "source", tmp_path / "target"
    source.write_bytes(DATA)

    def download(file: RemoteFile, path: Path) -> Mapping[str, str]:
        with source.open("rb") as reader:
            copy_into(path, reader.fileno(), file.size)
        return {}

    with pytest.raises(IntegrityError, match="sha256 does not match"):
        fetch_file(
            RemoteFile("weights", len(DATA), {"sha256": "0" * 64}),
            target,
            download,
            policy=QUICK,
            on_retry=lambda _: None,
        )
    assert not target.exists()


def test_a_file_larger_than_declared_is_a_store_serving_another_version(data_file: Path) -> None:
    with pytest.raises(VersionChangedError, match="more than the 1048575 bytes it declared"):
        verify_file(data_file, RemoteFile("weights", len(DATA) - 1))


@pytest.mark.parametrize(
    ("content_range", "size"),
    [("bytes 0-99/41943040", 41943040), ("bytes 0-99/*", None), (None, None), ("junk", None)],
)
def test_the_stored_size_is_read_from_content_range(
    content_range: str | None, size: int | None
) -> None:
    assert stored_size(content_range) == size


def test_the_default_worst_case_is_seconds_not_minutes() -> None:
    """What docs/troubleshooting.md states a black-holed download can cost a request: the
    resolution's retry budget plus one transfer attempt's time limits."""
    assert DEFAULT_TRANSFER.worst_case_seconds() == 15.0 + 2.0 + 10.0


def test_a_file_of_one_part_is_fetched_and_hashed_on_the_calling_thread(tmp_path: Path) -> None:
    """A small file (one part) costs no hand-over to the read pool and back; the hashes of the
    file are still complete, and a failure of its part is still retried, then raised."""
    part_source, _ = _flaky_source([1000])
    threads: list[threading.Thread] = []

    def fetch_range(start: int, end: int, write: Callable[[bytes], None]) -> None:
        threads.append(threading.current_thread())
        part_source(start, end, write)

    fetched = _fetch_in_parts(tmp_path / "out", fetch_range, _config(len(DATA), 4))
    assert threads == [threading.current_thread()] * 2  # broken once, resumed
    assert (fetched.crc32c, fetched.digests) == (CRC32C, {"sha256": SHA256})

    def always_broken(start: int, end: int, write: Callable[[bytes], None]) -> None:
        raise TransientStoreError("connection reset")

    with pytest.raises(TransientStoreError, match="connection reset"):
        _fetch_in_parts(tmp_path / "broken", always_broken, _config(len(DATA), 4))


def _tiling(ranges: list[tuple[int, int]], size: int) -> bool:
    """Whether ``(start, length)`` ranges cover ``[0, size)`` exactly once."""
    covered = 0
    for start, length in sorted(ranges):
        if start != covered:
            return False
        covered += length
    return covered == size


def test_every_byte_written_is_started_on_its_way_to_the_disk_as_it_lands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Downloads in parts and local copies start the writeback of what they wrote, a step at a
    time (``sync_file_range``), so the fsync before a publish waits only for the last bytes."""
    started: list[tuple[int, int]] = []

    def sync_file_range(descriptor: int, start: int, length: int, flags: int) -> int:
        assert flags == transfer._SYNC_FILE_RANGE_WRITE  # start it, never wait for it
        started.append((start, length))
        return 0

    monkeypatch.setattr(transfer, "_sync_file_range", sync_file_range)
    monkeypatch.setattr(transfer, "_WRITEBACK_STEP", 100_000)
    fetch_range, _ = _flaky_source([150_000])
    _fetch_in_parts(tmp_path / "parts", fetch_range, _config(len(DATA) // 4, 4))
    assert _tiling(started, len(DATA)) and len(started) > 8
    assert max(length for _, length in started) < 100_000 + 4096  # a step and a chunk at most

    started.clear()
    source = tmp_path / "source"
    source.write_bytes(LONG)
    _fetch_copy(source, len(LONG), tmp_path / "copy")
    assert _tiling(started, len(LONG)) and len(started) > 1
