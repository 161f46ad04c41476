"""Filesystem resolver against vLLM's built-in ``FilesystemResolver`` and ``cp -r``.

1. Resolving an adapter that is already cached: ours (snapshot, lease, checks) against vLLM's
   built-in resolver reading the same folder; median per call through ``resolve_lora``.
2. The first resolve of a 200 MB adapter (copy, verify, fsync, publish) against ``cp -r``, and
   against ``cp -r`` followed by ``sync`` of the copy: ``cp`` leaves the bytes in memory for the
   kernel to write later, while a published snapshot is on disk.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bench.common import interleaved_median_seconds, report
from devtools.models import write_large_adapter, write_lora_adapter
from vllm_lora_resolvers.backends.filesystem import FilesystemStore
from vllm_lora_resolvers.cache import NodeCache
from vllm_lora_resolvers.config import Settings
from vllm_lora_resolvers.edge import VllmResolver
from vllm_lora_resolvers.resolver import Resolver

BASE_MODEL = "/models/tiny-llama"
HIT_CALLS = 5000
COLD_RUNS = 9


async def _median_async_call(resolver: object, name: str, calls: int) -> float:
    resolve = resolver.resolve_lora  # type: ignore[attr-defined]
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        request = await resolve(BASE_MODEL, name)
        samples.append(time.perf_counter() - started)
        assert request is not None
    samples.sort()
    return samples[len(samples) // 2]


def cached_resolve(work: Path) -> tuple[float, float]:
    from vllm.plugins.lora_resolvers.filesystem_resolver import FilesystemResolver as VllmFs

    adapters, cache = work / "adapters", work / "cache"
    write_lora_adapter(adapters / "sql", base_model=BASE_MODEL)
    settings = Settings.from_environ({"VLLM_LORA_RESOLVER_CACHE_DIR": str(cache)}, argv=[])
    ours = VllmResolver(Resolver(FilesystemStore(adapters, settings, NodeCache(cache))))
    theirs = VllmFs(str(adapters))

    async def measure() -> tuple[float, float]:
        await _median_async_call(ours, "sql", 10)  # first call fetches; the rest are hits
        rounds: list[tuple[float, float]] = []
        for _ in range(5):  # interleaved, so that drift of a shared machine hits both alike
            rounds.append(
                (
                    await _median_async_call(ours, "sql", HIT_CALLS),
                    await _median_async_call(theirs, "sql", HIT_CALLS),
                )
            )
        return min(r[0] for r in rounds), min(r[1] for r in rounds)

    return asyncio.run(measure())


def cold_resolve(work: Path, size_bytes: int) -> tuple[float, float, float]:
    """Medians of ours, ``cp -r`` and ``cp -r`` made durable (``sync`` of the copied files and
    folder, as our publish fsyncs them), interleaved; each copy is removed untimed (removing
    costs tens of ms, more for bytes already on disk: no part of a first resolve)."""
    adapters = work / "adapters"
    write_large_adapter(adapters / "big", base_model=BASE_MODEL, size_bytes=size_bytes)
    cache, copy = work / "cache", work / "copy"
    environ = {
        "VLLM_LORA_RESOLVER_CACHE_DIR": str(cache),
        "VLLM_LORA_RESOLVER_MAX_RANK": "1000000",  # a large file needs a huge rank
    }
    settings = Settings.from_environ(environ, argv=[])

    def ours() -> None:
        resolver = Resolver(FilesystemStore(adapters, settings, NodeCache(cache)))
        assert resolver.resolve(BASE_MODEL, "big") is not None

    def cp() -> None:
        subprocess.run(["cp", "-r", str(adapters / "big"), str(copy)], check=True)

    def cp_durable() -> None:
        cp()
        subprocess.run(["sync", *map(str, copy.iterdir()), str(copy)], check=True)

    def remove_copies() -> None:
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(copy, ignore_errors=True)

    operations = (ours, cp, cp_durable)
    interleaved_median_seconds(operations, 1, before=remove_copies)  # warms the page cache
    ours_s, cp_s, cp_durable_s = interleaved_median_seconds(
        operations, COLD_RUNS, before=remove_copies
    )
    return ours_s, cp_s, cp_durable_s


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-fs-") as directory:
        work = Path(directory)
        ours_hit, theirs_hit = cached_resolve(work / "hit")
        ours_cold, cp_cold, cp_durable = cold_resolve(work / "cold", 200 * 10**6)
    report(
        "filesystem resolver",
        [
            ("cached resolve, ours (median)", f"{ours_hit * 1e6:.1f} us"),
            ("cached resolve, vLLM built-in (median)", f"{theirs_hit * 1e6:.1f} us"),
            ("ratio ours / vLLM (target <= 2)", f"{ours_hit / theirs_hit:.2f}x"),
            ("first resolve of 200 MB, ours (median)", f"{ours_cold * 1e3:.0f} ms"),
            ("cp -r of the same folder (median)", f"{cp_cold * 1e3:.0f} ms"),
            ("cp -r, then sync of its files and folder (median)", f"{cp_durable * 1e3:.0f} ms"),
            ("ratio ours / cp -r (target <= 1.5)", f"{ours_cold / cp_cold:.2f}x"),
            ("ratio ours / cp -r then sync", f"{ours_cold / cp_durable:.2f}x"),
        ],
    )


if __name__ == "__main__":
    main()
