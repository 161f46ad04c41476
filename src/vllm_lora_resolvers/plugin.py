"""The functions vLLM's ``vllm.general_plugins`` entry points call, and resolver ordering.

vLLM loads plugins in entry-point discovery order (effectively arbitrary) and tries resolvers in
registry order. The first of our register functions to run replaces the registry's dict with
`PluginOrderedResolvers`, which keeps every resolver — vLLM's built-in ones included — in the
order ``VLLM_PLUGINS`` lists its plugin, or in `configured.DEFAULT_ORDER` when ``VLLM_PLUGINS`` is
unset. Which of our resolvers the environment configures, and how they are built, is
`vllm_lora_resolvers.configured`'s (the command line's too, which imports nothing of this module).

Each register function is cheap (no network) and idempotent, as vLLM loads plugins in several
processes. A source that is not configured registers nothing and logs one line; one that is set
but unusable raises `ConfigurationError`, which stops the server with the reason.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from vllm_lora_resolvers import stores
from vllm_lora_resolvers.adapter import CONFIG_FILE, AdapterPolicy, check_adapter_folder
from vllm_lora_resolvers.cache import NodeCache, Snapshot
from vllm_lora_resolvers.config import Settings
from vllm_lora_resolvers.configured import (
    VLLM_FS_PLUGIN,
    build,
    plugin_of,
    resolver_rank,
    shared_cache,
)
from vllm_lora_resolvers.edge import VllmResolver
from vllm_lora_resolvers.errors import InvalidAdapterError, StoreUnavailableError
from vllm_lora_resolvers.names import is_safe_adapter_name
from vllm_lora_resolvers.signing import load_trust
from vllm_lora_resolvers.stores import StoreDeclaration

logger = logging.getLogger("vllm.lora_resolvers.plugin")


class GuardedFilesystemResolver:
    """vLLM's built-in filesystem resolver, made safe to run over our cache directory.

    The built-in joins any name to its directory (``../x`` and absolute names escape it), follows
    any link, and hands vLLM the ``CACHE_DIR/NAME`` path itself, whose target may be re-pointed or
    evicted while the engine still reads it. Wrapped, it is asked only about safe names that lead
    to one of our complete snapshots (which our resolvers fetched and checked), and its answer is
    that snapshot, leased for this process and handed over by its immutable path. Anything else
    in the cache root (a link leading elsewhere, a folder put there by hand) is refused and the
    refusal logged: adapter folders belong in ``VLLM_LORA_RESOLVER_FS_DIR``, where
    ``lora_fs_resolver`` checks and snapshots them. So is a snapshot of a store this server does
    not resolve from (pods of other stores share the node cache and its links), and one checked
    for another server is checked against this server's model and rank limit first, and, under
    ``VLLM_LORA_RESOLVER_TRUST``, its signature against this server's trust unless it was fetched
    under it. A snapshot of a store that our resolver found refusing us (or unreachable, with
    stale copies off) is not served either: the request fails with the reason
    (`NodeCache.withhold_source`).
    """

    def __init__(self, builtin: Any, cache: NodeCache, settings: Settings) -> None:
        self.builtin = builtin
        self.cache = cache
        self.settings = settings
        self.trust = load_trust(settings)
        self._checked: set[tuple[str, str]] = set()

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> Any:
        """The built-in's answer for a name that leads to one of our snapshots, pinned to it."""
        if not is_safe_adapter_name(lora_name):
            return None
        snapshot = self._our_snapshot(lora_name)
        if snapshot is None:
            return None
        withheld = self.cache.withheld(snapshot)
        if withheld is not None:
            raise StoreUnavailableError(f"adapter {lora_name!r} is not served now: {withheld}")
        leased_before = self.cache.held(snapshot.key) is not None
        snapshot = self.cache.lease(snapshot.key)
        if snapshot is None:  # evicted meanwhile
            return None
        if (snapshot.key, base_model_name) not in self._checked:
            policy = AdapterPolicy(
                base_model_name, self.settings.max_rank, self.settings.base_model_aliases
            )
            try:
                await asyncio.to_thread(self._check, lora_name, snapshot, policy)
            except InvalidAdapterError:
                if not leased_before:  # not served: the lease taken for it is given up
                    self.cache.release(snapshot.key)
                raise
            self._checked.add((snapshot.key, base_model_name))
        request = await self.builtin.resolve_lora(base_model_name, lora_name)
        if request is None:
            return None
        return type(request)(
            lora_name=request.lora_name,
            lora_int_id=request.lora_int_id,
            lora_path=str(snapshot.adapter_dir),
        )

    def _check(self, lora_name: str, snapshot: Snapshot, policy: AdapterPolicy) -> None:
        """`check_adapter_folder`, and the signature when this server checks signatures and the
        snapshot was not fetched under its trust."""
        check_adapter_folder(lora_name, snapshot.adapter_dir, policy)
        if self.trust is not None and snapshot.manifest.trust != self.trust.fingerprint:
            self.trust.check_folder(lora_name, snapshot.adapter_dir, lora_name)

    def _our_snapshot(self, lora_name: str) -> Snapshot | None:
        """The snapshot of a store this process serves that ``CACHE_DIR/NAME`` leads to; ``None``
        when it leads to none."""
        path = self.cache.root / lora_name
        key = self.cache.snapshot_containing(os.path.realpath(path))
        if key is not None:
            snapshot = self.cache.find(key)
            if snapshot is None or not self.cache.serves(snapshot):
                logger.debug("%s: %r is another store's snapshot here", VLLM_FS_PLUGIN, lora_name)
                return None
            return snapshot
        if os.path.lexists(path / CONFIG_FILE):
            logger.warning(
                "%s will not serve %r: %s is not an adapter snapshot of this cache (only those "
                "are served from it); put adapter folders in %s and list %s in VLLM_PLUGINS",
                VLLM_FS_PLUGIN,
                lora_name,
                path,
                stores.FS.variable.name,
                stores.FS.plugin,
            )
        return None


