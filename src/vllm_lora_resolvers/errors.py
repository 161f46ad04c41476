"""Error types, so a caller can tell "not there" (``None``) from "there but broken" from
"store unreachable" without parsing messages.

vLLM answers HTTP 400 with the message of a `ValueError` and 500 with any other exception's, so
every message here is written for the client: what is wrong and what to do, and never a secret.
"""

from __future__ import annotations

import re
from typing import ClassVar

#: A store location in a message (``s3://bucket/key``, ``https://hub/org/repo/...``).
_LOCATION = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s'\"()<>]+", re.IGNORECASE)


class ResolverError(Exception):
    """Base of every error raised by this package."""


class InvalidAdapterError(ResolverError, ValueError):
    """The adapter exists but cannot be served as it is (HTTP 400 in vLLM)."""


class SignatureError(InvalidAdapterError):
    """The adapter has no signature, one by a signer this server does not trust, or one its
    files do not match (``VLLM_LORA_RESOLVER_TRUST``): HTTP 400, ``outcome="untrusted"``."""


class StoreUnavailableError(ResolverError, RuntimeError):
    """The store could not be asked or read, and nothing usable is cached."""


class StoreRefusedError(StoreUnavailableError):
    """The store answered, and refused: credentials, permissions, a missing bucket or repo.
    An answer, not an outage: cached copies of its adapters are not served meanwhile."""


class TransientStoreError(StoreUnavailableError):
    """A failure worth retrying: throttling, 5xx, a broken connection, a bad transfer.

    ``retried`` is set once a retry layer gave up on it: no other layer retries it again.
    """

    retried: bool = False


class IntegrityError(TransientStoreError):
    """Downloaded bytes do not match the size or checksum the store declared."""


class CacheError(ResolverError, OSError):
    """The node-local cache cannot be used (not writable, disk full, ...)."""


class CacheFullError(CacheError):
    """The node-local cache's disk is full."""


class VersionChangedError(StoreUnavailableError):
    """The adapter changed in the store while it was being fetched: look it up again.

    The store answered otherwise than it declared the version (another size or ETag): one that
    declares the same version again and again answers otherwise does not serve it as it says,
    and the version is refused (``contradicts_declaration``)."""

    contradicts_declaration: ClassVar[bool] = True


class FilesChangedError(VersionChangedError):
    """A local file was seen to change (replaced, rewritten, gone) while it was copied. Its
    version is the files' identity, so the same version found again is the very same files back
    (a folder swapped back, say), never a store answering otherwise than it declared."""

    contradicts_declaration: ClassVar[bool] = False


def for_clients(error: ResolverError) -> ResolverError:
    """``error`` as an API client may read it: the adapter's name and what is wrong, with every
    store location replaced (where the store keeps it is the server log's to tell)."""
    message = _LOCATION.sub("<the store>", str(error))
    if message == str(error):
        return error
    return type(error)(message)
