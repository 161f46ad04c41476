"""The devtools test helpers really work: real SeaweedFS and moto servers, the fault relay."""

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import pytest
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ResponseStreamingError

from devtools.relay import Fault, FaultRelay
from devtools.stores import MotoS3, S3Endpoint, SeaweedS3, upload_folder

MB = 1 << 20


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    with SeaweedS3(tmp_path_factory.mktemp("seaweed")) as server:
        yield server


@pytest.fixture
def bucket(seaweed: SeaweedS3) -> str:
    name = f"b-{uuid.uuid4().hex[:12]}"
    seaweed.endpoint.client().create_bucket(Bucket=name)
    return name


@pytest.fixture
def relay(seaweed: SeaweedS3) -> Iterator[FaultRelay]:
    port = urlsplit(seaweed.endpoint.url).port
    assert port is not None
    with FaultRelay(port) as relay:
        yield relay


def via(relay: FaultRelay, endpoint: S3Endpoint) -> S3Endpoint:
    return S3Endpoint(relay.url, endpoint.access_key, endpoint.secret_key)


def test_seaweed_roundtrip_folder_and_multipart(
    seaweed: SeaweedS3, bucket: str, tmp_path: Path
) -> None:
    s3 = seaweed.endpoint.client()
    s3.put_object(Bucket=bucket, Key="a/b.txt", Body=b"hello")
    assert s3.get_object(Bucket=bucket, Key="a/b.txt")["Body"].read() == b"hello"

    (tmp_path / "adapter" / "sub").mkdir(parents=True)
    (tmp_path / "adapter" / "config.json").write_text("{}")
    (tmp_path / "adapter" / "sub" / "w.bin").write_bytes(b"w")
    upload_folder(s3, bucket, "lora/x", tmp_path / "adapter")
    listed = s3.list_objects_v2(Bucket=bucket, Prefix="lora/")["Contents"]
    assert sorted(o["Key"] for o in listed) == ["lora/x/config.json", "lora/x/sub/w.bin"]

    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(20 * MB))
    config = TransferConfig(multipart_threshold=8 * MB, multipart_chunksize=8 * MB)
    s3.upload_file(str(big), bucket, "big.bin", Config=config)
    assert s3.head_object(Bucket=bucket, Key="big.bin")["ETag"].endswith('-3"')
    s3.download_file(bucket, "big.bin", str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == big.read_bytes()


def test_moto_roundtrip() -> None:
    with MotoS3() as moto:
        s3 = moto.endpoint.client()
        s3.create_bucket(Bucket="moto-bucket")
        s3.put_object(Bucket="moto-bucket", Key="k", Body=b"data")
        assert s3.get_object(Bucket="moto-bucket", Key="k")["Body"].read() == b"data"
    with MotoS3() as moto:  # moto's per-process state was reset
        assert moto.endpoint.client().list_buckets()["Buckets"] == []


def test_relay_counts_requests(seaweed: SeaweedS3, bucket: str, relay: FaultRelay) -> None:
    s3 = via(relay, seaweed.endpoint).client()
    data = os.urandom(MB)
    s3.put_object(Bucket=bucket, Key="k", Body=data)
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == data
    s3.head_object(Bucket=bucket, Key="k")
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == data  # same connection
    assert relay.requests == [
        ("PUT", f"/{bucket}/k"),
        ("GET", f"/{bucket}/k"),
        ("HEAD", f"/{bucket}/k"),
        ("GET", f"/{bucket}/k"),
    ]
    assert 2 * MB <= relay.response_body_bytes < 2 * MB + 1000
    assert relay.connections == 1
    relay.reset_counters()
    assert (relay.requests, relay.response_body_bytes) == ([], 0)


def test_relay_503_is_retried_by_boto3(seaweed: SeaweedS3, bucket: str, relay: FaultRelay) -> None:
    s3 = via(relay, seaweed.endpoint).client()
    s3.put_object(Bucket=bucket, Key="k", Body=b"payload")
    relay.add_fault(Fault("status", method="GET", path_contains="/k", times=1))
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"payload"
    assert relay.requests.count(("GET", f"/{bucket}/k")) == 2
    relay.reset_counters()
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"payload"  # fault used up
    assert relay.requests == [("GET", f"/{bucket}/k")]


@pytest.mark.parametrize(
    ("kind", "error"),
    [
        pytest.param("reset_after", "reset", id="a reset raises"),
        pytest.param("close_after", "IncompleteRead", id="a close is a detected truncation"),
    ],
)
def test_relay_cut_mid_body_is_seen_by_boto3(
    seaweed: SeaweedS3,
    bucket: str,
    relay: FaultRelay,
    kind: Literal["reset_after", "close_after"],
    error: str,
) -> None:
    s3 = via(relay, seaweed.endpoint).client()
    s3.put_object(Bucket=bucket, Key="k", Body=os.urandom(4 * MB))
    relay.add_fault(Fault(kind, method="GET", after_bytes=MB))
    body = s3.get_object(Bucket=bucket, Key="k")["Body"]
    with pytest.raises(ResponseStreamingError, match=error):
        body.read()
    assert relay.response_body_bytes == MB
