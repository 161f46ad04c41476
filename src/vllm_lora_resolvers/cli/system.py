"""What Linux tells about files: who holds ``flock`` locks (``/proc/locks``) and which
filesystem a path is on (``/proc/mounts``). Elsewhere both answers are empty."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

PROC_LOCKS = Path("/proc/locks")
PROC_MOUNTS = Path("/proc/mounts")

#: Filesystems whose ``flock`` and rename semantics a node-local cache must not rely on.
NETWORK_FILESYSTEMS = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "lustre", "9p", "afs"}
)
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")

#: A file as ``/proc/locks`` names it: device major, device minor, inode.
FileId = tuple[int, int, int]


def read_proc(path: Path) -> str:
    """The text of a ``/proc`` file; empty where there is none (not Linux)."""
    try:
        return path.read_text()
    except OSError:
        return ""


def flock_holders(locks: str) -> dict[FileId, list[int]]:
    """The PIDs holding ``flock`` locks on each file, from the text of ``/proc/locks``.

    A PID is 0 when its process is in a PID namespace this one cannot see.

    >>> flock_holders("1: FLOCK  ADVISORY  READ 4242 fe:01:1234 0 EOF")
    {(254, 1, 1234): [4242]}
    """
    holders: dict[FileId, list[int]] = {}
    for line in locks.splitlines():
        fields = line.split()
        # Waiters are listed as "N: -> FLOCK ...": they hold nothing yet.
        if len(fields) < 6 or fields[1] != "FLOCK":
            continue
        major, minor, inode = fields[5].split(":")
        holders.setdefault((int(major, 16), int(minor, 16), int(inode)), []).append(int(fields[4]))
    return holders


def file_id(path: Path) -> FileId | None:
    """How ``/proc/locks`` names ``path``; ``None`` if it is gone."""
    try:
        status = path.stat()
    except FileNotFoundError:
        return None
    return os.major(status.st_dev), os.minor(status.st_dev), status.st_ino


def holders_of(path: Path, holders: Mapping[FileId, list[int]]) -> list[int]:
    """The PIDs (0: not visible from here) holding a ``flock`` on ``path``."""
    identity = file_id(path)
    return [] if identity is None else holders.get(identity, [])


def filesystem_type(path: Path, mounts: str) -> str | None:
    """The type of the filesystem ``path`` (or its nearest existing parent) is on, from the text
    of ``/proc/mounts``; ``None`` if no mount matches.

    >>> filesystem_type(Path("/"), "/dev/sda / ext4 rw 0 0\\nserver:/export / nfs4 rw 0 0")
    'nfs4'
    """
    target = os.path.realpath(_nearest_existing(path))
    found: tuple[str, str] | None = None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        mount_point = _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), fields[1])
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        # Later lines mount over earlier ones at the same point: ">=" keeps the last.
        if inside and (found is None or len(mount_point) >= len(found[0])):
            found = (mount_point, fields[2])
    return None if found is None else found[1]


def is_network_filesystem(filesystem: str) -> bool:
    """Whether ``filesystem`` (a ``/proc/mounts`` type) is a network or FUSE filesystem."""
    return filesystem in NETWORK_FILESYSTEMS or filesystem.startswith("fuse")


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
