"""Resolve one adapter through a remote-store resolver in a process of its own; print its path."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from vllm_lora_resolvers.cache import NodeCache
from vllm_lora_resolvers.config import Settings
from vllm_lora_resolvers.resolver import BaseStorageResolver
from vllm_lora_resolvers.stores import BY_BACKEND, BY_SCHEME


def make_resolver(
    backend: str, uri: str, settings: Settings, cache: NodeCache
) -> BaseStorageResolver:
    """The resolver of store ``uri``, of the backend named ``backend`` (``s3``, ``gcs``, ...)."""
    return BY_BACKEND[backend].open(uri, settings, cache)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("backend", choices=[store.backend for store in BY_SCHEME.values()])
    parser.add_argument("uri")
    parser.add_argument("cache")
    parser.add_argument("name")
    parser.add_argument("--base", default="/models/tiny-llama")
    parser.add_argument("--start-at", type=float, default=0.0)
    args = parser.parse_args()
    environ = {"VLLM_LORA_RESOLVER_CACHE_DIR": args.cache, "VLLM_LORA_RESOLVER_MAX_RANK": "1000000"}
    settings = Settings.from_environ(environ, argv=[])
    resolver = make_resolver(args.backend, args.uri, settings, NodeCache(Path(args.cache)))
    time.sleep(max(0.0, args.start_at - time.time()))
    resolved = resolver.resolve(args.base, args.name)
    assert resolved is not None
    print(resolved.path, flush=True)


if __name__ == "__main__":
    main()
