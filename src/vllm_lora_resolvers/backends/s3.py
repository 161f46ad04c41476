"""Adapters from S3 or any S3-compatible store (MinIO, R2, Ceph, SeaweedFS, ...).

Adapter ``NAME`` is the folder ``s3://bucket/prefix/NAME/``, or the version its pointer names once
published (`vllm_lora_resolvers.backends.published`). Its version is the set of (key, ETag, size)
of its adapter files, read with one ``ListObjectsV2`` of the part of that folder where those files
(and the pointer) sort, so a resolve costs the same in a bucket of ten adapters or ten thousand,
and in a folder that also holds thousands of checkpoints. Endpoints, regions and credentials come
from the standard AWS chain (``AWS_ENDPOINT_URL_S3``, profiles, IRSA, ...).
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, ClassVar, cast

from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
from botocore.session import Session

from vllm_lora_resolvers.backends.bucket import (
    BucketStore,
    StoredObject,
    parse_bucket_uri,
)
from vllm_lora_resolvers.config import S3_URI
from vllm_lora_resolvers.errors import (
    StoreRefusedError,
    StoreUnavailableError,
    TransientStoreError,
    VersionChangedError,
)
from vllm_lora_resolvers.remote import RemoteAdapter, RemoteFile
from vllm_lora_resolvers.transfer import TransferConfig, check_stored_size, stored_size

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import ListObjectsV2OutputTypeDef

_CHUNK = 1 << 20
#: Entries of a listing page (S3's most), and pages read at most to find one adapter's files.
_LOOKUP_PAGE_ENTRIES = 1000
_MAX_LOOKUP_PAGES = 10
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_MD5_ETAG = re.compile(r'^"?([0-9a-fA-F]{32})"?$')
_AWS_ENDPOINT = re.compile(r"^https://s3[.-]([a-z0-9-]+[.-])?amazonaws\.com(\.cn)?/?$")
# Error codes meaning "try again"; everything else from S3 is a configuration or access problem.
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "InternalError",
        "ServiceUnavailable",
        "503",
        "500",
        "502",
        "504",
    }
)
_CREDENTIAL_CODES = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "403",
        "401",
    }
)
#: A conditional write refused: the object is not (or no longer) what the condition says; AWS
#: answers 409 to a write racing another conditional write of the same key.
_CONDITION_FAILED_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict"})
_CHECKSUM_FIELDS = {
    "ChecksumSHA256": "sha256",
    "ChecksumSHA1": "sha1",
    "ChecksumCRC32": "crc32",
    "ChecksumCRC32C": "crc32c",
    "ChecksumCRC64NVME": "crc64nvme",
}


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket[/prefix]`` -> ``(bucket, prefix)`` with no slashes around the prefix."""
    return parse_bucket_uri(uri, "s3", _BUCKET, S3_URI.name)


