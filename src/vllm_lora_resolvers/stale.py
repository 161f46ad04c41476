"""Serving cached snapshots while a store cannot answer, as ``VLLM_LORA_RESOLVER_SERVE_STALE``
allows; withholding the store's snapshots from every resolver of the process when it does not."""

from __future__ import annotations

import logging

from vllm_lora_resolvers.backends.base import Store
from vllm_lora_resolvers.cache import Snapshot
from vllm_lora_resolvers.errors import StoreUnavailableError, TransientStoreError

logger = logging.getLogger("vllm.lora_resolvers")


class StaleServing:
    """The cached snapshots of ``store``'s adapters, served while it cannot answer."""

    def __init__(self, store: Store) -> None:
        self.backend = store.backend
        self.source = store.source
        self.settings = store.settings
        self.cache = store.cache

    def lease(self, name: str, error: StoreUnavailableError) -> tuple[Snapshot, bool]:
        """The snapshot ``name`` last resolved to on this node (its ``NAME`` link), else the
        newest cached one of that name, leased, when the store cannot answer (``error``), if
        ``VLLM_LORA_RESOLVER_SERVE_STALE`` allows it for ``error``; else ``error``. With it,
        whether this process leased it before.

        By default only a store that cannot be reached is served from the cache: one that
        refuses (revoked credentials, a deleted bucket) has answered.
        """
        unreachable = isinstance(error, TransientStoreError)
        allowed = self.settings.serve_stale == "always" or (
            self.settings.serve_stale == "unreachable" and unreachable
        )
        if not allowed:
            self.cache.withhold_source(self.source, self._withheld_because(unreachable))
            raise error
        cached = self.cache.linked_snapshot(name, self.source) or self.cache.latest_for(
            self.source, name
        )
        leased_before = cached is not None and self.cache.held(cached.key) is not None
        snapshot = self.cache.lease(cached.key) if cached is not None else None
        if snapshot is None:
            raise error
        logger.warning(
            "%s store %s (%s); serving cached version %s of %r",
            self.backend,
            "unreachable" if unreachable else "refused",
            error,
            snapshot.manifest.version,
            name,
        )
        return snapshot, leased_before

    def _withheld_because(self, unreachable: bool) -> str:
        """What a client asking for a withheld snapshot of this store is told (no location:
        the store's own error is in the server's log)."""
        if unreachable:
            return (
                f"its {self.backend} store cannot be reached and cached copies are not served "
                "(VLLM_LORA_RESOLVER_SERVE_STALE=never)"
            )
        return (
            f"its {self.backend} store refuses this server (credentials, permissions, a missing "
            "bucket or repo: see the server's log), and cached copies of a refusing store's "
            f"adapters are not served (VLLM_LORA_RESOLVER_SERVE_STALE={self.settings.serve_stale})"
        )
