"""A shortened fleet soak: 4 server processes, 30 adapters of 1-8 MB, 400 requests, faults on,
adapters re-uploaded during the run, one worker killed with -9 and replaced."""

from __future__ import annotations

from pathlib import Path

import pytest

from devtools.soak.driver import SoakOptions, run_soak
from devtools.soak.report import summary_table

pytestmark = [pytest.mark.soak, pytest.mark.vllm, pytest.mark.timeout(300)]


def test_short_soak_keeps_every_promise(tmp_path: Path) -> None:
    options = SoakOptions(
        processes=4,
        adapters=30,
        requests=400,
        minutes=3.0,
        max_size_mb=8.0,
        large=0,
        invalid=4,
        cache_cap_mb=40.0,
        update_interval=2.0,
        chaos_interval=2.0,
        chaos_max=1,
        work=tmp_path,
    )
    report = run_soak(options)
    print(summary_table(report))
    figures, checks = report["figures"], report["checks"]
    assert figures["resolutions"] == 400
    assert figures["chaos_kills"] == 1
    assert figures["updates"] > 0 and figures["faults_armed"] > 0
    assert figures["answers"].get("invalid", 0) > 0 and figures["answers"].get("none", 0) > 0
    failed = {name: check["detail"] for name, check in checks.items() if not check["passed"]}
    assert not failed, summary_table(report)


def test_a_failed_soak_names_each_failed_check_and_its_evidence_last() -> None:
    figures = {
        "resolutions": 1, "answers": {}, "wrong_answers": 0, "rereads": 0,
        "vanished_or_changed": 0, "errors_by_type": {}, "store_body_bytes": 0,
        "minimum_body_bytes": 0, "store_requests_per_resolution": 0.0,
        "absent_store_requests": 0, "absent_resolutions": 0, "absent_requests_per_resolution": 0,
        "cache_max_bytes": 0, "cache_max_unleased_bytes": 0, "cache_cap_bytes": 0,
        "cache_bound_bytes": 0, "chaos_kills": 0, "updates": 0, "faults_armed": 0,
        "debris_after_run": [], "debris_after_restart": ["staging/x"], "upload_seconds": 0,
        "run_seconds": 0, "latency": {},
    }  # fmt: skip
    checks = {
        "ran": {"passed": True, "detail": 1},
        "no debris after restart": {"passed": False, "detail": ["staging/x"]},
    }
    report = {"passed": False, "checks": checks, "figures": figures}
    assert summary_table(report).splitlines()[-1] == (
        "FAILED check 'no debris after restart': ['staging/x']"
    )
