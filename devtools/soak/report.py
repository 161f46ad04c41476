"""What a soak run observed, the checks it must pass, and its summary (table and JSON)."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devtools.soak.corpus import CorpusPlan, VersionTable

_MB = 1 << 20
#: Errors a resolution may end with while the store misbehaves (vLLM answers them with a 5xx and
#: the client retries); any other error is a bug.
STORE_ERRORS = frozenset({"StoreUnavailableError", "TransientStoreError", "IntegrityError"})
#: Share of resolutions allowed to end in a store error under injected faults.
MAX_STORE_ERROR_SHARE = 0.02


@dataclass(frozen=True)
class CacheSample:
    """The node cache at one instant."""

    at: float
    snapshot_bytes: int
    unleased_bytes: int
    staging_bytes: int
    steady: bool = True


@dataclass
class Observed:
    """Everything the driver saw during one run."""

    options: dict[str, Any]
    corpus: CorpusPlan
    table: VersionTable
    outputs: list[Path]
    samples: list[CacheSample]
    relay_requests: list[tuple[str, str]]
    relay_body_bytes: int
    cache_root: Path
    kills: int
    crashes: list[str]
    faults_armed: int
    updates: int
    upload_seconds: float
    run_seconds: float
    debris_after_run: list[str] = field(default_factory=list)
    debris_after_restart: list[str] = field(default_factory=list)
    verify_problems: list[str] = field(default_factory=list)


def read_records(outputs: list[Path]) -> list[dict[str, Any]]:
    """Every record of every worker output (a killed worker's torn last line is skipped)."""
    records = []
    for path in outputs:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def percentiles(values: list[float]) -> dict[str, float | int]:
    """Count and p50/p95/p99 in milliseconds."""
    if len(values) < 2:
        return {"count": len(values), **({"p50_ms": values[0] * 1e3} if values else {})}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {
        "count": len(values),
        "p50_ms": round(cuts[49] * 1e3, 2),
        "p95_ms": round(cuts[94] * 1e3, 2),
        "p99_ms": round(cuts[98] * 1e3, 2),
    }


def latency_class(record: dict[str, Any]) -> str:
    """hit / fetch / miss / rejected / invalid / error, for latency percentiles."""
    answer = str(record["answer"])
    if answer == "path":
        return "fetch" if record.get("fetched") else "hit"
    if answer == "none":
        return "rejected" if record["class"] == "hostile" else "miss"
    return answer


def build_report(observed: Observed) -> dict[str, Any]:
    """The run's figures and checks; ``passed`` is whether every check held."""
    records = read_records(observed.outputs)
    resolves = [r for r in records if r["event"] == "resolve"]
    rereads = [r for r in records if r["event"] == "reread"]
    figures = _figures(observed, resolves, rereads)
    checks = _checks(observed, figures)
    return {
        "passed": all(check["passed"] for check in checks.values()),
        "checks": checks,
        "figures": figures,
        "options": observed.options,
    }


def _figures(
    observed: Observed, resolves: list[dict[str, Any]], rereads: list[dict[str, Any]]
) -> dict[str, Any]:
    wrong = [r for r in resolves if r.get("problem")]
    errors = Counter(r["error_type"] for r in resolves if r["answer"] == "error")
    served = {(r["name"], r["version"]) for r in resolves if r["answer"] == "path"}
    minimum = sum(observed.table.version_bytes(n, v) for n, v in served if _known(observed, n, v))
    absent = sum(1 for r in resolves if r["class"] == "absent")
    absent_requests = sum(1 for _, path in observed.relay_requests if "absent-" in path)
    samples = observed.samples or [CacheSample(0, 0, 0, 0)]
    steady = [s for s in samples if s.steady] or [CacheSample(0, 0, 0, 0)]
    by_class: dict[str, list[float]] = {}
    for record in resolves:
        by_class.setdefault(latency_class(record), []).append(record["seconds"])
    return {
        "resolutions": len(resolves),
        "answers": dict(Counter(r["answer"] for r in resolves)),
        "wrong_answers": len(wrong),
        "wrong_examples": [r["problem"] for r in wrong[:5]],
        "rereads": len(rereads),
        "vanished_or_changed": sum(1 for r in rereads if r["problem"]),
        "reread_examples": [f"{r['path']}: {r['problem']}" for r in rereads if r["problem"]][:5],
        "errors_by_type": dict(errors),
        "error_examples": sorted({r["error"] for r in resolves if r["answer"] == "error"})[:5],
        "unexpected_error_examples": sorted(
            {
                r["error"]
                for r in resolves
                if r["answer"] == "error" and r["error_type"] not in STORE_ERRORS
            }
        )[:5],
        "distinct_versions_served": len(served),
        "store_body_bytes": observed.relay_body_bytes,
        "minimum_body_bytes": minimum,
        "store_requests": len(observed.relay_requests),
        "store_requests_per_resolution": _ratio(len(observed.relay_requests), len(resolves)),
        "absent_resolutions": absent,
        "absent_store_requests": absent_requests,
        "absent_requests_per_resolution": _ratio(absent_requests, absent),
        "hostile_store_requests": sum(1 for _, p in observed.relay_requests if "hostile" in p),
        "cache_cap_bytes": int(observed.options["cache_cap_mb"] * _MB),
        "cache_bound_bytes": _cache_bound(observed),
        "cache_max_bytes": max(s.snapshot_bytes + s.staging_bytes for s in samples),
        "cache_max_unleased_bytes": max(s.unleased_bytes + s.staging_bytes for s in steady),
        "cache_samples": len(observed.samples),
        "cache_steady_samples": sum(1 for s in samples if s.steady),
        "latency": {name: percentiles(values) for name, values in sorted(by_class.items())},
        "chaos_kills": observed.kills,
        "crashes": observed.crashes,
        "faults_armed": observed.faults_armed,
        "updates": observed.updates,
        "debris_after_run": observed.debris_after_run,
        "debris_after_restart": observed.debris_after_restart,
        "verify_problems": observed.verify_problems,
        "upload_seconds": round(observed.upload_seconds, 1),
        "run_seconds": round(observed.run_seconds, 1),
    }


def _known(observed: Observed, name: str, version: str) -> bool:
    return version in observed.table.versions.get(name, {})


def _ratio(part: int, whole: int) -> float:
    return round(part / whole, 3) if whole else 0.0


def _cache_bound(observed: Observed) -> int:
    """The cap plus one largest adapter in flight per process."""
    cap = int(observed.options["cache_cap_mb"] * _MB)
    return cap + int(observed.options["processes"]) * observed.corpus.largest_bytes


def _checks(observed: Observed, figures: dict[str, Any]) -> dict[str, dict[str, Any]]:
    resolutions = max(1, figures["resolutions"])
    store_errors = sum(n for t, n in figures["errors_by_type"].items() if t in STORE_ERRORS)
    other_errors = {t: n for t, n in figures["errors_by_type"].items() if t not in STORE_ERRORS}

    def check(passed: bool, detail: object) -> dict[str, Any]:
        return {"passed": bool(passed), "detail": detail}

    return {
        "ran": check(figures["resolutions"] > 0, figures["resolutions"]),
        "zero wrong answers": check(figures["wrong_answers"] == 0, figures["wrong_examples"]),
        "zero vanished or changed paths": check(
            figures["vanished_or_changed"] == 0, figures["reread_examples"]
        ),
        "no unexpected errors": check(not other_errors, other_errors),
        "store errors within budget": check(
            store_errors <= MAX_STORE_ERROR_SHARE * resolutions,
            f"{store_errors} of {figures['resolutions']}",
        ),
        "no crashes": check(not figures["crashes"], figures["crashes"]),
        "hostile names never reach the store": check(
            figures["hostile_store_requests"] == 0, figures["hostile_store_requests"]
        ),
        "unleased cache (steady samples) within cap + processes x largest": check(
            figures["cache_max_unleased_bytes"] <= figures["cache_bound_bytes"],
            f"{figures['cache_max_unleased_bytes']} <= {figures['cache_bound_bytes']}",
        ),
        "no debris after restart": check(
            not figures["debris_after_restart"], figures["debris_after_restart"]
        ),
        "cache verifies": check(not figures["verify_problems"], figures["verify_problems"][:5]),
    }


def summary_table(report: dict[str, Any]) -> str:
    """The report as a plain-text table."""
    f = report["figures"]
    mb = f"{f['cache_cap_bytes'] / _MB:.0f} / {f['cache_bound_bytes'] / _MB:.0f} MB"
    events = f"{f['chaos_kills']} / {f['updates']} / {f['faults_armed']}"
    debris = f"{len(f['debris_after_run'])} / {len(f['debris_after_restart'])}"
    rows = [
        ("resolutions", f"{f['resolutions']} {f['answers']}"),
        ("wrong answers", f["wrong_answers"]),
        ("re-reads / vanished or changed", f"{f['rereads']} / {f['vanished_or_changed']}"),
        ("errors", f["errors_by_type"] or "none"),
        ("store body bytes (actual / min)", _bytes_pair(f)),
        ("store requests / resolution", f["store_requests_per_resolution"]),
        ("absent: store requests / resolutions", _absent(f)),
        ("cache max (all / unleased)", _cache(f)),
        ("cache cap / bound", mb),
        ("chaos kills / updates / faults armed", events),
        ("debris after run / after restart", debris),
        ("upload / run seconds", f"{f['upload_seconds']} / {f['run_seconds']}"),
    ]
    rows += [(f"latency {name}", _latency(values)) for name, values in f["latency"].items()]
    rows += [
        (f"check: {name}", "PASS" if c["passed"] else f"FAIL {c['detail']}")
        for name, c in report["checks"].items()
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name.ljust(width)}  {value}" for name, value in rows]
    lines.append(f"{'RESULT'.ljust(width)}  {'PASS' if report['passed'] else 'FAIL'}")
    # The last lines of a failed run name each failed check and its evidence.
    lines += [
        f"FAILED check {name!r}: {check['detail']}"
        for name, check in report["checks"].items()
        if not check["passed"]
    ]
    return "\n".join(lines)


def _bytes_pair(f: dict[str, Any]) -> str:
    actual, minimum = f["store_body_bytes"], f["minimum_body_bytes"]
    factor = actual / minimum if minimum else 0.0
    return f"{actual / _MB:.1f} / {minimum / _MB:.1f} MB ({factor:.2f}x)"


def _absent(f: dict[str, Any]) -> str:
    return (
        f"{f['absent_store_requests']} / {f['absent_resolutions']} "
        f"({f['absent_requests_per_resolution']})"
    )


def _cache(f: dict[str, Any]) -> str:
    return f"{f['cache_max_bytes'] / _MB:.1f} / {f['cache_max_unleased_bytes'] / _MB:.1f} MB"


def _latency(values: dict[str, float | int]) -> str:
    return " ".join(f"{key}={value}" for key, value in values.items())
