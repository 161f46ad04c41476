"""Retries with exponential backoff, full jitter, a time budget per call and one per resolution.

There is one retry layer per failure: `call_with_retries` marks an error it gave up on
(``TransientStoreError.retried``), and an outer `call_with_retries` re-raises such an error at once,
so retries around retries (a file's around its parts') never multiply. `time_budget` sets the
moment after which no retry starts, for the calling thread and the work it hands to others
(`transfer` runs its parts in the caller's context).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TypeVar

from vllm_lora_resolvers.errors import TransientStoreError

logger = logging.getLogger("vllm.lora_resolvers.retry")

T = TypeVar("T")

#: The monotonic time after which no retry starts in this context (a resolution's budget).
_NO_RETRY_AFTER: ContextVar[float] = ContextVar("no_retry_after", default=math.inf)


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


@contextmanager
def time_budget(seconds: float) -> Iterator[None]:
    """No retry starts in this context more than ``seconds`` from now (nor after an enclosing
    budget ends)."""
    token = _NO_RETRY_AFTER.set(min(_NO_RETRY_AFTER.get(), time.monotonic() + seconds))
    try:
        yield
    finally:
        _NO_RETRY_AFTER.reset(token)


def call_with_retries(
    operation: Callable[[], T],
    policy: RetryPolicy,
    describe: str,
    on_retry: Callable[[TransientStoreError], None] | None = None,
) -> T:
    """Run ``operation``; retry it on `TransientStoreError` as ``policy`` and the time budget
    allow, unless another layer already gave up on that error.

    The last error is re-raised, marked as retried, once attempts or time run out.
    """
    deadline = min(time.monotonic() + policy.budget_seconds, _NO_RETRY_AFTER.get())
    for attempt in range(policy.attempts):
        try:
            return operation()
        except TransientStoreError as error:
            pause = policy.delay(attempt)
            out_of_time = time.monotonic() + pause >= deadline
            if error.retried or attempt == policy.attempts - 1 or out_of_time:
                error.retried = True
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
