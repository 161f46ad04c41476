"""Which vLLM plugins a server would load, which of them register a LoRA resolver and in which
order they are tried, and what is wrong with ``VLLM_PLUGINS``: all read from the environment
and the installed packages, without importing vLLM."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import distributions
from pathlib import Path

from vllm_lora_resolvers.cli.output import Finding, Level
from vllm_lora_resolvers.config import CACHE_DIR, VLLM_PLUGINS, ConfigurationError, Settings
from vllm_lora_resolvers.configured import (
    DEFAULT_ORDER,
    VLLM_FS_PLUGIN,
    VLLM_HF_PLUGIN,
    build_resolver,
    resolver_rank,
)
from vllm_lora_resolvers.errors import ResolverError
from vllm_lora_resolvers.resolver import Resolver
from vllm_lora_resolvers.stores import BY_PLUGIN as OURS
from vllm_lora_resolvers.stores import HF

VLLM_OWN = (VLLM_FS_PLUGIN, VLLM_HF_PLUGIN)


@dataclass(frozen=True)
class PluginPlan:
    """What one plugin would do as the server starts."""

    plugin: str
    loads: bool
    registers: bool
    detail: str
    resolver: Resolver | None = None
    error: str | None = None


def _observing(settings: Settings, scratch: Path) -> Settings:
    """``settings`` with the resolvers' node cache in ``scratch``: doctor only looks at the
    real one (a resolver's cache is created, and cleaned, as the resolver is built)."""
    if settings.cache_dir is None:
        return settings  # registration fails for want of a cache; the plan says so
    return dataclasses.replace(settings, cache_dir=scratch)


def plan_plugins(settings: Settings, installed: set[str], scratch: Path) -> list[PluginPlan]:
    """Every plugin vLLM would load, in the order it would try the resolvers they register,
    then those it would not load or that register nothing. Our resolvers are built with their
    node cache in ``scratch``."""
    order = settings.plugin_order
    listed = DEFAULT_ORDER if order is None else tuple(dict.fromkeys(order))
    plans = [_plan(plugin, settings, installed, scratch, loads=True) for plugin in listed]
    plans += [
        _plan(plugin, settings, installed, scratch, loads=False)
        for plugin in OURS
        if plugin not in listed
    ]
    return sorted(plans, key=lambda plan: (not plan.registers, resolver_rank(plan.plugin, order)))


def _plan(
    plugin: str, settings: Settings, installed: set[str], scratch: Path, *, loads: bool
) -> PluginPlan:
    if plugin in VLLM_OWN:
        return _vllm_plan(plugin, settings, loads)
    if plugin not in OURS:
        known = "another plugin" if plugin in installed else "no installed plugin has this name"
        return PluginPlan(plugin, loads, False, known)
    try:
        resolver = build_resolver(plugin, _observing(settings, scratch))
    except (ConfigurationError, ResolverError) as error:
        return PluginPlan(plugin, loads, False, "cannot register", error=str(error))
    if resolver is None:
        return PluginPlan(plugin, loads, False, f"off: {OURS[plugin].variable.name} is not set")
    if not loads:
        return PluginPlan(plugin, loads, False, f"not in {VLLM_PLUGINS.name}", resolver)
    return PluginPlan(plugin, loads, True, resolver.source, resolver)


def _vllm_plan(plugin: str, settings: Settings, loads: bool) -> PluginPlan:
    """vLLM's own resolvers: the filesystem one serves the cache root's folders by name; the
    Hub one registers only when ``VLLM_PLUGINS`` names it."""
    if plugin == VLLM_FS_PLUGIN:
        if settings.cache_dir is None:
            return PluginPlan(plugin, loads, False, f"vLLM's own: off, {CACHE_DIR.name} unset")
        return PluginPlan(plugin, loads, loads, f"vLLM's own: folders in {settings.cache_dir}")
    named = settings.plugin_order is not None and plugin in settings.plugin_order
    registers = named and bool(HF.source(settings))
    return PluginPlan(plugin, loads, registers, "vLLM's own: " + ("on" if registers else "off"))


def registration_findings(
    plans: list[PluginPlan], settings: Settings, environ: Mapping[str, str]
) -> list[Finding]:
    """Resolvers that cannot register, ones whose variable is set but that vLLM will not load
    (the filesystem resolver's fallback to the cache root is no such wish), and vLLM's own
    resolvers tried before ours."""
    findings = []
    for plan in plans:
        if plan.error is not None:
            findings.append(Finding(Level.FAIL, f"{plan.plugin} cannot register: {plan.error}"))
        elif plan.resolver is not None and not plan.loads and _variable(plan) in environ:
            findings.append(
                Finding(
                    Level.FAIL,
                    f"{_variable(plan)} is set but {VLLM_PLUGINS.name} does not list "
                    f"{plan.plugin}: vLLM will not load it",
                    f"{VLLM_PLUGINS.name}={suggested_plugins(settings, plan.plugin)}",
                )
            )
    tried = [plan.plugin for plan in plans if plan.registers]
    for own in VLLM_OWN:
        later = [
            p for p in tried if own in tried and p in OURS and tried.index(p) > tried.index(own)
        ]
        if later:
            findings.append(
                Finding(
                    Level.WARN,
                    f"vLLM's {own} is tried before {', '.join(later)}: it answers first for the "
                    "names it knows, without our checks and without seeing updates in the store",
                    f"{VLLM_PLUGINS.name}={suggested_plugins(settings)}",
                )
            )
    return findings


def _variable(plan: PluginPlan) -> str:
    """The name of the variable that turns the store of our plugin ``plan.plugin`` on."""
    return OURS[plan.plugin].variable.name


def suggested_plugins(settings: Settings, adding: str | None = None) -> str:
    """``VLLM_PLUGINS`` cleaned of blanks, with ``adding``, and vLLM's own resolvers last.

    >>> settings = Settings.from_environ({"VLLM_PLUGINS": "lora_filesystem_resolver, x"})
    >>> suggested_plugins(settings, "lora_s3_resolver")
    'x,lora_s3_resolver,lora_filesystem_resolver'
    """
    current = [plugin.strip() for plugin in settings.plugin_order or () if plugin.strip()]
    wanted = dict.fromkeys([*current, *([adding] if adding else [])])
    return ",".join(sorted(wanted, key=lambda plugin: plugin in VLLM_OWN))


def plugin_list_findings(settings: Settings, installed: set[str]) -> list[Finding]:
    """Entries of ``VLLM_PLUGINS`` that match no installed plugin (vLLM does not strip them)."""
    findings = []
    for entry in settings.plugin_order or ():
        if entry in installed:
            continue
        if entry.strip() in installed or not entry.strip():
            problem = f"{VLLM_PLUGINS.name} entry {entry!r} matches no plugin: vLLM strips nothing"
            fix = f"{VLLM_PLUGINS.name}={suggested_plugins(settings)}"
        else:
            problem = f"{VLLM_PLUGINS.name} lists {entry!r}, which no installed package provides"
            fix = f"fix its spelling; installed: {', '.join(sorted(installed))}"
        findings.append(Finding(Level.WARN, problem, fix))
    return findings


def installed_plugins() -> set[str]:
    """Names of the installed vLLM plugins of every group (read without importing vLLM)."""
    return {
        entry.name
        for distribution in distributions()
        for entry in distribution.entry_points
        if entry.group.startswith("vllm.")
    }
