"""What a client-supplied adapter name may be.

A name is what a client writes in ``"model"``: untrusted. It is checked before any store or
filesystem call, so a hostile name can never reach a path or key outside a store's root.
"""

from __future__ import annotations

import re

MAX_NAME_LENGTH = 256
MAX_SEGMENTS = 8
#: A segment becomes a file name (``CACHE_DIR/NAME``, ``FS_DIR/NAME``): at most NAME_MAX bytes.
MAX_SEGMENT_LENGTH = 255
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
#: A revision after ``@`` (the Hub's branches and tags): up to 4 segments, 128 characters in all.
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*){0,3}")
MAX_REVISION_LENGTH = 128


def adapter_name_segments(name: str) -> tuple[str, ...] | None:
    """The ``/``-separated segments of a safe adapter name, or ``None`` if it is unsafe.

    Safe: 1 to 8 segments of ``[A-Za-z0-9][A-Za-z0-9._-]*`` joined by ``/``, each at most 255
    characters and 256 in all, no ``..`` anywhere. Everything else (absolute paths, backslashes,
    NUL, control or non-ASCII characters, percent-encoding, empty segments) is refused.

    >>> adapter_name_segments("team/sql-adapter")
    ('team', 'sql-adapter')
    >>> adapter_name_segments("../etc/passwd") is None
    True
    """
    if not name or len(name) > MAX_NAME_LENGTH or ".." in name:
        return None
    segments = tuple(name.split("/"))
    if len(segments) > MAX_SEGMENTS:
        return None
    if not all(
        len(segment) <= MAX_SEGMENT_LENGTH and _SEGMENT.fullmatch(segment) for segment in segments
    ):
        return None
    return segments


def is_safe_adapter_name(name: str) -> bool:
    """Whether ``name`` passes `adapter_name_segments`."""
    return adapter_name_segments(name) is not None


def is_safe_name(name: str) -> bool:
    """Whether ``name`` is safe to ask any of our resolvers about: a safe adapter name, optionally
    pinned with ``@REVISION`` (the Hub's syntax). Anything else is hostile, for every store.

    >>> is_safe_name("acme/adapters/sql@v2"), is_safe_name("sql@..")
    (True, False)
    """
    path, pinned, revision = name.partition("@")
    if pinned and (
        len(revision) > MAX_REVISION_LENGTH or ".." in revision or not _REVISION.fullmatch(revision)
    ):
        return False
    return is_safe_adapter_name(path)
