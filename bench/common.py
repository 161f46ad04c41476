"""Small helpers shared by the benchmarks: timing, medians, printing a table."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence


def median_seconds(operation: Callable[[], object], repeat: int) -> float:
    """Median wall time of ``operation`` over ``repeat`` runs."""
    return interleaved_median_seconds([operation], repeat)[0]


def interleaved_median_seconds(
    operations: Sequence[Callable[[], object]],
    repeat: int,
    *,
    before: Callable[[], object] = lambda: None,
) -> list[float]:
    """Median wall time of each of ``operations`` over ``repeat`` rounds that run each once in
    turn, so that the load other processes put on the machine meanwhile weighs on all alike;
    ``before()`` runs untimed before each (to remove what the last one wrote, say)."""
    samples: list[list[float]] = [[] for _ in operations]
    for _ in range(repeat):
        for operation, times in zip(operations, samples, strict=True):
            before()
            started = time.perf_counter()
            operation()
            times.append(time.perf_counter() - started)
    return [statistics.median(times) for times in samples]


def report(title: str, rows: list[tuple[str, str]]) -> None:
    """Print a titled two-column table."""
    width = max(len(label) for label, _ in rows)
    print(f"\n== {title}")
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")
