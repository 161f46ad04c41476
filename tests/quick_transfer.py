"""The transfer configuration of tests: stores on loopback, quick retries, short fault tests."""

from __future__ import annotations

import dataclasses

from vllm_lora_resolvers.retry import RetryPolicy
from vllm_lora_resolvers.transfer import TransferConfig

#: Stores on loopback: quick retries, so fault tests stay short.
FAST_TRANSFER = TransferConfig(
    transfer_retry=RetryPolicy(attempts=4, base_delay=0.02, max_delay=0.1, budget_seconds=10)
)


def fast_transfer(part_size: int = FAST_TRANSFER.part_size) -> TransferConfig:
    """`FAST_TRANSFER` in parts of ``part_size`` bytes."""
    return dataclasses.replace(FAST_TRANSFER, part_size=part_size)
