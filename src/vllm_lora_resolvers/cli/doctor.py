"""``vllm-lora doctor``: the effective configuration, the resolvers vLLM would try and in which
order, whether each store answers, whether the cache is usable, and common misconfigurations,
each with its fix. Secrets are never printed, only whether they are set.

It only reads the stores, as a server does, unless ``--check-writes`` asks it to check what
``vllm-lora publish`` relies on: that a bucket store refuses writes whose condition does not hold
(one probe object, `BucketStore.conditional_writes`, with the publisher's credentials).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Generic, TypeVar

import click
from rich.console import Console
from rich.text import Text

from vllm_lora_resolvers.backends.bucket import BucketStore
from vllm_lora_resolvers.cli.output import Finding, Level, console, line, plural, print_finding
from vllm_lora_resolvers.cli.plugins import (
    PluginPlan,
    installed_plugins,
    plan_plugins,
    plugin_list_findings,
    registration_findings,
)
from vllm_lora_resolvers.cli.system import (
    PROC_MOUNTS,
    filesystem_type,
    is_network_filesystem,
    read_proc,
)
from vllm_lora_resolvers.config import (
    CACHE_DIR,
    FS_DIR,
    ConfigurationError,
    Settings,
)
from vllm_lora_resolvers.configured import VLLM_FS_PLUGIN
from vllm_lora_resolvers.errors import ResolverError, StoreRefusedError
from vllm_lora_resolvers.resolver import Resolver
from vllm_lora_resolvers.stores import ALL_VARIABLES, BY_BACKEND, STORES

RUNTIME_UPDATING = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
#: Printed only as "set" or "unset".
SECRETS: frozenset[str] = frozenset().union(*(store.secrets for store in STORES))
#: The stores' own variables (their client libraries read them; we never do).
STORE_VARIABLES = tuple(name for store in STORES for name in store.environment)
_USERINFO = re.compile(r"//[^/@\s]*@")
_URL_QUERY = re.compile(r"(://[^?#\s]*)[?#]\S*")
_T = TypeVar("_T")


@click.command()
@click.option("--timeout", default=20.0, show_default=True, help="Seconds to wait for a store.")
@click.option(
    "--check-writes",
    is_flag=True,
    help=(
        "Also check that each bucket store refuses writes whose condition does not hold, as "
        "`vllm-lora publish` needs (writes PREFIX/_vllm-lora-conditional-write-probe: run it with "
        "the publisher's credentials)."
    ),
)
def doctor(timeout: float, check_writes: bool) -> None:
    """Diagnose this environment as a vLLM server with these resolvers would see it.

    The stores are only read, unless --check-writes. Exit 1 when any check FAILs.
    """
    environ = dict(os.environ)
    out = console()
    _print_configuration(out, environ)
    findings = [_runtime_updating(environ)]
    try:
        settings = Settings.from_environ(environ, argv=[])
    except ConfigurationError as error:
        findings.append(Finding(Level.FAIL, str(error), "fix the value, or unset it"))
    else:
        findings += _diagnose(out, settings, environ, timeout, check_writes)
    out.print(Text("\nChecks", style="bold"))
    for finding in findings:
        print_finding(out, finding, indent=2)
    failed = sum(finding.level is Level.FAIL for finding in findings)
    warned = sum(finding.level is Level.WARN for finding in findings)
    out.print(f"{failed} failed, {plural(warned, 'warning')}")
    sys.exit(1 if failed else 0)


def _diagnose(
    out: Console,
    settings: Settings,
    environ: Mapping[str, str],
    timeout: float,
    check_writes: bool,
) -> list[Finding]:
    """Print the plugin plan; the findings about plugins, stores and the cache."""
    installed = installed_plugins()
    findings = _cache_findings(settings)  # first: building a resolver creates its cache dir
    with tempfile.TemporaryDirectory(prefix="vllm-lora-doctor-") as scratch:
        plans = plan_plugins(settings, installed, Path(scratch))
        _print_plans(out, plans)
        findings += registration_findings(plans, settings, environ)
        for plan in plans:
            if not plan.registers or plan.resolver is None:
                continue
            answered = probe_store(plan.plugin, plan.resolver, timeout)
            findings.append(answered)
            store = plan.resolver.store
            if check_writes and answered.level is Level.OK and isinstance(store, BucketStore):
                findings.append(check_conditional_writes(plan.plugin, store, timeout))
    return findings + plugin_list_findings(settings, installed)


def shown_value(name: str, environ: Mapping[str, str]) -> str | None:
    """How ``doctor`` shows variable ``name``: ``None`` when unset, ``set`` for a secret, the
    value otherwise (any ``user:password@``, query or fragment of a URL masked)."""
    value = environ.get(name)
    if value is None:
        return None
    if name in SECRETS:
        return "set"
    return _URL_QUERY.sub(r"\1?***", _USERINFO.sub("//***@", value))


def _print_configuration(out: Console, environ: Mapping[str, str]) -> None:
    out.print(Text("Configuration", style="bold"))
    for variable in ALL_VARIABLES:
        value = shown_value(variable.name, environ)
        shown = f"(default) {variable.default}" if value is None else value
        out.print(line(f"  {variable.name:<40} {shown}"))
    out.print(Text("\nStore and vLLM settings", style="bold"))
    for name in (RUNTIME_UPDATING, *STORE_VARIABLES):
        out.print(line(f"  {name:<40} {shown_value(name, environ) or 'unset'}"))
    vllm = "installed" if find_spec("vllm") is not None else "not installed in this environment"
    out.print(f"  {'vLLM':<40} {vllm}")


def _print_plans(out: Console, plans: list[PluginPlan]) -> None:
    out.print(Text("\nResolvers, in the order vLLM tries them", style="bold"))
    tried = 0
    for plan in plans:
        tried += plan.registers
        position = f"{tried}." if plan.registers else "-"
        name = plan.plugin if plan.plugin.strip() == plan.plugin else repr(plan.plugin)
        detail = plan.detail if plan.error is None else f"{plan.detail}: {plan.error}"
        out.print(line(f"  {position:<3} {name:<26} {detail}"))


@dataclass
class _Asked(Generic[_T]):
    """What a store answered to one question in time (``done`` false: it did not)."""

    answer: _T | None = None
    error: ResolverError | None = None
    done: bool = False
    seconds: float = 0.0


def _ask(question: Callable[[], _T], timeout: float) -> _Asked[_T]:
    """Ask a store ``question``, waiting ``timeout`` seconds at most."""
    asked: _Asked[_T] = _Asked()

    def ask() -> None:
        try:
            asked.answer = question()
        except ResolverError as error:
            asked.error = error
        asked.done = True

    started = time.perf_counter()
    # A daemon thread: a store that never answers must not keep the command from exiting.
    asking = threading.Thread(target=ask, daemon=True)
    asking.start()
    asking.join(timeout)
    asked.seconds = time.perf_counter() - started
    return asked


def probe_store(plugin: str, resolver: Resolver, timeout: float) -> Finding:
    """Ask the store one cheap question within ``timeout`` seconds."""
    store = BY_BACKEND[resolver.backend]
    asked = _ask(lambda: store.probe(resolver.store), timeout)
    if not asked.done:
        return Finding(
            Level.FAIL, f"{plugin}: no answer from {resolver.source} in {timeout:g} s", store.fix
        )
    if asked.error is not None:
        return Finding(Level.FAIL, f"{plugin}: {asked.error}", store.fix)
    return Finding(Level.OK, f"{plugin}: {resolver.source} answered in {asked.seconds:.2f} s")


def check_conditional_writes(plugin: str, store: BucketStore, timeout: float) -> Finding:
    """Whether ``store`` refuses writes whose condition does not hold, as ``vllm-lora publish``
    needs (`BucketStore.conditional_writes`), asked within ``timeout`` seconds."""
    asked = _ask(store.conditional_writes, timeout)
    not_checked = f"{plugin}: conditional writes not checked"
    fix = BY_BACKEND[store.backend].fix
    if not asked.done:
        return Finding(
            Level.FAIL, f"{not_checked}: no answer from {store.source} in {timeout:g} s", fix
        )
    if isinstance(asked.error, StoreRefusedError):
        return Finding(
            Level.WARN,
            f"{not_checked}: {asked.error}",
            "run `vllm-lora doctor --check-writes` with the credentials `vllm-lora publish` uses "
            "(a server's should only read)",
        )
    if asked.answer is None:
        return Finding(Level.FAIL, f"{not_checked}: {asked.error}", fix)
    if asked.answer.honoured:
        return Finding(
            Level.OK,
            f"{plugin}: {store.source} refuses writes whose condition does not hold: "
            "`vllm-lora publish` detects a publisher racing it",
        )
    return Finding(
        Level.FAIL,
        f"{plugin}: {store.source} ignores conditional writes: it carried out "
        f"{asked.answer.ignored()}; `vllm-lora publish` would not detect a publisher racing it, "
        "and refuses the store unless --allow-unconditional-store",
        "publish from one place at a time, with `vllm-lora publish --allow-unconditional-store`, "
        "or keep the adapters in a store that refuses such writes",
    )


def _cache_findings(settings: Settings) -> list[Finding]:
    root = settings.cache_dir
    if root is None:
        return [
            Finding(
                Level.WARN,
                f"{CACHE_DIR.name} is not set: no resolver of this package can register",
                f"export {CACHE_DIR.name}=/var/cache/vllm-lora (a node-local disk)",
            )
        ]
    order = settings.plugin_order
    vllm_fs_loads = order is None or VLLM_FS_PLUGIN in order
    findings = [_cache_dir_finding(root, vllm_fs_loads)]
    filesystem = filesystem_type(root, read_proc(PROC_MOUNTS))
    if filesystem is not None and is_network_filesystem(filesystem):
        findings.append(
            Finding(
                Level.WARN,
                f"the cache {root} is on a {filesystem} filesystem: its locks and leases are not "
                "reliable, and every read crosses the network",
                f"put the cache on a node-local disk; a shared mount belongs in {FS_DIR.name}",
            )
        )
    return findings


def _cache_dir_finding(root: Path, vllm_fs_loads: bool) -> Finding:
    if not root.exists():
        if vllm_fs_loads:
            return Finding(
                Level.FAIL,
                f"the cache {root} does not exist: vLLM's {VLLM_FS_PLUGIN} stops the server",
                f"mkdir -p {root}",
            )
        return Finding(Level.WARN, f"the cache {root} does not exist yet", f"mkdir -p {root}")
    try:
        with tempfile.NamedTemporaryFile(dir=root, prefix=".vllm-lora-doctor-"):
            pass
    except OSError as error:
        return Finding(
            Level.FAIL,
            f"the cache {root} is not writable: {error.strerror}",
            f"let the server's user write to it, or point {CACHE_DIR.name} at a node-local disk",
        )
    return Finding(Level.OK, f"the cache {root} is writable")


def _runtime_updating(environ: Mapping[str, str]) -> Finding:
    if environ.get(RUNTIME_UPDATING, "0").strip().lower() in ("1", "true"):  # as vLLM reads it
        return Finding(Level.OK, f"{RUNTIME_UPDATING} is true")
    return Finding(
        Level.FAIL,
        f"{RUNTIME_UPDATING} is not true: vLLM never asks a resolver for an unknown model",
        f"export {RUNTIME_UPDATING}=true",
    )
