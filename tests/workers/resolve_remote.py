"""Resolve one adapter through any store's resolver in a process of its own; print one JSON line.

The store is named by the backend of its declaration in `vllm_lora_resolvers.stores` (``s3``,
``gcs``, ``hf``, ``http``, ``fs``...), opened on URI as the command line opens stores.

``--wait-for-go`` prints ``{"ready": true}`` and waits for a line on stdin before resolving (so a
test lines up many processes without guessing times); ``--stall`` stops half way through writing
the weights into the cache's staging folder, prints ``{"stalled": PATH}`` and waits there to be
killed. The answer is ``{"path", "lora_int_id", "fetched"}``, ``fetched`` being the bytes this
process fetched from the store.
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
from vllm_lora_resolvers.cache import NodeCache
from vllm_lora_resolvers.config import Settings
from vllm_lora_resolvers.remote import RemoteAdapter, RemoteFile
from vllm_lora_resolvers.resolver import Resolver
from vllm_lora_resolvers.stores import BY_BACKEND


def make_resolver(backend: str, uri: str, settings: Settings, cache: NodeCache) -> Resolver:
    """The resolver of store ``uri``, of the store ``backend`` declares."""
    return BY_BACKEND[backend].open(uri, settings, cache)


def stall_in_the_weights(resolver: Resolver) -> None:
    """Make ``resolver`` stop for good half way through writing a weights file into staging."""
    store = resolver.store
    download = store.download

    def stalling(adapter: RemoteAdapter, file: RemoteFile, destination: Path) -> Mapping[str, str]:
        declared = download(adapter, file, destination)
        if not file.path.startswith("adapter_model"):
            return declared
        os.truncate(destination, file.size // 2)
        print(json.dumps({"stalled": str(destination)}), flush=True)
        time.sleep(3600)
        raise AssertionError("killed before")

    store.download = stalling  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("backend")
    parser.add_argument("uri")
    parser.add_argument("cache")
    parser.add_argument("name")
    parser.add_argument("--base", default="/models/tiny-llama")
    parser.add_argument("--wait-for-go", action="store_true")
    parser.add_argument("--stall", action="store_true")
    args = parser.parse_args()
    environ = {"VLLM_LORA_RESOLVER_CACHE_DIR": args.cache, "VLLM_LORA_RESOLVER_MAX_RANK": "1000000"}
    settings = Settings.from_environ(environ, argv=[])
    resolver = make_resolver(args.backend, args.uri, settings, NodeCache(Path(args.cache)))
    if args.stall:
        stall_in_the_weights(resolver)
    if args.wait_for_go:
        print(json.dumps({"ready": True}), flush=True)
        sys.stdin.readline()
    resolved = resolver.resolve(args.base, args.name)
    assert resolved is not None
    fetched = metrics.FETCHED_BYTES.labels(resolver.backend)._value.get()
    answer = {"path": str(resolved.path), "lora_int_id": resolved.lora_int_id, "fetched": fetched}
    print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
