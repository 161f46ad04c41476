"""Store endpoints as the resolvers show them (cache keys, manifests, logs, messages)."""

from __future__ import annotations

from urllib.parse import urlsplit


def public_endpoint(endpoint: str) -> str:
    """``endpoint`` without what may carry a secret: ``user:password@``, a query, a fragment.

    An endpoint without them is returned unchanged, so the cache keys made from it stay the same.

    >>> public_endpoint("http://user:secret@minio.local:9000/s3?token=abc")
    'http://minio.local:9000/s3'
    >>> public_endpoint("user:secret@localhost:4443")
    'localhost:4443'
    """
    scheme, separator, rest = endpoint.partition("://")
    if not separator:
        scheme, rest = "", endpoint
    parts = urlsplit(f"//{rest}")  # as the clients split it: the host ends at / ? or #
    host = parts.netloc.rpartition("@")[2]
    return f"{scheme}{separator}{host}{parts.path}"
