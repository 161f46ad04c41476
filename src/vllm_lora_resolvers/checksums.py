"""Checksums of local bytes: those stores declare (MD5, SHA-1, SHA-256, CRC32, CRC32C,
CRC64NVME) and the CRC32C every cached file is recorded with, all in one pass over the bytes: as
a download writes them (`Digests`), or in one read of a file (`file_digests`)."""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

import google_crc32c

_CHUNK = 1 << 20
#: The checksum every snapshot file is recorded with: hardware-accelerated, and what GCS declares.
RECORDED = "crc32c"


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


class Digests:
    """Running digests of bytes fed in order: `RECORDED` and each algorithm asked for that this
    machine can compute."""

    def __init__(self, algorithms: Iterable[str] = ()) -> None:
        self._hashers: dict[str, _Hasher] = {RECORDED: _Crc32c()}
        for algorithm in algorithms:
            hasher = _hasher(algorithm)
            if hasher is not None:
                self._hashers[algorithm] = hasher
        #: Bytes fed so far.
        self.length = 0

    def update(self, data: bytes) -> None:
        """Feed the next ``data``."""
        for hasher in self._hashers.values():
            hasher.update(data)
        self.length += len(data)

    def covers(self, algorithms: Iterable[str]) -> bool:
        """Whether each of ``algorithms`` is computed here, or by no means on this machine."""
        return all(a in self._hashers or _hasher(a) is None for a in algorithms)

    def hexdigests(self) -> dict[str, str]:
        """The lowercase hex digest of the bytes fed, per algorithm."""
        return {algorithm: hasher.hexdigest() for algorithm, hasher in self._hashers.items()}


def file_digests(path: Path, algorithms: Iterable[str]) -> dict[str, str]:
    """The lowercase hex digests of ``path`` for each algorithm this machine can compute (always
    `RECORDED`), reading the file once."""
    digests = Digests(algorithms)
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK):
            digests.update(chunk)
    return digests.hexdigests()