class PluginOrderedResolvers(dict[str, Any]):
    """The registry's ``name -> resolver`` dict, kept sorted by plugin order on every insert.

    vLLM's built-in filesystem resolver is stored wrapped in `GuardedFilesystemResolver`.
    """

    def __init__(
        self,
        settings: Settings,
        items: Iterable[tuple[str, Any]],
    ):
        super().__init__()
        self.settings = settings
        self.plugin_order = settings.plugin_order
        for key, value in items:
            self[key] = value

    def __setitem__(self, key: str, value: Any) -> None:
        if plugin_of(key) == VLLM_FS_PLUGIN and hasattr(value, "lora_cache_dir"):
            cache = shared_cache(Path(value.lora_cache_dir), self.settings.cache_max_bytes)
            value = GuardedFilesystemResolver(value, cache, self.settings)
        super().__setitem__(key, value)
        ordered = sorted(self.items(), key=lambda item: resolver_rank(item[0], self.plugin_order))
        super().clear()
        super().update(ordered)


def _register(store: StoreDeclaration) -> None:
    from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

    settings = Settings.from_environ()
    load_trust(settings)  # a trust that cannot be loaded stops the server, whatever is configured
    LoRAResolver.register(VllmResolver)
    LoRAResolver.register(GuardedFilesystemResolver)
    if not isinstance(LoRAResolverRegistry.resolvers, PluginOrderedResolvers):
        LoRAResolverRegistry.resolvers = PluginOrderedResolvers(
            settings, LoRAResolverRegistry.resolvers.items()
        )
    if store.plugin in LoRAResolverRegistry.resolvers:
        return
    resolver = build(store, settings)
    if resolver is None:
        logger.info("%s not registered: %s is not set", store.plugin, store.variable.name)
        return
    edge = cast("LoRAResolver", VllmResolver(resolver))
    LoRAResolverRegistry.register_resolver(store.plugin, edge)
    logger.info("%s registered for %s", store.plugin, resolver.source)


@dataclass(frozen=True)
class EntryPoint:
    """The function one of our ``vllm.general_plugins`` entry points names: vLLM calls it with
    no arguments, and it registers ``store``'s resolver when the store is configured."""

    store: StoreDeclaration

    def __call__(self) -> None:
        _register(self.store)


def __getattr__(name: str) -> EntryPoint:
    """The entry points of ``pyproject.toml``: ``register_BACKEND_resolver``, one per store."""
    backend = name.removeprefix("register_").removesuffix("_resolver")
    if name != f"register_{backend}_resolver" or backend not in stores.BY_BACKEND:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return EntryPoint(stores.BY_BACKEND[backend])
