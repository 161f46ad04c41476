"""Prometheus metrics, in the default registry so they appear on vLLM's own ``/metrics``."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, Counter, Histogram, Metric
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from vllm_lora_resolvers.cache import CacheUsage

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


class NodeCacheCollector(Collector):
    """The node cache's metrics, read from the cache at each scrape, so they are true whoever
    fetched or evicted: this process, another pod's, the sync, ``vllm-lora cache prune``."""

    def __init__(self) -> None:
        self.usage: Callable[[], CacheUsage] | None = None

    def describe(self) -> Iterator[Metric]:
        return self._families(None)

    def collect(self) -> Iterator[Metric]:
        if self.usage is not None:
            yield from self._families(self.usage())

    def _families(self, usage: CacheUsage | None) -> Iterator[Metric]:
        """The families, with ``usage``'s values (``None``: none, to describe them)."""
        yield GaugeMetricFamily(
            "vllm_lora_resolver_cache_bytes",
            "Bytes of adapter snapshots in the node cache.",
            None if usage is None else usage.bytes,
        )
        yield GaugeMetricFamily(
            "vllm_lora_resolver_cache_snapshots",
            "Adapter snapshots in the node cache.",
            None if usage is None else usage.snapshots,
        )
        yield CounterMetricFamily(
            "vllm_lora_resolver_evictions",
            "Snapshots evicted from the node cache, by any process of the node (the same on "
            "every pod of a node).",
            None if usage is None else usage.evictions,
        )


NODE_CACHE = NodeCacheCollector()
REGISTRY.register(NODE_CACHE)


def report_node_cache(usage: Callable[[], CacheUsage]) -> None:
    """Report the process's node cache (``usage``) at each scrape."""
    NODE_CACHE.usage = usage


def sample_sums(exposition: str, names: Collection[str], **labels: str) -> dict[str, float]:
    """For each sample name of ``names`` that Prometheus text ``exposition`` (a ``/metrics``
    page) has, the sum of its samples that carry ``labels``; absent names are absent. Raises
    `ValueError` when the text is not Prometheus text."""
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name in names and labels.items() <= sample.labels.items():
                sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
    return sums
