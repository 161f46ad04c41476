"""Resolve one adapter through the filesystem resolver in a process of its own.

Prints one JSON line: path, lora_int_id, fetched bytes. Options make it wait for a start signal
(to line up many processes), hold its lease until killed, or stall half way through a download
(so a test can kill it there).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from vllm_lora_resolvers import metrics
from vllm_lora_resolvers.backends.filesystem import FilesystemStore
from vllm_lora_resolvers.cache import NodeCache
from vllm_lora_resolvers.config import Settings
from vllm_lora_resolvers.remote import RemoteAdapter, RemoteFile
from vllm_lora_resolvers.resolver import Resolver


class StallingStore(FilesystemStore):
    """Writes half of each weights file, then stalls, as a process killed mid-download would."""

    def download(
        self, adapter: RemoteAdapter, file: RemoteFile, destination: Path
    ) -> Mapping[str, str]:
        if not file.path.startswith("adapter_model"):
            return super().download(adapter, file, destination)
        source = Path(adapter.location) / file.path
        with source.open("rb") as reader, destination.open("wb") as writer:
            writer.write(reader.read(file.size // 2))
            writer.flush()
        print(json.dumps({"stalled": str(destination)}), flush=True)
        time.sleep(3600)
        return {}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("adapters")
    parser.add_argument("cache")
    parser.add_argument("name")
    parser.add_argument("--base", default="/models/tiny-llama")
    parser.add_argument("--start-at", type=float, default=0.0)
    parser.add_argument("--hold", action="store_true")
    parser.add_argument("--stall", action="store_true")
    parser.add_argument("--max-bytes", default="")
    parser.add_argument("--max-rank", default="")
    args = parser.parse_args()
    environ = {"VLLM_LORA_RESOLVER_CACHE_DIR": args.cache}
    if args.max_bytes:
        environ["VLLM_LORA_RESOLVER_CACHE_MAX_BYTES"] = args.max_bytes
    if args.max_rank:
        environ["VLLM_LORA_RESOLVER_MAX_RANK"] = args.max_rank
    settings = Settings.from_environ(environ, argv=[])
    store_class = StallingStore if args.stall else FilesystemStore
    cache = NodeCache(Path(args.cache), settings.cache_max_bytes)
    resolver = Resolver(store_class(Path(args.adapters), settings, cache))
    time.sleep(max(0.0, args.start_at - time.time()))
    resolved = resolver.resolve(args.base, args.name)
    assert resolved is not None
    fetched = metrics.FETCHED_BYTES.labels("fs")._value.get()
    print(
        json.dumps(
            {
                "path": str(resolved.path),
                "lora_int_id": resolved.lora_int_id,
                "fetched": fetched,
                "pid": os.getpid(),
            }
        ),
        flush=True,
    )
    if args.hold:
        sys.stdin.read()  # hold the lease until the test closes our stdin or kills us


if __name__ == "__main__":
    main()
