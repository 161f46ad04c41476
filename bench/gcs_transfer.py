"""GCS resolver against a plain gcsfs ``get(recursive=True)`` of the same folder (fake-gcs-server).

Both run in this process against one fake-gcs-server on loopback (200 MB: gcsfs 2026.10 hangs
for good on a 400 MB object from this emulator): our cold resolve of a 200 MB
adapter (download, verify CRC32C, publish) against gcsfs copying the same folder; medians
of runs taken in turn, each into an empty folder (removing the last copy is not timed: a durable
file costs more to delete than one still in the page cache, whose run did not pay to write it).

Then the weights alone, looked up and copied by a new client (``GcsStore.download`` against gcsfs
``get_file``): the store's own work, apart from what the resolve adds to it and gcsfs does not do
(the CRC32C of every byte, making the file durable before it is published).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from bench.common import interleaved_median_seconds, report
from devtools.gcs_server import FakeGcs
from devtools.models import write_large_adapter
from vllm_lora_resolvers.backends.gcs import GcsStore
from vllm_lora_resolvers.cache import NodeCache
from vllm_lora_resolvers.config import Settings
from vllm_lora_resolvers.resolver import Resolver

BASE_MODEL = "/models/tiny-llama"
WEIGHTS = "adapter_model.safetensors"
RUNS = 7
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

        def remove_copies() -> None:
            shutil.rmtree(target, ignore_errors=True)
            (work / WEIGHTS).unlink(missing_ok=True)

        def ours() -> None:
            resolver = Resolver(GcsStore("gs://bench-gcs/adapters", settings, NodeCache(target)))
            assert resolver.resolve(BASE_MODEL, "big") is not None

        def plain_gcsfs() -> None:
            # A fresh client per run, like ours: a reused one hangs here on its second get.
            filesystem = gcsfs.GCSFileSystem(
                token="anon", endpoint_url=server.url, skip_instance_cache=True
            )
            filesystem.get("bench-gcs/adapters/big/", f"{target}/", recursive=True)

        def our_weights() -> None:
            store = GcsStore("gs://bench-gcs/adapters", settings, NodeCache(work / "c2"))
            remote = store.locate("big")
            assert remote is not None
            weights = remote.file(WEIGHTS)
            assert weights is not None
            store.download(remote, weights, work / WEIGHTS)

        def gcsfs_weights() -> None:
            filesystem = gcsfs.GCSFileSystem(
                token="anon", endpoint_url=server.url, skip_instance_cache=True
            )
            filesystem.get_file(f"bench-gcs/adapters/big/{WEIGHTS}", str(work / WEIGHTS))

        operations = (ours, plain_gcsfs, our_weights, gcsfs_weights)
        interleaved_median_seconds(operations, 1, before=remove_copies)  # warm up
        ours_s, gcsfs_s, our_weights_s, gcsfs_weights_s = interleaved_median_seconds(
            operations, RUNS, before=remove_copies
        )
        weights_size = (work / WEIGHTS).stat().st_size
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
            (
                f"ours, the {weights_size / MB:.0f} MB weights alone (GcsStore.download)",
                f"{our_weights_s:.2f} s = {weights_size / our_weights_s / MB:.0f} MB/s",
            ),
            (
                "gcsfs get_file of the same object",
                f"{gcsfs_weights_s:.2f} s = {weights_size / gcsfs_weights_s / MB:.0f} MB/s",
            ),
            ("ratio of the weights alone (time)", f"{our_weights_s / gcsfs_weights_s:.2f}x"),
        ],
    )


if __name__ == "__main__":
    main()
