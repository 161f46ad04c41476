"""``python -m devtools.soak``: run a fleet soak, print its summary, exit 0 only if it passed."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from devtools.soak.driver import SoakOptions, run_soak
from devtools.soak.report import summary_table


def parse_options(argv: list[str]) -> tuple[SoakOptions, Path | None]:
    """Options from the command line (defaults: the full soak of ``make soak``)."""
    default = SoakOptions()
    parser = argparse.ArgumentParser(prog="python -m devtools.soak", description=__doc__)
    parser.add_argument("--processes", type=int, default=default.processes)
    parser.add_argument("--adapters", type=int, default=default.adapters)
    parser.add_argument("--requests", type=int, default=default.requests)
    parser.add_argument("--minutes", type=float, default=default.minutes)
    parser.add_argument("--min-size-mb", type=float, default=default.min_size_mb)
    parser.add_argument("--max-size-mb", type=float, default=default.max_size_mb)
    parser.add_argument("--large", type=int, default=default.large, help="adapters over 8 MB")
    parser.add_argument("--invalid", type=int, default=default.invalid)
    parser.add_argument("--cache-cap", type=float, default=default.cache_cap_mb, help="MB")
    parser.add_argument("--fault-times", type=int, default=default.fault_times)
    parser.add_argument("--update-interval", type=float, default=default.update_interval)
    parser.add_argument("--chaos-interval", type=float, default=default.chaos_interval)
    parser.add_argument("--chaos-max", type=int, default=default.chaos_max)
    parser.add_argument("--in-flight", type=int, default=default.in_flight)
    parser.add_argument("--seed", type=int, default=default.seed)
    parser.add_argument("--work", type=Path, default=None, help="parent of the run's temp dir")
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    args = parser.parse_args(argv)
    options = SoakOptions(
        processes=args.processes,
        adapters=args.adapters,
        requests=args.requests,
        minutes=args.minutes,
        min_size_mb=args.min_size_mb,
        max_size_mb=args.max_size_mb,
        large=args.large,
        invalid=args.invalid,
        cache_cap_mb=args.cache_cap,
        fault_times=args.fault_times,
        update_interval=args.update_interval,
        chaos_interval=args.chaos_interval,
        chaos_max=args.chaos_max,
        in_flight=args.in_flight,
        seed=args.seed,
        work=args.work,
    )
    return options, args.json


def main(argv: list[str] | None = None) -> int:
    """Run the soak; 0 when every check held."""
    options, json_path = parse_options(sys.argv[1:] if argv is None else argv)
    report = run_soak(options)
    print(summary_table(report))
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
