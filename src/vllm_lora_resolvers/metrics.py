"""Prometheus metrics, in the default registry so they appear on vLLM's own ``/metrics``."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

#: How a resolution ended: served from the cache, fetched from the store, served from the cache
#: while the store could not answer, not in the store, name refused, adapter refused, the store
#: refused us (credentials, permissions, missing bucket), any other failure.
OUTCOMES = ("hit", "fetched", "stale", "missing", "rejected", "invalid", "refused", "error")

RESOLUTIONS = Counter(
    "vllm_lora_resolver_resolutions",
    "Adapter resolutions by backend and outcome.",
    ["backend", "outcome"],
)
RESOLVE_SECONDS = Histogram(
    "vllm_lora_resolver_resolve_seconds",
    "Time to resolve an adapter name, by backend and outcome.",
    ["backend", "outcome"],
    buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
FETCHED_BYTES = Counter(
    "vllm_lora_resolver_fetched_bytes",
    "Bytes of adapter files downloaded from a store into the node cache.",
    ["backend"],
)
RETRIES = Counter(
    "vllm_lora_resolver_retries",
    "Store operations retried after a transient failure.",
    ["backend"],
)
EVICTIONS = Counter(
    "vllm_lora_resolver_evictions",
    "Snapshots evicted from the node cache to stay under its byte cap.",
)
CACHE_BYTES = Gauge(
    "vllm_lora_resolver_cache_bytes",
    "Bytes of adapter snapshots in the node cache, as last seen by this process.",
)
CACHE_SNAPSHOTS = Gauge(
    "vllm_lora_resolver_cache_snapshots",
    "Adapter snapshots in the node cache, as last seen by this process.",
)
