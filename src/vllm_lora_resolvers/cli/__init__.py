"""The ``vllm-lora`` command: lint, publish, list and pre-fetch adapters, inspect the node cache,
and diagnose a server's configuration. It runs without vLLM installed.

>>> main(["doctor"])  # doctest: +SKIP
"""

from __future__ import annotations

import logging

import click

from vllm_lora_resolvers.cli.cache import cache_group
from vllm_lora_resolvers.cli.doctor import doctor
from vllm_lora_resolvers.cli.listing import list_adapters
from vllm_lora_resolvers.cli.publish import publish
from vllm_lora_resolvers.cli.pull import pull
from vllm_lora_resolvers.cli.sync import sync
from vllm_lora_resolvers.cli.validate import validate


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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


main.add_command(validate)
main.add_command(publish)
main.add_command(list_adapters)
main.add_command(pull)
main.add_command(cache_group)
main.add_command(doctor)
main.add_command(sync)