class S3Store(BucketStore):
    """Adapters in an S3 bucket or an S3-compatible store's (see the module's docstring)."""

    backend: ClassVar[str] = "s3"

    def open_bucket(self, uri: str, transfer: TransferConfig) -> tuple[str, str, str | None]:
        """``s3://bucket[/prefix]``; the endpoint from the AWS configuration chain."""
        self.bucket, prefix = parse_s3_uri(uri)
        session = Session()
        self.client = make_s3_client(transfer.transfer_timeout, session)
        self.lookup_client = make_s3_client(transfer.lookup_timeout, session)
        # Made now, at start-up: botocore reads its paginator models (~10 ms) on the first one.
        self._listing = self.lookup_client.get_paginator("list_objects_v2")
        endpoint: str = self.client.meta.endpoint_url
        return f"s3://{self.bucket}", prefix, None if _AWS_ENDPOINT.match(endpoint) else endpoint

    def list_adapter_files(self, name: str, folder: str) -> dict[str, RemoteFile]:
        """``ListObjectsV2`` of ``folder`` from the adapter's config to its last weights name
        (to ``model.sig`` when signatures are checked).

        Keys sort byte-wise, so listing only keys that start with ``adapter_`` and come after
        ``adapter_config.jso`` skips whatever else the folder holds (checkpoints, logs): one
        request, and one more per 1,000 entries sorting among the adapter's own files. With the
        signature the range is wider (``adapter_config.json`` to ``model.sig``): still one
        request, subfolders counting one entry each.
        """
        first, last = min(self.file_names), max(self.file_names)
        pages = self._listing.paginate(
            Bucket=self.bucket,
            Prefix=folder + os.path.commonprefix(self.file_names),  # noqa: RUF071 - a key prefix
            StartAfter=folder + first[:-1],
            Delimiter="/",
            PaginationConfig={"PageSize": _LOOKUP_PAGE_ENTRIES},
        )
        listed = {}
        with store_errors(f"listing {self.location(folder)}"):
            for number, page in enumerate(pages, start=1):
                for item in page.get("Contents", []):
                    path = item["Key"][len(folder) :]
                    listed[path] = RemoteFile(path, item.get("Size", 0), etag=item.get("ETag", ""))
                if not page.get("IsTruncated") or _listed_past(page, folder + last):
                    break
                if number == _MAX_LOOKUP_PAGES:
                    raise self.crowded_folder(name, f"{number} listing pages")
        return listed

    def read_object(self, key: str, max_bytes: int) -> StoredObject | None:
        """One ``GET`` (with the lookups' time limits), read up to ``max_bytes + 1`` bytes."""
        with store_errors(f"reading {self.location(key)}"):
            try:
                response = self.lookup_client.get_object(Bucket=self.bucket, Key=key)
            except ClientError as error:
                if _error_code(error) == "NoSuchKey":
                    return None
                raise
            with contextlib.closing(response["Body"]) as body:
                return StoredObject(body.read(max_bytes + 1), response.get("ETag", ""))

    def upload_object(self, key: str, path: Path) -> bool:
        """One ``PutObject`` with ``If-None-Match: *`` (S3 takes up to 5 GiB in one)."""
        with path.open("rb") as body:
            return self._put_if(key, body, {"IfNoneMatch": "*"})

    def write_object(self, key: str, content: bytes, *, replacing: str | None) -> bool:
        """One ``PutObject`` with ``If-Match: replacing`` (or ``If-None-Match: *``)."""
        condition = {"IfNoneMatch": "*"} if replacing is None else {"IfMatch": replacing}
        return self._put_if(key, content, condition)

    def _put_if(self, key: str, body: bytes | BinaryIO, condition: Mapping[str, Any]) -> bool:
        with store_errors(f"writing {self.location(key)}"):
            try:
                self.client.put_object(Bucket=self.bucket, Key=key, Body=body, **condition)
            except ClientError as error:
                if _error_code(error) in _CONDITION_FAILED_CODES:
                    return False
                raise
        return True

    def list_subfolders(self, key: str) -> Iterator[str]:
        """One paginated ``ListObjectsV2`` with ``Delimiter="/"``."""
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=key, Delimiter="/"
        )
        with store_errors(f"listing s3://{self.bucket}/{key}"):
            for page in pages:
                for subfolder in page.get("CommonPrefixes", []):
                    yield subfolder.get("Prefix", "")

    def download(
        self, adapter: RemoteAdapter, file: RemoteFile, destination: Path
    ) -> Mapping[str, str]:
        """One ``GET`` of the whole object for a small file; ``HEAD`` then parallel ranged
        ``GET``s for a large one. Either way, nothing is written past the declared size, and an
        object the store says is of another size is not read at all.

        Every request is pinned to the listed object (its version id, else ``If-Match`` on its
        ETag), so the parts of one file always come from one version of it.
        """
        key = self.object_key(adapter, file)
        where = self.location(key)
        pin: dict[str, Any] = {"IfMatch": file.etag}
        checksums: dict[str, str] = {}
        if file.size > self.transfer.part_size:
            with store_errors(f"reading {where}"):
                head = self.client.head_object(
                    Bucket=self.bucket, Key=key, IfMatch=file.etag, ChecksumMode="ENABLED"
                )
            check_stored_size(file, head.get("ContentLength"))
            checksums = head_checksums(head)
            version = head.get("VersionId")
            if version not in (None, "null"):
                pin = {"VersionId": version}

        def fetch_range(start: int, end: int, write: Callable[[bytes], None]) -> None:
            whole = (start, end) == (0, file.size)
            asked: dict[str, Any] = (
                {"ChecksumMode": "ENABLED"} if whole else {"Range": f"bytes={start}-{end - 1}"}
            )
            with store_errors(f"reading bytes {start}-{end} of {where}"):
                response = self.client.get_object(Bucket=self.bucket, Key=key, **pin, **asked)
                body = response["Body"]
                try:
                    if whole:
                        check_stored_size(file, response.get("ContentLength"))
                        checksums.update(head_checksums(response))
                    else:
                        check_stored_size(file, stored_size(response.get("ContentRange")))
                    for chunk in body.iter_chunks(_CHUNK):
                        write(chunk)
                finally:
                    body.close()

        self.download_ranges(
            destination, file.size, fetch_range, declared_algorithms=tuple(checksums)
        )
        return checksums


