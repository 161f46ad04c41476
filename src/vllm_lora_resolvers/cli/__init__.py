"""The ``vllm-lora`` command: lint, publish, list and pre-fetch adapters, inspect the node cache,
and diagnose a server's configuration. It runs without vLLM installed.

>>> main(["doctor"])  # doctest: +SKIP
"""

from __future__ import annotations

import atexit
import gc
import importlib
import logging

import click

#: Each command, by the module and function that define it: a command imports only its own
#: module (``vllm-lora pull`` in an init container never pays for ``doctor``'s imports).
COMMANDS = {
    "validate": ("validate", "validate"),
    "publish": ("publish", "publish"),
    "ls": ("listing", "list_adapters"),
    "pull": ("pull", "pull"),
    "cache": ("cache", "cache_group"),
    "doctor": ("doctor", "doctor"),
    "sync": ("sync", "sync"),
}


class LazyCommands(click.Group):
    """A group whose commands are imported when they are run (or help lists them)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module, function = COMMANDS[cmd_name]
        command: click.Command = getattr(
            importlib.import_module(f"vllm_lora_resolvers.cli.{module}"), function
        )
        return command


@click.group(cls=LazyCommands, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log what the resolvers do.")
@click.version_option(package_name="vllm-lora-resolvers")
def main(verbose: bool) -> None:
    """Operate the vLLM LoRA resolvers: adapters in stores, this node's cache, the setup.

    Exit codes: 0 yes (valid, cached, intact, healthy); 1 no (invalid, failed, damaged, a
    FAIL); 2 the question could not be answered (usage, configuration, an unreadable store).
    """
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    # The process ends with the command, and what it built (modules, botocore's service models)
    # lives until then: the interpreter's last garbage collections would only walk it all again
    # (~80 ms of a one-shot `vllm-lora pull`), so the objects are set aside from them. Once per
    # process, however many commands it runs (tests run many).
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)
