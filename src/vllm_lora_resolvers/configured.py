"""Our resolvers as the environment configures them, in the order vLLM tries them, over one
`NodeCache` per cache root and process.

The server's plugins register them (`vllm_lora_resolvers.plugin`); the command line runs them as
they are (``pull``, ``sync``, ``doctor``), without importing vLLM's side of the package: its
registry, its edge and their event loop.
"""

from __future__ import annotations

import threading
from pathlib import Path

from vllm_lora_resolvers import metrics, stores
from vllm_lora_resolvers.cache import NodeCache
from vllm_lora_resolvers.config import ConfigurationError, Settings
from vllm_lora_resolvers.resolver import Resolver
from vllm_lora_resolvers.stores import StoreDeclaration

VLLM_FS_PLUGIN = "lora_filesystem_resolver"
VLLM_HF_PLUGIN = "lora_hf_hub_resolver"

#: The order resolvers are tried in when ``VLLM_PLUGINS`` is unset: our stores in the order of
#: `stores.STORES` (remote ones first, then the local one), vLLM's built-in resolvers last.
DEFAULT_ORDER = (*stores.BY_PLUGIN, VLLM_FS_PLUGIN, VLLM_HF_PLUGIN)

#: Registry names of vLLM's built-in resolvers, by the plugin that registers them.
_VLLM_REGISTRY_NAMES = {"Filesystem Resolver": VLLM_FS_PLUGIN, "Hf Hub Resolver": VLLM_HF_PLUGIN}

_caches: dict[Path, NodeCache] = {}
_caches_guard = threading.Lock()


def plugin_of(registry_name: str) -> str:
    """The plugin (entry-point name) that registers a resolver under ``registry_name``."""
    return _VLLM_REGISTRY_NAMES.get(registry_name, registry_name)


def resolver_rank(registry_name: str, plugin_order: tuple[str, ...] | None) -> int:
    """Position of a resolver in the try order; unknown plugins go last, in discovery order."""
    order = DEFAULT_ORDER if plugin_order is None else plugin_order
    plugin = plugin_of(registry_name)
    return order.index(plugin) if plugin in order else len(order)


def shared_cache(root: Path, max_bytes: int | None) -> NodeCache:
    """The process's one `NodeCache` for ``root``, shared by every resolver using it."""
    root = root.absolute()
    with _caches_guard:
        if root not in _caches:
            _caches[root] = NodeCache(root, max_bytes)
            metrics.report_node_cache(_caches[root].usage)
        return _caches[root]


def node_cache(settings: Settings, for_what: str) -> NodeCache:
    """The shared `NodeCache` of the configured cache root (which ``for_what`` requires)."""
    return shared_cache(settings.require_cache_dir(for_what), settings.cache_max_bytes)


def build(store: StoreDeclaration, settings: Settings) -> Resolver | None:
    """``store``'s resolver, or ``None`` when the store is not configured."""
    source = store.source(settings)
    if not source:
        return None
    cache = node_cache(settings, store.plugin)
    try:
        store_class = store.store_class()
    except ImportError as error:
        if store.extra is None:
            raise
        raise ConfigurationError(
            f"{store.variable.name} is set but {store.client_package} is missing ({error}); "
            f"{store.install_hint}"
        ) from None
    return Resolver(store_class(source, settings, cache))


def build_resolver(plugin: str, settings: Settings) -> Resolver | None:
    """The resolver our plugin ``plugin`` registers under ``settings``; ``None`` when its source
    is not configured. Raises `ConfigurationError` as registration would, and `KeyError` for a
    plugin that is not ours.
    """
    return build(stores.BY_PLUGIN[plugin], settings)


def configured_resolvers(settings: Settings) -> list[tuple[str, Resolver]]:
    """``(plugin, resolver)`` for each of our resolvers that would register under ``settings``,
    in the order vLLM would try them: only plugins ``VLLM_PLUGINS`` lists (all when it is unset),
    sorted as `resolver_rank` sorts the registry.

    >>> [plugin for plugin, _ in configured_resolvers(Settings.from_environ())]  # doctest: +SKIP
    ['lora_s3_resolver', 'lora_fs_resolver']
    """
    order = settings.plugin_order
    loaded = [plugin for plugin in stores.BY_PLUGIN if order is None or plugin in order]
    resolvers = []
    for plugin in sorted(loaded, key=lambda plugin: resolver_rank(plugin, order)):
        resolver = build_resolver(plugin, settings)
        if resolver is not None:
            resolvers.append((plugin, resolver))
    return resolvers
