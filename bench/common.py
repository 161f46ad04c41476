"""Small helpers shared by the benchmarks: timing, medians, printing a table."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_seconds(operation: Callable[[], object], repeat: int) -> float:
    """Median wall time of ``operation`` over ``repeat`` runs."""
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        operation()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def report(title: str, rows: list[tuple[str, str]]) -> None:
    """Print a titled two-column table."""
    width = max(len(label) for label, _ in rows)
    print(f"\n== {title}")
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")
