"""Time to first token through a real vLLM server: a cold adapter (in the bucket, not cached)
against the same adapter once loaded.

One SeaweedFS, one server (``VLLM_PLUGINS=lora_s3_resolver``), ``ADAPTERS`` adapters. For each:
a streamed ``/v1/completions`` naming it for the first time (resolve, fetch, check, publish,
engine load, first token), then ``WARM_REPEATS`` more once it is loaded. TTFT is the time until
the first streamed chunk arrives. Medians over the adapters; the resolver's own share comes from
our histogram on the server's ``/metrics``.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import requests

from bench.common import report
from devtools.models import build_tiny_llama, write_lora_adapter
from devtools.stores import SeaweedS3, upload_folder
from devtools.vllm_server import VllmServer
from vllm_lora_resolvers.metrics import sample_sums

ADAPTERS = 8
WARM_REPEATS = 3
BUCKET, PREFIX = "bench-ttft", "adapters"
PROMPT = "The quick brown fox"


def ttft_seconds(session: requests.Session, url: str, model: str) -> float:
    """Seconds from sending a streamed completion request to its first data chunk."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stream": True}
    started = time.perf_counter()
    with session.post(f"{url}/v1/completions", json=body, stream=True, timeout=120) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith(b"data:"):
                first = time.perf_counter() - started
                for _ in response.iter_lines():  # drain, so the connection can be reused
                    pass
                return first
    raise RuntimeError(f"no data chunk streamed for {model!r}")


def resolver_seconds(server: VllmServer) -> tuple[float, float]:
    """(sum, count) of our resolution-latency histogram for fetched adapters."""
    histogram = "vllm_lora_resolver_resolve_seconds"
    sums = sample_sums(
        server.get("/metrics").text, {f"{histogram}_sum", f"{histogram}_count"}, outcome="fetched"
    )
    totals = {kind: sums.get(f"{histogram}_{kind}", 0.0) for kind in ("sum", "count")}
    return totals["sum"], totals["count"]


def measure(work: Path) -> tuple[list[float], list[float], float]:
    model = build_tiny_llama(work / "model")
    names = [f"adapter-{index}" for index in range(ADAPTERS)]
    with SeaweedS3(work / "seaweed") as store:
        client = store.endpoint.client()
        client.create_bucket(Bucket=BUCKET)
        for index, name in enumerate(names):
            folder = write_lora_adapter(work / name, base_model=str(model), seed=index)
            upload_folder(client, BUCKET, f"{PREFIX}/{name}", folder)
        env = {
            **store.endpoint.env(),
            "VLLM_PLUGINS": "lora_s3_resolver",
            "VLLM_LORA_RESOLVER_S3_URI": f"s3://{BUCKET}/{PREFIX}",
            "VLLM_LORA_RESOLVER_CACHE_DIR": str(work / "cache"),
        }
        with VllmServer(model, workdir=work / "server", extra_env=env) as server:
            session = requests.Session()
            session.trust_env = False
            for _ in range(3):  # warm the engine itself on the base model
                ttft_seconds(session, server.url, str(model))
            cold, warm = [], []
            for name in names:
                cold.append(ttft_seconds(session, server.url, name))
                repeats = [ttft_seconds(session, server.url, name) for _ in range(WARM_REPEATS)]
                warm.append(statistics.median(repeats))
            total, count = resolver_seconds(server)
    return cold, warm, total / max(count, 1)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-ttft-") as directory:
        cold, warm, resolve_mean = measure(Path(directory))
    cold_ms, warm_ms = statistics.median(cold) * 1e3, statistics.median(warm) * 1e3
    report(
        f"time to first token through vLLM, {ADAPTERS} adapters (tiny Llama, 30 KB adapters)",
        [
            ("cold adapter: in the bucket, not cached (median)", f"{cold_ms:.1f} ms"),
            ("same adapter, already loaded (median)", f"{warm_ms:.1f} ms"),
            ("difference: cost of the first request", f"{cold_ms - warm_ms:.1f} ms"),
            ("  of which our resolver (mean, from /metrics)", f"{resolve_mean * 1e3:.1f} ms"),
            ("cold range (min..max)", f"{min(cold) * 1e3:.1f}..{max(cold) * 1e3:.1f} ms"),
        ],
    )


if __name__ == "__main__":
    main()
