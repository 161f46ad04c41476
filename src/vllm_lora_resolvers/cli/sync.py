"""``vllm-lora sync --server URL``: keep a running server's adapters at their store's version.

It runs beside each server (a sidecar container, a systemd unit), configured by the same
environment as the server's resolvers. See `vllm_lora_resolvers.sync` for what a round does.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
import threading
from types import FrameType

import click
from prometheus_client import start_http_server

from vllm_lora_resolvers.cli.output import (
    CannotCheckError,
    cannot_check,
    max_rank_option,
    seconds_option,
)
from vllm_lora_resolvers.config import Settings
from vllm_lora_resolvers.configured import configured_resolvers, node_cache
from vllm_lora_resolvers.sync import AdapterSync, VllmServerApi

#: Its log lines' format: a long-running process's lines carry the time.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@click.command()
@click.option("--server", required=True, help="The vLLM server, e.g. http://127.0.0.1:8000.")
@seconds_option(
    "--interval",
    minimum=1,
    default=30.0,
    help="Seconds between rounds; a change reaches the server within one, plus the fetch.",
)
@click.option("--once", is_flag=True, help="Run one round and exit with its result.")
@click.option(
    "--on-delete",
    type=click.Choice(["unload", "keep"]),
    default="unload",
    show_default=True,
    help="What to do with an adapter gone from its store.",
)
@seconds_option(
    "--drain-seconds",
    minimum=0,
    default=600.0,
    help="Longest a replaced version stays leased when the server is never seen idle.",
)
@click.option(
    "--api-key",
    envvar="VLLM_API_KEY",
    help="The server's --api-key [VLLM_API_KEY], sent to --server only: no redirect is followed.",
)
@max_rank_option
@click.option(
    "--metrics-port", type=click.IntRange(min=0, max=65535), default=0, help="Serve /metrics."
)
def sync(
    *,
    server: str,
    interval: float,
    once: bool,
    on_delete: str,
    drain_seconds: float,
    api_key: str | None,
    max_rank: int | None,
    metrics_port: int,
) -> None:
    """Keep the adapters a vLLM server holds at their store's current version.

    Each round: new versions are fetched and checked into the node cache, then switched to
    without failing a request; adapters gone from their store are unloaded; a refused new
    version leaves the old one served. With --once: one round that asks the store afresh, then
    wait until replaced versions are drained; exit 0 when everything is in sync, 1 when a new
    version was refused or a switch failed, 2 when the server or a store could not be asked (or
    the server answered what the sync cannot read).
    """
    logging.getLogger("vllm.lora_resolvers.sync").setLevel(logging.INFO)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
    with cannot_check():
        settings = Settings.from_environ(argv=[])
        if max_rank is not None:
            settings = dataclasses.replace(settings, max_rank=max_rank)
        resolvers = {resolver.source: resolver for _, resolver in configured_resolvers(settings)}
        if not resolvers:
            raise CannotCheckError("no store is configured: set the server's VLLM_LORA_RESOLVER_*")
        adapter_sync = AdapterSync(
            VllmServerApi(server, api_key),
            resolvers,
            node_cache(settings, "vllm-lora sync"),
            interval=interval,
            on_delete="keep" if on_delete == "keep" else "unload",
            drain_seconds=drain_seconds,
            answer_max_age=0.0 if once else None,
        )
    if once:
        result = adapter_sync.run_round()
        adapter_sync.drain()
        sys.exit(int(result))
    if metrics_port:
        start_http_server(metrics_port)
    stop = threading.Event()

    def stop_on_signal(_: int, __: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, stop_on_signal)
    signal.signal(signal.SIGINT, stop_on_signal)
    click.echo(f"syncing {server} every {interval:g} s from {', '.join(resolvers)}")
    adapter_sync.run(stop)
