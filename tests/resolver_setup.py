"""How tests build a resolver: our settings over a node cache in a test's folder, a transfer
configuration for stores on loopback (quick retries, short fault tests), and the requests a store
received through its fault relay."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from devtools.relay import FaultRelay
from vllm_lora_resolvers.backends.base import Store
from vllm_lora_resolvers.cache import NodeCache
from vllm_lora_resolvers.config import Settings
from vllm_lora_resolvers.resolver import Resolver
from vllm_lora_resolvers.retry import RetryPolicy
from vllm_lora_resolvers.transfer import TransferConfig

#: Stores on loopback: quick retries, so fault tests stay short.
FAST_TRANSFER = TransferConfig(
    transfer_retry=RetryPolicy(attempts=4, base_delay=0.02, max_delay=0.1, budget_seconds=10)
)


def fast_transfer(part_size: int = FAST_TRANSFER.part_size) -> TransferConfig:
    """`FAST_TRANSFER` in parts of ``part_size`` bytes."""
    return dataclasses.replace(FAST_TRANSFER, part_size=part_size)


def settings_for(cache_dir: Path, **variables: str) -> Settings:
    """Our settings with the node cache in ``cache_dir`` and ``variables`` set, nothing else."""
    return Settings.from_environ(
        {"VLLM_LORA_RESOLVER_CACHE_DIR": str(cache_dir), **variables}, argv=[]
    )


def open_resolver(
    store_class: Callable[[Any, Settings, NodeCache, TransferConfig], Store],
    source: Any,
    cache_dir: Path,
    transfer: TransferConfig,
    **variables: str,
) -> Resolver:
    """A resolver of the store ``source`` as a new server process would build it, over
    ``cache_dir``."""
    settings = settings_for(cache_dir, **variables)
    cache = NodeCache(cache_dir, settings.cache_max_bytes)
    return Resolver(store_class(source, settings, cache, transfer))


class Relayed:
    """A store's server on 127.0.0.1 as tests reach it: through ``relay``, which counts."""

    relay: FaultRelay

    def requests(self, method: str | None = None) -> list[tuple[str, str]]:
        """Requests that reached the relay (faulted ones included), optionally of one method."""
        return [r for r in self.relay.requests if method is None or r[0] == method]
