"""The record of each resolution: its outcome counted and timed (`metrics`) and one log line."""

from __future__ import annotations

import logging
import time

from vllm_lora_resolvers import metrics

logger = logging.getLogger("vllm.lora_resolvers")

#: The outcomes whose resolution line is logged at INFO; the others' at DEBUG.
LOGGED_AT_INFO = ("fetched", "stale", "invalid", "untrusted", "refused", "error")


class Recorder:
    """Records the resolutions of one store's resolver, its ``backend`` their label."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self._metrics = {
            outcome: (
                metrics.RESOLUTIONS.labels(backend, outcome),
                metrics.RESOLVE_SECONDS.labels(backend, outcome),
            )
            for outcome in metrics.OUTCOMES
        }

    def record(self, name: str, outcome: str, version: str, fetched: int, started: float) -> None:
        """Count and log one resolution of ``name`` that began at ``started`` (a
        `time.perf_counter`), ``fetched`` bytes downloaded."""
        seconds = time.perf_counter() - started
        resolutions, latency = self._metrics[outcome]
        resolutions.inc()
        latency.observe(seconds)
        log = logger.info if outcome in LOGGED_AT_INFO else logger.debug
        log(
            "resolution backend=%s name=%r version=%s outcome=%s bytes=%d seconds=%.4f",
            self.backend,
            name[:300],
            version,
            outcome,
            fetched,
            seconds,
        )
