"""A new small adapter's cold resolve: what the first token of every new adapter pays.

In one process, against one SeaweedFS on loopback: our cold resolve of a 30 KB adapter (lookup,
download, checks, publish into the node cache, lease) against the raw boto3 requests the same
resolve needs at least (one listing, two ``GetObject``), for other adapters of the same shape,
interleaved, medians of each round; the ratio is ours over the raw requests' (target <= 1.2).

A third side does the raw requests and then the least a durable, atomic copy needs: the two files
written into a new folder, each fsynced, the folder fsynced and renamed into place, its parent
fsynced (what our publish guarantees; the raw requests write nothing). Its ratio says what our
resolve costs above that floor: the checks, the lease, the name's link and the bookkeeping.

A last round goes through a relay that holds every request `NETWORK_DELAY` seconds, as a store
across a network answers later than one on loopback: there our two GETs at once save a round trip
that the raw requests, one after the other, pay.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlparse

from bench.common import report
from devtools.models import build_tiny_llama, write_lora_adapter
from devtools.relay import Fault, FaultRelay
from devtools.stores import SeaweedS3, upload_folder

ADAPTERS = 30
ROUNDS = 3
BUCKET = "bench-small"
#: Seconds the relay of the last round holds each request (a store a few ms away).
NETWORK_DELAY = 0.005


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_durably(folder: Path, files: dict[str, bytes]) -> None:
    """``files`` as a new ``folder``, all or nothing, on disk: written into a sibling staging
    folder, each file and the folder fsynced, renamed into place, the parent fsynced."""
    staging = folder.with_name(folder.name + ".staging")
    staging.mkdir()
    for name, body in files.items():
        descriptor = os.open(staging / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(descriptor, body)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    _fsync(staging)
    staging.rename(folder)
    _fsync(folder.parent)


def one_round(work: Path, round_index: int) -> tuple[float, float, float]:
    """Median seconds of our cold resolves (into a new node cache), of the raw requests, and of
    the raw requests followed by a durable copy (`write_durably`), interleaved."""
    from vllm_lora_resolvers.backends.s3 import S3Store, make_s3_client
    from vllm_lora_resolvers.cache import NodeCache
    from vllm_lora_resolvers.config import Settings
    from vllm_lora_resolvers.resolver import Resolver

    cache = work / f"cache-{round_index}"
    settings = Settings.from_environ({"VLLM_LORA_RESOLVER_CACHE_DIR": str(cache)}, argv=[])
    resolver = Resolver(S3Store(f"s3://{BUCKET}/adapters", settings, NodeCache(cache)))
    client = make_s3_client()
    model = str(work / "model")
    resolver.resolve(model, "warm-up")  # connections, client set-up
    copies = work / f"copies-{round_index}"
    copies.mkdir()
    ours: list[float] = []
    raw: list[float] = []
    durable: list[float] = []
    for index in range(ADAPTERS):
        started = time.perf_counter()
        resolver.resolve(model, f"ours-{index}")
        ours.append(time.perf_counter() - started)

        for kind, times in (("raw", raw), ("durable", durable)):
            started = time.perf_counter()
            prefix = f"adapters/{kind}-{index}/"
            listed = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix, Delimiter="/")
            keys = [item["Key"] for item in listed["Contents"]]
            bodies = {
                key.removeprefix(prefix): client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
                for key in keys
            }
            if kind == "durable":
                write_durably(copies / str(index), bodies)
            times.append(time.perf_counter() - started)
    return statistics.median(ours), statistics.median(raw), statistics.median(durable)


def _rows(label: str, ours: float, raw: float, durable: float) -> list[tuple[str, str]]:
    return [
        (
            f"{label}: ours / raw boto3 list + 2 gets (median ms)",
            f"{ours * 1000:.1f} / {raw * 1000:.1f} = {ours / raw:.2f}x",
        ),
        (
            f"{label}: ours / raw, then written durably (median ms)",
            f"{ours * 1000:.1f} / {durable * 1000:.1f} = {ours / durable:.2f}x",
        ),
    ]


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-small-") as directory:
        work = Path(directory)
        model = build_tiny_llama(work / "model")
        adapter = write_lora_adapter(work / "adapter", base_model=str(model))
        size = sum(path.stat().st_size for path in adapter.iterdir())
        with SeaweedS3(work / "seaweed") as server:
            endpoint = server.endpoint
            client = endpoint.client()
            client.create_bucket(Bucket=BUCKET)
            names = ["warm-up"] + [
                f"{kind}-{index}"
                for kind in ("ours", "raw", "durable")
                for index in range(ADAPTERS)
            ]
            for name in names:
                upload_folder(client, BUCKET, f"adapters/{name}", adapter)
            os.environ.update(endpoint.env())
            rows = []
            for round_index in range(ROUNDS):
                rows += _rows(f"round {round_index + 1}", *one_round(work, round_index))
            with FaultRelay(urlparse(endpoint.url).port or 80) as relay:
                relay.add_fault(Fault("delay", times=1 << 30, seconds=NETWORK_DELAY))
                os.environ.update(replace(endpoint, url=relay.url).env())
                held = f"each request held {NETWORK_DELAY * 1000:.0f} ms"
                rows += _rows(held, *one_round(work, ROUNDS))
    report(f"Small adapter ({size // 1000} KB) cold resolve, in-process, S3 (SeaweedFS)", rows)


if __name__ == "__main__":
    main()
