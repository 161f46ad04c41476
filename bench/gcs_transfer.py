"""GCS resolver against a plain gcsfs ``get(recursive=True)`` of the same folder (fake-gcs-server).

Both run in this process against one fake-gcs-server on loopback (200 MB: gcsfs 2026.10 hangs
for good on a 400 MB object from this emulator): our cold resolve of a 200 MB
adapter (download, verify CRC32C, publish) against gcsfs copying the same folder; medians.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from bench.common import median_seconds, report
from devtools.gcs_server import FakeGcs
from devtools.models import write_large_adapter
from vllm_lora_resolvers.backends.gcs import GcsStore
from vllm_lora_resolvers.cache import NodeCache
from vllm_lora_resolvers.config import Settings
from vllm_lora_resolvers.resolver import Resolver

BASE_MODEL = "/models/tiny-llama"
RUNS = 5
MB = 10**6


def main() -> None:
    os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"  # else gcsfs waits 60 s on a probe
    import gcsfs

    with tempfile.TemporaryDirectory(prefix="bench-gcs-") as directory, FakeGcs() as server:
        work = Path(directory)
        os.environ["STORAGE_EMULATOR_HOST"] = server.url
        client = storage.Client(project="bench", credentials=AnonymousCredentials())
        bucket = client.create_bucket("bench-gcs")
        source = write_large_adapter(work / "src", base_model=BASE_MODEL, size_bytes=200 * MB)
        for path in source.iterdir():
            bucket.blob(f"adapters/big/{path.name}").upload_from_filename(str(path))
        size = sum(path.stat().st_size for path in source.iterdir())
        settings = Settings.from_environ(
            {
                "VLLM_LORA_RESOLVER_CACHE_DIR": str(work / "c"),
                "VLLM_LORA_RESOLVER_MAX_RANK": "10000000",
            },
            argv=[],
        )
        target = work / "target"

        def ours() -> None:
            shutil.rmtree(target, ignore_errors=True)
            resolver = Resolver(GcsStore("gs://bench-gcs/adapters", settings, NodeCache(target)))
            assert resolver.resolve(BASE_MODEL, "big") is not None

        def plain_gcsfs() -> None:
            shutil.rmtree(target, ignore_errors=True)
            # A fresh client per run, like ours: a reused one hangs here on its second get.
            filesystem = gcsfs.GCSFileSystem(
                token="anon", endpoint_url=server.url, skip_instance_cache=True
            )
            filesystem.get("bench-gcs/adapters/big/", f"{target}/", recursive=True)

        ours()
        plain_gcsfs()
        ours_s, gcsfs_s = median_seconds(ours, RUNS), median_seconds(plain_gcsfs, RUNS)
    report(
        "GCS resolver (fake-gcs-server on loopback)",
        [
            (
                f"ours, cold resolve of {size / MB:.0f} MB (median of {RUNS})",
                f"{ours_s:.2f} s = {size / ours_s / MB:.0f} MB/s",
            ),
            (
                "gcsfs get(recursive=True) of the same folder",
                f"{gcsfs_s:.2f} s = {size / gcsfs_s / MB:.0f} MB/s",
            ),
            ("ratio ours / gcsfs (time; target <= 1)", f"{ours_s / gcsfs_s:.2f}x"),
        ],
    )


if __name__ == "__main__":
    main()
