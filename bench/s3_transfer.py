"""S3 resolver against the tools people use today, all against one SeaweedFS on loopback.

1. Cold resolve of a 400 MB adapter (config + one weights file) as a one-shot process, as in an
   init container: ``vllm-lora pull`` from its start to its exit, against ``aws s3 cp
   --recursive`` and ``s5cmd cp`` of the same folder (medians, same run); the resolve alone, as
   inside a running server, which tells the one-shot's start-up and exit apart; and the floor of
   any Python S3 client's one-shot (the interpreter, botocore, a client and one listing), which
   with the resolve alone bounds what start-up work can win.
2. Peak RSS growth of a process resolving a 1 GB adapter file (target under 150 MB).
3. Store requests per resolve, cold and warm, in a bucket of 10 adapters and of 10,000.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

from bench.common import median_seconds, report
from devtools.models import write_large_adapter
from devtools.relay import FaultRelay
from devtools.stores import S3Endpoint, SeaweedS3, upload_folder

BASE_MODEL = "/models/tiny-llama"
RUNS = 5
MB = 10**6
#: Child processes run this checkout's code (an editable install may point at another one).
_THIS_CHECKOUT = {"PYTHONPATH": str(Path(__file__).parents[1] / "src")}

_BOTOCORE_ALONE = (
    "import botocore.session\n"
    "client = botocore.session.Session().create_client('s3')\n"
    "client.list_objects_v2(Bucket='bench-folder', Prefix='adapters/big/', MaxKeys=1)\n"
)

_RESOLVE_ONCE = """
import json, sys, threading, time
from pathlib import Path
from vllm_lora_resolvers.backends.s3 import S3Store
from vllm_lora_resolvers.cache import NodeCache
from vllm_lora_resolvers.config import Settings
from vllm_lora_resolvers.resolver import Resolver

def rss_kib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

uri, cache, name = sys.argv[1:4]
settings = Settings.from_environ(
    {"VLLM_LORA_RESOLVER_CACHE_DIR": cache, "VLLM_LORA_RESOLVER_MAX_RANK": "100000000"}, argv=[]
)
resolver = Resolver(S3Store(uri, settings, NodeCache(Path(cache))))
before, peak, done = rss_kib(), [0], threading.Event()

def sample():  # the peak while resolving, sampled every 5 ms (ru_maxrss also counts start-up)
    while not done.wait(0.005):
        peak[0] = max(peak[0], rss_kib())

