"""Run every benchmark (`make bench`), or the ones named: `python -m bench fs_resolver`."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = (
    "small_adapter",
    "fs_resolver",
    "s3_transfer",
    "signing",
    "gcs_transfer",
    "azure_transfer",
    "hf_hub",
    "outage",
    "e2e_ttft",
    "rollout",
)


def main() -> None:
    chosen = sys.argv[1:] or list(BENCHMARKS)
    for name in chosen:
        importlib.import_module(f"bench.{name}").main()


if __name__ == "__main__":
    main()
