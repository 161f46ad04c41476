"""Resolve one adapter through a remote-store resolver again and again (a pause between two), in a
process of its own, until a stop file appears; print a JSON line for each snapshot handed out that
differs from the one before: its path and the SHA-256 of its files, read while it is leased."""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

from vllm_lora_resolvers.cache import NodeCache
from vllm_lora_resolvers.config import Settings
from vllm_lora_resolvers.stores import STORES
from workers.resolve_remote import make_resolver


def files_digest(folder: Path) -> str:
    """A SHA-256 of the names and bytes of the files in ``folder``."""
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        digest.update(f"{path.name}\0{hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("backend", choices=[store.backend for store in STORES if store.bucket])
    parser.add_argument("uri")
    parser.add_argument("cache")
    parser.add_argument("name")
    parser.add_argument("stop_file", type=Path)
    parser.add_argument("--base", default="/models/tiny-llama")
    parser.add_argument("--pause", type=float, default=0.05)
    args = parser.parse_args()
    environ = {"VLLM_LORA_RESOLVER_CACHE_DIR": args.cache}
    settings = Settings.from_environ(environ, argv=[])
    resolver = make_resolver(args.backend, args.uri, settings, NodeCache(Path(args.cache)))
    last = None
    resolutions = 0
    while not args.stop_file.exists():
        resolved = resolver.resolve(args.base, args.name)
        assert resolved is not None
        resolutions += 1
        if resolved.path != last:
            last = resolved.path
            line = {"path": str(last), "digest": files_digest(last), "resolutions": resolutions}
            print(json.dumps(line), flush=True)
        time.sleep(args.pause)
    print(json.dumps({"resolutions": resolutions}), flush=True)


if __name__ == "__main__":
    main()