sampler = threading.Thread(target=sample)
sampler.start()
started = time.perf_counter()
assert resolver.resolve("/models/tiny-llama", name) is not None
seconds = time.perf_counter() - started
done.set()
sampler.join()
print(json.dumps({"rss_growth_kib": max(peak[0], rss_kib()) - before, "seconds": seconds}))
"""


def _run(command: list[str], environment: dict[str, str]) -> str:
    completed = subprocess.run(
        command, env={**os.environ, **environment}, capture_output=True, text=True, check=False
    )
    if completed.returncode != 0:
        raise RuntimeError(f"{command[0]} failed: {completed.stderr[-2000:]}")
    return completed.stdout


def _resolve_in_process(endpoint: S3Endpoint, uri: str, cache: Path, name: str) -> dict[str, float]:
    environment = {**endpoint.env(), **_THIS_CHECKOUT}
    output = _run([sys.executable, "-c", _RESOLVE_ONCE, uri, str(cache), name], environment)
    result: dict[str, float] = json.loads(output.strip().splitlines()[-1])
    return result


def folder_download(endpoint: S3Endpoint, work: Path) -> list[tuple[str, str]]:
    client = endpoint.client()
    client.create_bucket(Bucket="bench-folder")
    source = write_large_adapter(work / "src", base_model=BASE_MODEL, size_bytes=400 * MB)
    upload_folder(client, "bench-folder", "adapters/big", source)
    size = sum(path.stat().st_size for path in source.iterdir())
    environment = endpoint.env()
    tools = Path(sys.executable).parent
    target = work / "target"

    def fresh_target() -> Path:
        shutil.rmtree(target, ignore_errors=True)
        return target

    in_server: list[float] = []

    def resolve_alone() -> None:
        result = _resolve_in_process(endpoint, "s3://bench-folder/adapters", fresh_target(), "big")
        in_server.append(result["seconds"])

    def vllm_lora_pull() -> None:
        _run(
            [str(tools / "vllm-lora"), "pull", "big", "--base-model", BASE_MODEL],
            {
                **environment,
                **_THIS_CHECKOUT,
                "VLLM_LORA_RESOLVER_S3_URI": "s3://bench-folder/adapters",
                "VLLM_LORA_RESOLVER_CACHE_DIR": str(fresh_target()),
                "VLLM_LORA_RESOLVER_MAX_RANK": "100000000",
            },
        )

    def botocore_alone() -> None:
        _run([sys.executable, "-c", _BOTOCORE_ALONE], environment)

    def aws_cli() -> None:
        _run(
            [
                str(tools / "aws"),
                "s3",
                "cp",
                "--recursive",
                "--quiet",
                "s3://bench-folder/adapters/big/",
                str(fresh_target()),
            ],
            {**environment, "AWS_ENDPOINT_URL": endpoint.url},
        )

    def s5cmd() -> None:
        _run(
            [
                str(tools / "s5cmd"),
                "--endpoint-url",
                endpoint.url,
                "cp",
                "s3://bench-folder/adapters/big/*",
                f"{fresh_target()}/",
            ],
            environment,
        )

    timings = {}
    one_shots = (("vllm-lora pull", vllm_lora_pull), ("aws s3 cp", aws_cli), ("s5cmd cp", s5cmd))
    for label, operation in one_shots:
        operation()  # warm-up
        timings[label] = median_seconds(operation, RUNS)
    botocore_alone()  # warm-up
    floor = median_seconds(botocore_alone, RUNS)
    resolve_alone()  # warm-up
    in_server.clear()
    for _ in range(RUNS):
        resolve_alone()
    shutil.rmtree(target, ignore_errors=True)
    rows = [
        (f"{label} (median of {RUNS}, start to exit)", f"{s:.2f} s = {size / s / MB:.0f} MB/s")
        for label, s in timings.items()
    ]
    pull = timings["vllm-lora pull"]
    resolve = statistics.median(in_server)
    rows += [
        (
            "ours, the resolve alone (as inside a running server)",
            f"{resolve:.2f} s = {size / resolve / MB:.0f} MB/s",
        ),
        ("vllm-lora pull: start-up and exit (one-shot - resolve alone)", f"{pull - resolve:.2f} s"),
        (
            f"floor: python + botocore + one listing (median of {RUNS}, start to exit)",
            f"{floor:.2f} s",
        ),
        (
            "vllm-lora pull vs aws s3 cp (time ratio, < 1 is faster)",
            f"{pull / timings['aws s3 cp']:.2f}x",
        ),
        (
            "vllm-lora pull vs s5cmd (throughput ratio, target >= 0.8)",
            f"{timings['s5cmd cp'] / pull:.2f}x",
        ),
        (
            "at best, the floor + the resolve alone vs s5cmd (throughput ratio)",
            f"{timings['s5cmd cp'] / (floor + resolve):.2f}x",
        ),
    ]
    return rows


def memory_growth(endpoint: S3Endpoint, work: Path) -> list[tuple[str, str]]:
    client = endpoint.client()
    client.create_bucket(Bucket="bench-memory")
    source = write_large_adapter(work / "huge", base_model=BASE_MODEL, size_bytes=1000 * MB)
    upload_folder(client, "bench-memory", "adapters/huge", source)
    shutil.rmtree(source)
    result = _resolve_in_process(endpoint, "s3://bench-memory/adapters", work / "cache", "huge")
    growth_mb = result["rss_growth_kib"] * 1024 / MB
    return [("peak RSS growth resolving a 1 GB file (target < 150 MB)", f"{growth_mb:.0f} MB")]


def _fill_bucket(client: Any, bucket: str, count: int, config: bytes) -> None:
    """``count`` adapter folders (configs only: listing cost is what is measured)."""
    put = partial(client.put_object, Bucket=bucket, Body=config)
    keys = [f"adapters/filler-{i:05d}/adapter_config.json" for i in range(count)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda key: put(Key=key), keys))


def requests_per_resolve(endpoint: S3Endpoint, work: Path) -> list[tuple[str, str]]:
    from vllm_lora_resolvers.backends.s3 import S3Store
    from vllm_lora_resolvers.cache import NodeCache
    from vllm_lora_resolvers.config import Settings
    from vllm_lora_resolvers.resolver import Resolver

    client = endpoint.client()
    source = write_large_adapter(work / "small", base_model=BASE_MODEL, size_bytes=MB)
    upstream = int(endpoint.url.rsplit(":", 1)[1])
    rows = []
    for count in (10, 10_000):
        bucket = f"bench-requests-{count}"
        client.create_bucket(Bucket=bucket)
        _fill_bucket(client, bucket, count, (source / "adapter_config.json").read_bytes())
        upload_folder(client, bucket, "adapters/target", source)
        with FaultRelay(upstream) as relay:
            relayed = S3Endpoint(relay.url, endpoint.access_key, endpoint.secret_key)
            saved = {k: os.environ.get(k) for k in relayed.env()}
            os.environ.update(relayed.env())
            try:
                cache = work / f"cache-{count}"
                settings = Settings.from_environ(
                    {
                        "VLLM_LORA_RESOLVER_CACHE_DIR": str(cache),
                        "VLLM_LORA_RESOLVER_MAX_RANK": "100000",
                    },
                    argv=[],
                )
                resolver = Resolver(S3Store(f"s3://{bucket}/adapters", settings, NodeCache(cache)))
                relay.reset_counters()
                resolver.resolve(BASE_MODEL, "target")
                cold = len(relay.requests)
                relay.reset_counters()
                resolver.resolve(BASE_MODEL, "target")
                warm = len(relay.requests)
            finally:
                for key, value in saved.items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value
        rows.append(
            (f"requests per resolve, bucket of {count} adapters (cold / warm)", f"{cold} / {warm}")
        )
    return rows


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-s3-") as directory:
        work = Path(directory)
        with SeaweedS3(work / "seaweed") as server:
            rows = folder_download(server.endpoint, work / "folder")
            rows += memory_growth(server.endpoint, work / "memory")
            rows += requests_per_resolve(server.endpoint, work / "requests")
    report("S3 resolver (SeaweedFS on loopback)", rows)


if __name__ == "__main__":
    main()
