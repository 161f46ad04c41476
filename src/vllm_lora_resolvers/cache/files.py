"""What the parts of the cache share: its locks (every "in progress" is a lock the kernel drops
when its process dies), deleting trees, and the errors of writing to its disk."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import stat
from pathlib import Path

from vllm_lora_resolvers.cache.layout import LEASE
from vllm_lora_resolvers.errors import CacheError, CacheFullError

#: Write errors that mean "this disk": full, over quota, read-only, not ours to write.
CACHE_DISK_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}
)


def cache_write_error(error: OSError) -> CacheError:
    """A `CacheError` for a failed write in the cache, saying what to do about it (without
    the server's paths: clients read it)."""
    where = "cannot write to the adapter cache (VLLM_LORA_RESOLVER_CACHE_DIR)"
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return CacheFullError(
            f"{where}: the disk is full; free space or lower VLLM_LORA_RESOLVER_CACHE_MAX_BYTES"
        )
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        advice = "it is not writable by this process; fix its permissions or mount"
    else:
        advice = error.strerror or type(error).__name__
    return CacheError(f"{where}: {advice}")


def is_locked(path: Path) -> bool:
    """Whether a live process holds a lock on ``path`` (a snapshot's lease file, a process's
    scratch folder), without keeping one."""
    try:
        descriptor = lock_unless_held(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    if descriptor is None:
        return True
    os.close(descriptor)
    return False


def lock_unless_held(path: Path) -> int | None:
    """An exclusive ``flock`` on ``path``, taken without waiting, as a descriptor to close when
    done; ``None`` if a live process holds a lock on it."""
    descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        return None
    return descriptor


def move_unless_leased(path: Path, destination: Path) -> bool:
    """Rename snapshot folder ``path`` to ``destination`` unless a live process leases it."""
    try:
        descriptor = lock_unless_held(path / LEASE)
    except FileNotFoundError:
        return False
    if descriptor is None:
        return False
    try:
        path.rename(destination)
    finally:
        os.close(descriptor)
    return True


def lock_file(path: Path, *, wait: bool) -> int | None:
    """An exclusive ``flock`` on the lock file ``path`` (created if need be), as a descriptor to
    keep open while it is held; ``None`` if ``wait`` is false and a live process holds it.

    Lock files are removed by their holder when done (`unlock_and_remove`), so one locked after
    waiting may be gone from the folder: then it is taken again, on the file now at ``path``.
    """
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(descriptor)
            return None
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(descriptor), path.stat()):
                return descriptor
        os.close(descriptor)  # removed (or replaced) by its last holder meanwhile


def unlock_and_remove(path: Path, descriptor: int) -> None:
    """Remove the lock file while still holding it, then release it: a waiter holding the old
    file sees it removed and takes the new one, so ``locks/`` never grows."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    os.close(descriptor)


def remove_tree(path: Path) -> None:
    """Delete ``path`` and everything below it, read-only folders included."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
        return
    for directory, _, _ in os.walk(path):
        with contextlib.suppress(OSError):
            Path(directory).chmod(stat.S_IRWXU)
    shutil.rmtree(path, ignore_errors=True)
