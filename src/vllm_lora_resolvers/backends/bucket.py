"""What the object-store backends (S3, GCS) share: ``scheme://bucket[/prefix]`` and key layout."""

from __future__ import annotations

import re

from vllm_lora_resolvers.config import ConfigurationError


def parse_bucket_uri(
    uri: str, scheme: str, bucket: re.Pattern[str], variable: str
) -> tuple[str, str]:
    """``scheme://bucket[/prefix]`` -> ``(bucket, prefix)``, the prefix without slashes around.

    >>> parse_bucket_uri("s3://adapters/prod/", "s3", re.compile("[a-z]+"), "VAR")
    ('adapters', 'prod')
    """
    match = re.fullmatch(rf"{scheme}://([^/]+)/?(.*)", uri.strip())
    if match is None or not bucket.fullmatch(match.group(1)):
        raise ConfigurationError(
            f"{variable}={uri!r} is not {scheme}://BUCKET[/PREFIX] with a valid bucket name"
        )
    return match.group(1), match.group(2).strip("/")


def folder_key(prefix: str, name: str) -> str:
    """The key prefix of folder ``name`` under ``prefix`` (``""``: the prefix itself). Names are
    safe (no ``..``, no leading ``/``), so the key can never leave the prefix.

    >>> folder_key("prod", "team/sql"), folder_key("prod", ""), folder_key("", "")
    ('prod/team/sql/', 'prod/', '')
    """
    return "".join(f"{part}/" for part in (prefix, name) if part)
