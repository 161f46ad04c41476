"""Prometheus metrics, in the default registry so they appear on vLLM's own ``/metrics``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import REGISTRY, Counter, Histogram, Metric
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

#: How a resolution ended: served from the cache, fetched from the store, served from the cache
#: while the store could not answer, not in the store, name refused, adapter refused, adapter
#: refused for its signature (none, an untrusted signer, files not as signed:
#: ``VLLM_LORA_RESOLVER_TRUST``), the store refused us (credentials, permissions, missing
#: bucket), any other failure.
OUTCOMES = (
    "hit",
    "fetched",
    "stale",
    "missing",
    "rejected",
    "invalid",
    "untrusted",
    "refused",
    "error",
)

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


@dataclass(frozen=True)
class CacheUsage:
    """What a node cache holds, and how many snapshots were evicted from it so far."""

    snapshots: int
    bytes: int
    evictions: int


class NodeCacheCollector(Collector):
    """The node cache's metrics, read from the cache at each scrape, so they are true whoever
    fetched or evicted: this process, another pod's, the sync, ``vllm-lora cache prune``."""

    def __init__(self) -> None:
        self.usage: Callable[[], CacheUsage] | None = None

    def describe(self) -> Iterator[Metric]:
        return self._families(CacheUsage(snapshots=0, bytes=0, evictions=0))

    def collect(self) -> Iterator[Metric]:
        if self.usage is not None:
            yield from self._families(self.usage())

    def _families(self, usage: CacheUsage) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "vllm_lora_resolver_cache_bytes",
            "Bytes of adapter snapshots in the node cache.",
            usage.bytes,
        )
        yield GaugeMetricFamily(
            "vllm_lora_resolver_cache_snapshots",
            "Adapter snapshots in the node cache.",
            usage.snapshots,
        )
        yield CounterMetricFamily(
            "vllm_lora_resolver_evictions",
            "Snapshots evicted from the node cache, by any process of the node (the same on "
            "every pod of a node).",
            usage.evictions,
        )


NODE_CACHE = NodeCacheCollector()
REGISTRY.register(NODE_CACHE)


def report_node_cache(usage: Callable[[], CacheUsage]) -> None:
    """Report the process's node cache (``usage``) at each scrape."""
    NODE_CACHE.usage = usage
