"""Retries with exponential backoff, full jitter and a total time budget."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from vllm_lora_resolvers.errors import TransientStoreError

logger = logging.getLogger("vllm.lora_resolvers.retry")

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try: ``attempts`` in all, sleeping ``U(0, min(max_delay, base*2^n))``
    between them, and never starting an attempt after ``budget_seconds`` have passed."""

    attempts: int = 6
    base_delay: float = 0.2
    max_delay: float = 5.0
    budget_seconds: float = 20.0

    def delay(self, attempt: int) -> float:
        """Seconds to sleep after failed attempt number ``attempt`` (0-based)."""
        return random.uniform(0.0, min(self.max_delay, self.base_delay * 2**attempt))


def call_with_retries(
    operation: Callable[[], T],
    policy: RetryPolicy,
    describe: str,
    on_retry: Callable[[TransientStoreError], None] | None = None,
) -> T:
    """Run ``operation``; retry it on `TransientStoreError` as ``policy`` allows.

    The last error is re-raised once attempts or the time budget run out.
    """
    deadline = time.monotonic() + policy.budget_seconds
    for attempt in range(policy.attempts):
        try:
            return operation()
        except TransientStoreError as error:
            pause = policy.delay(attempt)
            out_of_time = time.monotonic() + pause >= deadline
            if attempt == policy.attempts - 1 or out_of_time:
                raise
            logger.warning(
                "%s failed (%s); retry %d/%d in %.2fs",
                describe,
                error,
                attempt + 1,
                policy.attempts - 1,
                pause,
            )
            if on_retry is not None:
                on_retry(error)
            time.sleep(pause)
    raise AssertionError("unreachable: the loop returns or raises")
