"""The cost of ``VLLM_LORA_RESOLVER_TRUST``: cold resolves of a 400 MB signed adapter from S3
(SeaweedFS on loopback), with the signature checked against without (same run, alternated so
that a shared machine's drift hits both alike); target: under 10% more.

The check reads no byte again: the SHA-256 the signature holds for each file is computed while
the file downloads, with the CRC32C the cache records (`transfer.download_in_parts`). What it adds
is the SHA-256's CPU time (on loopback, beside a download that already keeps the cores busy), the
signature's download and its check.

On a machine whose cores the store server shares, that CPU time sets a floor: a resolve cannot
take less than all the CPU time it costs (ours and the server's) spread over every core, nor less
than the unverified resolve. The bench prints both CPU times and that floor beside the ratio.

A second pair reads one ranged part at a time instead of `TransferConfig.parts_in_flight`: on
loopback the download then costs about as long, with less CPU, so the hashing finds more of a
core free, as beside a remote store whose network, not our cores, sets the pace.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from unittest import mock

from bench.common import report
from devtools.models import write_large_adapter
from devtools.signing_keys import key_pair, sign_with_key
from devtools.stores import SeaweedS3, upload_folder
from vllm_lora_resolvers.backends.s3 import S3Store
from vllm_lora_resolvers.cache import NodeCache
from vllm_lora_resolvers.config import Settings
from vllm_lora_resolvers.resolver import Resolver
from vllm_lora_resolvers.transfer import DEFAULT_TRANSFER, TransferConfig

BASE_MODEL = "/models/tiny-llama"
RUNS = 8
MB = 10**6
SIZE = 400 * MB


def cpu_seconds(pid: int) -> float:
    """CPU time (user and system) process ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _medians(samples: list[tuple[float, float]]) -> tuple[float, float]:
    """Median seconds and median CPU seconds of ``samples``."""
    return statistics.median(s for s, _ in samples), statistics.median(c for _, c in samples)


def cold_resolves(work: Path) -> list[tuple[str, str]]:
    source = write_large_adapter(work / "big", base_model=BASE_MODEL, size_bytes=SIZE)
    keys = key_pair(work / "keys")  # as a release pipeline would sign it
    sign_with_key(source, keys)
    public = keys.public
    with SeaweedS3(work / "seaweed") as server:
        client = server.endpoint.client()
        client.create_bucket(Bucket="bench-signing")
        upload_folder(client, "bench-signing", "adapters/big", source)
        environment = server.endpoint.env()
        runs = iter(range(10_000))

        def resolve(trust: str | None, transfer: TransferConfig) -> tuple[float, float]:
            """Seconds of one cold resolve, and the CPU seconds it cost both processes."""
            cache = work / f"cache-{next(runs)}"
            variables = {
                "VLLM_LORA_RESOLVER_CACHE_DIR": str(cache),
                "VLLM_LORA_RESOLVER_MAX_RANK": "100000000",
                **({"VLLM_LORA_RESOLVER_TRUST": trust} if trust else {}),
            }
            settings = Settings.from_environ(variables, argv=[])
            with mock.patch.dict(os.environ, environment):
                resolver = Resolver(
                    S3Store("s3://bench-signing/adapters", settings, NodeCache(cache), transfer)
                )
                cpu = time.process_time() + cpu_seconds(server.pid)
                started = time.perf_counter()
                resolved = resolver.resolve(BASE_MODEL, "big")
                seconds = time.perf_counter() - started
                cpu = time.process_time() + cpu_seconds(server.pid) - cpu
            assert resolved is not None
            shutil.rmtree(cache, ignore_errors=True)
            return seconds, cpu

        trusted = f"key:{public}"
        resolve(None, DEFAULT_TRANSFER)  # warm-up: the server's and the page cache's
        resolve(trusted, DEFAULT_TRANSFER)

        def in_turns(transfer: TransferConfig) -> tuple[tuple[float, float], tuple[float, float]]:
            """Medians (seconds, CPU seconds) of unverified and of verified resolves, each
            first every other run."""
            plain: list[tuple[float, float]] = []
            checked: list[tuple[float, float]] = []
            for run in range(RUNS):
                order = ((plain, None), (checked, trusted))
                for samples, trust in order if run % 2 == 0 else reversed(order):
                    samples.append(resolve(trust, transfer))
            return _medians(plain), _medians(checked)

        (unverified, plain_cpu), (verified, checked_cpu) = in_turns(DEFAULT_TRANSFER)
        (one_part, _), (one_part_verified, _) = in_turns(
            replace(DEFAULT_TRANSFER, parts_in_flight=1)
        )
    started = time.perf_counter()
    with (source / "adapter_model.safetensors").open("rb") as stream:
        hashlib.file_digest(stream, "sha256")
    hashing = time.perf_counter() - started
    ratio = verified / unverified
    one_part_ratio = one_part_verified / one_part
    cores = len(os.sched_getaffinity(0))
    floor = max(1.0, checked_cpu / cores / unverified)
    return [
        (f"cold resolve of {SIZE // MB} MB, unverified (median of {RUNS})", f"{unverified:.2f} s"),
        (f"cold resolve of {SIZE // MB} MB, signature checked (median)", f"{verified:.2f} s"),
        ("verified / unverified (target < 1.10)", f"{ratio:.3f}x ({(ratio - 1) * 100:+.1f}%)"),
        ("SHA-256 of the weights alone, what the check adds", f"{hashing:.2f} s"),
        (
            "CPU per resolve, ours and the store server's: unverified / verified (median)",
            f"{plain_cpu:.2f} / {checked_cpu:.2f} s",
        ),
        (
            f"floor on {cores} cores: max(1, verified CPU / {cores} / unverified wall)",
            f"{floor:.3f}x",
        ),
        (
            "one part in flight: unverified / verified (median)",
            f"{one_part:.2f} / {one_part_verified:.2f} s = {one_part_ratio:.3f}x",
        ),
    ]


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-signing-") as directory:
        rows = cold_resolves(Path(directory))
    report("signed adapters (VLLM_LORA_RESOLVER_TRUST), S3 on SeaweedFS", rows)


if __name__ == "__main__":
    main()
