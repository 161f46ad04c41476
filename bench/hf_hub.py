"""Hub resolver against vLLM's own ``HfHubResolver``, both against one local Hub server.

A model repo holds 40 small adapters in folders and one 100 MB adapter. Each resolver runs in its
own process (huggingface_hub reads ``HF_ENDPOINT`` at import) and resolves, through
``resolve_lora`` as vLLM calls it: the large adapter cold, the same again warm, then an adapter
pushed to the repo after those two. Reported: the cold resolve time (the median of 3 runs of
each, taken in turn, each process with a cache of its own), and the Hub requests each step cost
(counted by the server).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import report
from devtools.hub_server import HubServer
from devtools.models import write_large_adapter, write_lora_adapter

BASE_MODEL = "/models/tiny-llama"
REPO_ID = "bench/adapters"
SMALL_ADAPTERS = 40
LARGE_BYTES = 100 * 10**6
MB = 10**6
RUNS = 3

_RESOLVER = """
import asyncio, json, sys, time
from pathlib import Path

which, repo, cache = sys.argv[1:4]
if which == "ours":
    from vllm_lora_resolvers.backends.hf_hub import HfHubStore
    from vllm_lora_resolvers.cache import NodeCache
    from vllm_lora_resolvers.config import Settings
    from vllm_lora_resolvers.edge import VllmResolver
    from vllm_lora_resolvers.resolver import Resolver

    settings = Settings.from_environ(
        {"VLLM_LORA_RESOLVER_CACHE_DIR": cache, "VLLM_LORA_RESOLVER_MAX_RANK": "100000000"},
        argv=[],
    )
    resolver = VllmResolver(Resolver(HfHubStore([repo], settings, NodeCache(Path(cache)))))
else:
    from vllm.plugins.lora_resolvers.hf_hub_resolver import HfHubResolver

    resolver = HfHubResolver([repo])
import vllm.lora.request  # both hand vLLM a LoRARequest; import it before timing

async def main():
    print("ready", flush=True)
    for line in sys.stdin:
        started = time.perf_counter()
        request = await resolver.resolve_lora("/models/tiny-llama", line.strip())
        seconds = time.perf_counter() - started
        print(json.dumps({"seconds": seconds, "found": request is not None}), flush=True)

asyncio.run(main())
"""


def _run_resolver(which: str, hub: HubServer, work: Path, run: int) -> dict[str, dict[str, Any]]:
    """Cold, warm and pushed-later resolves in a fresh process: seconds, found, requests."""
    which_run = f"{which}-{run}"
    environment = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(work / f"hf-home-{which_run}"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "PYTHONPATH": str(Path(__file__).parents[1]),
    }
    environment.pop("HF_HUB_OFFLINE", None)
    command = [sys.executable, "-c", _RESOLVER, which, REPO_ID, str(work / f"cache-{which_run}")]
    process = subprocess.Popen(
        command, env=environment, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert process.stdin is not None and process.stdout is not None
    results = {}
    try:
        assert process.stdout.readline().strip() == "ready"
        for step, name in (("cold", "large"), ("warm", "large"), ("pushed", f"later-{which_run}")):
            if step == "pushed":
                later = write_lora_adapter(work / f"later-{which_run}", base_model=BASE_MODEL)
                hub.push(REPO_ID, {f"later-{which_run}": later})
            hub.reset_counters()
            process.stdin.write(f"{REPO_ID}/{name}\n")
            process.stdin.flush()
            results[step] = json.loads(process.stdout.readline())
            results[step]["requests"] = _by_method(hub.requests)
    finally:
        process.stdin.close()
        process.wait(timeout=60)
    return results


def _by_method(requests: list[tuple[str, str]]) -> str:
    """``"9 (GET 7, HEAD 1, POST 1)"``."""
    counts = Counter(method for method, _ in requests)
    detail = ", ".join(f"{method} {count}" for method, count in sorted(counts.items()))
    return f"{len(requests)} ({detail})" if requests else "0"


def _fill_repo(hub: HubServer, work: Path) -> None:
    small = {
        f"small-{index:02d}": write_lora_adapter(
            work / f"small-{index:02d}", base_model=BASE_MODEL, seed=index
        )
        for index in range(SMALL_ADAPTERS)
    }
    large = write_large_adapter(work / "large", base_model=BASE_MODEL, size_bytes=LARGE_BYTES)
    hub.push(REPO_ID, {**small, "large": large, "README.md": b"# bench adapters\n"})


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-hf-") as directory:
        work = Path(directory)
        with HubServer(work / "hub") as hub:
            _fill_repo(hub, work / "adapters")
            runs: dict[str, list[dict[str, dict[str, Any]]]] = {"ours": [], "vllm": []}
            for run in range(RUNS):
                for which, results in runs.items():
                    results.append(_run_resolver(which, hub, work, run))
    ours, theirs = runs["ours"][-1], runs["vllm"][-1]
    cold = {
        which: statistics.median(results["cold"]["seconds"] for results in each)
        for which, each in runs.items()
    }
    every = {
        which: " ".join(f"{results['cold']['seconds']:.2f}" for results in each)
        for which, each in runs.items()
    }
    rows: list[tuple[str, str]] = [
        (f"cold resolve of the 100 MB adapter, {which} (runs)", f"{cold[which]:.2f} s ({each})")
        for which, each in every.items()
    ]
    rows += [
        ("ratio ours / vLLM, medians (< 1 is faster)", f"{cold['ours'] / cold['vllm']:.2f}x"),
    ]
    for step in ("cold", "warm", "pushed"):
        rows.append(
            (
                f"Hub requests, {step} resolve (ours / vLLM)",
                f"{ours[step]['requests']} / {theirs[step]['requests']}",
            )
        )
    rows.append(
        (
            "adapter pushed after the first resolve found (ours / vLLM)",
            f"{ours['pushed']['found']} / {theirs['pushed']['found']}",
        )
    )
    rows.append(
        (
            "warm resolve, ours / vLLM",
            f"{ours['warm']['seconds'] * 1e3:.1f} ms / {theirs['warm']['seconds'] * 1e3:.1f} ms",
        )
    )
    report(f"Hub resolver ({SMALL_ADAPTERS + 1} adapters in one repo, local Hub server)", rows)


if __name__ == "__main__":
    main()