def _error_code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", "Unknown"))


def _listed_past(page: ListObjectsV2OutputTypeDef, key: str) -> bool:
    """Whether a listing page reached ``key`` (entries come in key order)."""
    entries = [item["Key"] for item in page.get("Contents", [])]
    entries += [folder["Prefix"] for folder in page.get("CommonPrefixes", [])]
    return max(entries, default="") >= key


def head_checksums(head: Mapping[str, Any]) -> dict[str, str]:
    """The checksums a ``HeadObject`` response lets us verify, as lowercase hex.

    The ETag is an MD5 only for single-part objects without SSE-KMS or SSE-C encryption; the
    ``x-amz-checksum-*`` values only when they cover the full object (not ``...-N`` composites).
    """
    checksums: dict[str, str] = {}
    etag = _MD5_ETAG.match(head.get("ETag", ""))
    encrypted = head.get("ServerSideEncryption") in ("aws:kms", "aws:kms:dsse") or head.get(
        "SSECustomerAlgorithm"
    )
    if etag and not encrypted:
        checksums["md5"] = etag.group(1).lower()
    if head.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT":
        for field, algorithm in _CHECKSUM_FIELDS.items():
            value = head.get(field)
            if value and "-" not in value:
                checksums[algorithm] = base64.b64decode(value).hex()
    return checksums


def make_s3_client(
    timeout: tuple[float, float] = TransferConfig.transfer_timeout, session: Session | None = None
) -> S3Client:
    """A botocore S3 client from the standard AWS configuration chain, with these (connect, read)
    time limits and no retries of its own: the pipeline's are the only ones (`TransferConfig`).

    The clients of one ``session`` share what it read once: the configuration, the service's
    model and endpoint rules, and the credentials (a lookup that may ask the instance metadata
    service). Addressing is botocore's: path-style on an endpoint the configuration names
    (``AWS_ENDPOINT_URL_S3``, ...), as S3-compatible stores rarely have wildcard DNS for
    virtual-hosted buckets, and virtual-hosted on AWS's own.
    """
    connect, read = timeout
    config = Config(
        max_pool_connections=32,
        connect_timeout=connect,
        read_timeout=read,
        tcp_keepalive=True,
        retries={"total_max_attempts": 1},
    )
    return cast("S3Client", (session or Session()).create_client("s3", config=config))


@contextmanager
def store_errors(doing: str) -> Iterator[None]:
    """Turn botocore errors into our error types, with messages free of secrets."""
    try:
        yield
    except ClientError as error:
        code = _error_code(error)
        status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
        message = f"{doing} failed: {code} (HTTP {status})"
        if code in _TRANSIENT_CODES or status >= 500 or status == 429:
            raise TransientStoreError(message) from None
        if code in _CREDENTIAL_CODES:
            raise StoreRefusedError(
                f"{message}: the store refused our credentials; check the AWS credential chain "
                "(AWS_PROFILE, web identity / IRSA, instance role) and the bucket policy"
            ) from None
        if code == "PreconditionFailed":
            raise VersionChangedError(
                f"{message}: the object changed while it was being fetched"
            ) from None
        if code == "NoSuchBucket":
            raise StoreRefusedError(
                f"{message}: the bucket does not exist; check {S3_URI.name}"
            ) from None
        raise StoreUnavailableError(message) from None
    except NoCredentialsError:
        raise StoreRefusedError(
            f"{doing} failed: no AWS credentials found; configure the AWS credential chain"
        ) from None
    except (BotoCoreError, ConnectionError) as error:
        raise TransientStoreError(f"{doing} failed: {type(error).__name__}") from None
