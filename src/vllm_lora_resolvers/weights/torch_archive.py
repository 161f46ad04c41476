"""A ``torch.save`` zip archive, checked member by member as ``torch.load`` would read it.

``torch.load`` treats a file as a zip only if it starts with a zip entry; anything else it
unpickles from the front, so a legacy pickle with a harmless zip appended would pass a looser
test and run its pickle. Accepted here is exactly what ``torch.save`` writes: a zip from offset 0,
members stored uncompressed under one ``<archive>/`` folder (so no member expands beyond its size
on disk), ``data.pkl`` (at most `MAX_PICKLE_BYTES`), a version record, the bookkeeping records of
recent torch versions, and one ``data/<key>`` record per storage the pickle loads, of exactly the
storage's size. The pickle is run by `pickle_vm`, never unpickled.
"""

from __future__ import annotations

import re
import struct
import zipfile
from pathlib import Path
from typing import IO

from vllm_lora_resolvers.weights import TensorSpec, malformed, shown_name
from vllm_lora_resolvers.weights.pickle_vm import StateDict, read_state_dict

# A state dict's pickle takes about 130 bytes per tensor: ~30,000 tensors; use safetensors for more.
MAX_PICKLE_BYTES = 4 << 20
# torch.save writes about 70 bytes of zip directory per member, one member per storage.
_MAX_DIRECTORY_BYTES = MAX_PICKLE_BYTES
_RECORD = re.compile(
    r"data\.pkl|data/[0-9]+|version|\.data/version|byteorder|\.format_version"
    r"|\.storage_alignment|\.data/serialization_id"
)
_DATA_RECORD = re.compile(r"data/([0-9]+)")
_END_BYTES, _ZIP64_BYTES = 22, 56 + 20  # end of directory; zip64 end of directory and locator


def read_torch_archive(path: Path) -> dict[str, TensorSpec]:
    """The tensors a ``torch.save`` file holds; `WeightsError` unless torch would load them."""
    with path.open("rb") as stream:
        if stream.read(4) != b"PK\x03\x04":
            raise malformed("it is not a torch.save zip archive; convert it to safetensors")
        _check_directory_size(stream, path.stat().st_size)
        try:
            with zipfile.ZipFile(stream) as archive:
                records = _records(archive)
                if "data.pkl" not in records:
                    raise malformed("the archive has no data.pkl")
                state = read_state_dict(_read_pickle(archive, records["data.pkl"]))
                _check_records(records, state)
        except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError):
            raise malformed("its zip structure cannot be read") from None
    return {name: TensorSpec(t.storage.dtype, t.shape) for name, t in state.tensors.items()}


def _check_directory_size(stream: IO[bytes], size: int) -> None:
    """Bound the zip directory before `zipfile` reads all of it, found as `zipfile` finds it."""
    tail_bytes = min(size, _END_BYTES + _ZIP64_BYTES)
    stream.seek(size - tail_bytes)
    tail = stream.read(tail_bytes)
    end, zip64 = tail[-_END_BYTES:], tail[:-_END_BYTES]
    if len(end) < _END_BYTES or end[:4] != b"PK\x05\x06" or end[-2:] != b"\0\0":
        raise malformed("its zip directory does not end the file")
    (directory_bytes,) = struct.unpack_from("<I", end, 12)
    has_zip64 = len(zip64) == _ZIP64_BYTES and zip64[-20:-16] == b"PK\x06\x07"
    if has_zip64 and zip64.startswith(b"PK\x06\x06"):
        (directory_bytes,) = struct.unpack_from("<Q", zip64, 40)
    if directory_bytes > _MAX_DIRECTORY_BYTES:
        raise malformed(
            f"its zip directory is larger than {_MAX_DIRECTORY_BYTES} bytes; "
            "torch.save writes about 70 bytes per tensor"
        )


def _records(archive: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """Members by record name (the part after ``<archive>/``), each as torch.save writes it."""
    members = archive.infolist()
    folder = members[0].filename.partition("/")[0] if members else ""
    records: dict[str, zipfile.ZipInfo] = {}
    for member in members:
        prefix, _, record = member.filename.partition("/")
        if prefix != folder or not _RECORD.fullmatch(record):
            raise malformed(f"member {shown_name(member.filename)} is not one torch.save writes")
        if record in records:
            raise malformed(f"member {shown_name(member.filename)} appears twice")
        if member.compress_type != zipfile.ZIP_STORED or member.flag_bits & 0x1:
            raise malformed(
                f"member {shown_name(member.filename)} is compressed or encrypted; "
                "torch.save stores every member as it is"
            )
        records[record] = member
    return records


def _read_pickle(archive: zipfile.ZipFile, member: zipfile.ZipInfo) -> bytes:
    if member.file_size > MAX_PICKLE_BYTES:
        raise malformed(f"its data.pkl is larger than {MAX_PICKLE_BYTES} bytes")
    with archive.open(member) as stream:
        return stream.read(MAX_PICKLE_BYTES)


def _check_records(records: dict[str, zipfile.ZipInfo], state: StateDict) -> None:
    """Version and storage records: present, and each storage's of exactly its size."""
    if "version" not in records and ".data/version" not in records:
        raise malformed("the archive has no version record, which torch.load needs")
    stored = {match[1] for match in map(_DATA_RECORD.fullmatch, records) if match}
    unused = sorted(stored - state.storages.keys())
    if unused:
        raise malformed(f"record data/{unused[0]} belongs to no tensor")
    for key, storage in state.storages.items():
        record = records.get(f"data/{key}")
        if record is None or record.file_size != storage.nbytes:
            raise malformed(
                f"storage {key} needs a data/{key} record of {storage.nbytes} bytes, "
                f"the archive has {'none' if record is None else record.file_size}"
            )
