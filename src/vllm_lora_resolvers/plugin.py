"""The functions vLLM's ``vllm.general_plugins`` entry points call, and resolver ordering.

vLLM loads plugins in entry-point discovery order (effectively arbitrary) and tries resolvers in
registry order. The first of our register functions to run replaces the registry's dict with
`PluginOrderedResolvers`, which keeps every resolver — vLLM's built-in ones included — in the
order ``VLLM_PLUGINS`` lists its plugin, or in `DEFAULT_ORDER` when ``VLLM_PLUGINS`` is unset.

Each register function is cheap (no network) and idempotent, as vLLM loads plugins in several
processes. A source that is not configured registers nothing and logs one line; one that is set
but unusable raises `ConfigurationError`, which stops the server with the reason.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from vllm_lora_resolvers.adapter import CONFIG_FILE, AdapterPolicy, check_adapter_folder
from vllm_lora_resolvers.cache import NodeCache, Snapshot
from vllm_lora_resolvers.config import (
    FS_DIR,
    GCS_URI,
    HF_REPO_LIST,
    S3_URI,
    ConfigurationError,
    Settings,
    Variable,
)
from vllm_lora_resolvers.names import is_safe_adapter_name
from vllm_lora_resolvers.resolver import BaseStorageResolver

logger = logging.getLogger("vllm.lora_resolvers.plugin")

FS_PLUGIN = "lora_fs_resolver"
S3_PLUGIN = "lora_s3_resolver"
GCS_PLUGIN = "lora_gcs_resolver"
HF_PLUGIN = "lora_hf_resolver"
VLLM_FS_PLUGIN = "lora_filesystem_resolver"
VLLM_HF_PLUGIN = "lora_hf_hub_resolver"

#: The order resolvers are tried in when ``VLLM_PLUGINS`` is unset: remote stores first, then the
#: local ones, vLLM's built-in resolvers last.
DEFAULT_ORDER = (S3_PLUGIN, GCS_PLUGIN, HF_PLUGIN, FS_PLUGIN, VLLM_FS_PLUGIN, VLLM_HF_PLUGIN)

#: Registry names of vLLM's built-in resolvers, by the plugin that registers them.
_VLLM_REGISTRY_NAMES = {"Filesystem Resolver": VLLM_FS_PLUGIN, "Hf Hub Resolver": VLLM_HF_PLUGIN}

_BACKENDS = "vllm_lora_resolvers.backends"
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
    for another server is checked against this server's model and rank limit first.
    """

    def __init__(self, builtin: Any, cache: NodeCache, settings: Settings) -> None:
        self.builtin = builtin
        self.cache = cache
        self.settings = settings
        self._checked: set[tuple[str, str]] = set()

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> Any:
        """The built-in's answer for a name that leads to one of our snapshots, pinned to it."""
        if not is_safe_adapter_name(lora_name):
            return None
        snapshot = self._leased_snapshot(lora_name)
        if snapshot is None:
            return None
        if (snapshot.key, base_model_name) not in self._checked:
            policy = AdapterPolicy(
                base_model_name, self.settings.max_rank, self.settings.base_model_aliases
            )
            await asyncio.to_thread(check_adapter_folder, lora_name, snapshot.adapter_dir, policy)
            self._checked.add((snapshot.key, base_model_name))
        request = await self.builtin.resolve_lora(base_model_name, lora_name)
        if request is None:
            return None
        return type(request)(
            lora_name=request.lora_name,
            lora_int_id=request.lora_int_id,
            lora_path=str(snapshot.adapter_dir),
        )

    def _leased_snapshot(self, lora_name: str) -> Snapshot | None:
        """The snapshot ``CACHE_DIR/NAME`` leads to, leased; ``None`` when it leads to none (or
        the snapshot was just evicted)."""
        path = self.cache.root / lora_name
        key = self.cache.snapshot_containing(os.path.realpath(path))
        if key is not None:
            snapshot = self.cache.find(key)
            if snapshot is None or not self.cache.serves(snapshot):
                logger.debug("%s: %r is another store's snapshot here", VLLM_FS_PLUGIN, lora_name)
                return None
            return self.cache.lease(key)
        if os.path.lexists(path / CONFIG_FILE):
            logger.warning(
                "%s will not serve %r: %s is not an adapter snapshot of this cache (only those "
                "are served from it); put adapter folders in %s and list %s in VLLM_PLUGINS",
                VLLM_FS_PLUGIN,
                lora_name,
                path,
                FS_DIR.name,
                FS_PLUGIN,
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


def shared_cache(root: Path, max_bytes: int | None) -> NodeCache:
    """The process's one `NodeCache` for ``root``, shared by every resolver using it."""
    root = root.absolute()
    with _caches_guard:
        if root not in _caches:
            _caches[root] = NodeCache(root, max_bytes)
        return _caches[root]


def node_cache(settings: Settings, for_what: str) -> NodeCache:
    """The shared `NodeCache` of the configured cache root (which ``for_what`` requires)."""
    return shared_cache(settings.require_cache_dir(for_what), settings.cache_max_bytes)


def _register(plugin: str, build: Callable[[Settings], BaseStorageResolver | None]) -> None:
    from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

    settings = Settings.from_environ()
    LoRAResolver.register(BaseStorageResolver)  # type: ignore[type-abstract]
    LoRAResolver.register(GuardedFilesystemResolver)
    if not isinstance(LoRAResolverRegistry.resolvers, PluginOrderedResolvers):
        LoRAResolverRegistry.resolvers = PluginOrderedResolvers(
            settings, LoRAResolverRegistry.resolvers.items()
        )
    if plugin in LoRAResolverRegistry.resolvers:
        return
    resolver = build(settings)
    if resolver is not None:
        LoRAResolverRegistry.register_resolver(plugin, cast("LoRAResolver", resolver))
        logger.info("%s registered for %s", plugin, resolver.source)


def _build_fs_resolver(settings: Settings) -> BaseStorageResolver | None:
    from vllm_lora_resolvers.backends.filesystem import FilesystemResolver

    if settings.fs_dir is None:
        logger.info("%s not registered: %s is not set", FS_PLUGIN, FS_DIR.name)
        return None
    return FilesystemResolver(settings.fs_dir, settings, node_cache(settings, FS_PLUGIN))


@dataclass(frozen=True)
class _RemoteStore:
    """A remote store's plugin: the variable that turns it on and where its backend lives."""

    plugin: str
    variable: Variable
    source: Callable[[Settings], Any]
    module: str
    backend_class: str
    client_package: str
    extra: str

    def build(self, settings: Settings) -> BaseStorageResolver | None:
        """The resolver, or ``None`` (one log line) when the store is not configured."""
        source = self.source(settings)
        if not source:
            logger.info("%s not registered: %s is not set", self.plugin, self.variable.name)
            return None
        cache = node_cache(settings, self.plugin)
        try:
            backend = getattr(importlib.import_module(self.module), self.backend_class)
        except ImportError as error:
            raise ConfigurationError(
                f"{self.variable.name} is set but {self.client_package} is missing ({error}); "
                f"pip install 'vllm-lora-resolvers[{self.extra}]'"
            ) from None
        resolver: BaseStorageResolver = backend(source, settings, cache)
        return resolver


_S3 = _RemoteStore(
    S3_PLUGIN, S3_URI, lambda s: s.s3_uri, f"{_BACKENDS}.s3", "S3Resolver", "boto3", "s3"
)
_GCS = _RemoteStore(
    GCS_PLUGIN,
    GCS_URI,
    lambda s: s.gcs_uri,
    f"{_BACKENDS}.gcs",
    "GcsResolver",
    "google-cloud-storage",
    "gcs",
)
_HF = _RemoteStore(
    HF_PLUGIN,
    HF_REPO_LIST,
    lambda s: s.hf_repos,
    f"{_BACKENDS}.hf_hub",
    "HfHubResolver",
    "huggingface_hub",
    "hf",
)


def register_s3_resolver() -> None:
    """Entry point ``lora_s3_resolver``: adapters from ``VLLM_LORA_RESOLVER_S3_URI``."""
    _register(S3_PLUGIN, _S3.build)


def register_gcs_resolver() -> None:
    """Entry point ``lora_gcs_resolver``: adapters from ``VLLM_LORA_RESOLVER_GCS_URI``."""
    _register(GCS_PLUGIN, _GCS.build)


def register_hf_resolver() -> None:
    """Entry point ``lora_hf_resolver``: adapters from ``VLLM_LORA_RESOLVER_HF_REPO_LIST``."""
    _register(HF_PLUGIN, _HF.build)


def register_fs_resolver() -> None:
    """Entry point ``lora_fs_resolver``: adapters from a directory, snapshotted into the cache."""
    _register(FS_PLUGIN, _build_fs_resolver)


_BUILDERS: Mapping[str, Callable[[Settings], BaseStorageResolver | None]] = {
    S3_PLUGIN: _S3.build,
    GCS_PLUGIN: _GCS.build,
    HF_PLUGIN: _HF.build,
    FS_PLUGIN: _build_fs_resolver,
}


def build_resolver(plugin: str, settings: Settings) -> BaseStorageResolver | None:
    """The resolver our plugin ``plugin`` registers under ``settings``; ``None`` when its source
    is not configured. Raises `ConfigurationError` as registration would, and `KeyError` for a
    plugin that is not ours. Needs no vLLM (the command line uses it).
    """
    return _BUILDERS[plugin](settings)


def configured_resolvers(settings: Settings) -> list[tuple[str, BaseStorageResolver]]:
    """``(plugin, resolver)`` for each of our resolvers that would register under ``settings``,
    in the order vLLM would try them: only plugins ``VLLM_PLUGINS`` lists (all when it is unset),
    sorted as `resolver_rank` sorts the registry.

    >>> [plugin for plugin, _ in configured_resolvers(Settings.from_environ())]  # doctest: +SKIP
    ['lora_s3_resolver', 'lora_fs_resolver']
    """
    order = settings.plugin_order
    loaded = [plugin for plugin in _BUILDERS if order is None or plugin in order]
    resolvers = []
    for plugin in sorted(loaded, key=lambda plugin: resolver_rank(plugin, order)):
        resolver = build_resolver(plugin, settings)
        if resolver is not None:
            resolvers.append((plugin, resolver))
    return resolvers
