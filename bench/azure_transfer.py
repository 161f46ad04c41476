"""Azure resolver against the SDK's own parallel download of the same blobs (Azurite).

Both run in this process against one Azurite on loopback (azcopy is not installable here): our
cold resolve of a 200 MB adapter (listing, ranged reads pinned by ETag, MD5 verified, publish)
against ``BlobClient.download_blob(max_concurrency=8).readinto(...)`` of each of its files; medians.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from azure.storage.blob import BlobServiceClient

from bench.common import median_seconds, report
from devtools.azure_server import Azurite
from devtools.models import write_large_adapter
from vllm_lora_resolvers.backends.azure import AzureBlobStore
from vllm_lora_resolvers.cache import NodeCache
from vllm_lora_resolvers.config import Settings
from vllm_lora_resolvers.resolver import Resolver

BASE_MODEL = "/models/tiny-llama"
RUNS = 5
MB = 10**6


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-azure-") as directory, Azurite() as server:
        work = Path(directory)
        os.environ["AZURE_STORAGE_CONNECTION_STRING"] = server.connection_string()
        service = BlobServiceClient.from_connection_string(server.connection_string())
        container = service.create_container("bench-azure")
        source = write_large_adapter(work / "src", base_model=BASE_MODEL, size_bytes=200 * MB)
        for path in source.iterdir():
            with path.open("rb") as stream:
                container.upload_blob(f"adapters/big/{path.name}", stream, max_concurrency=8)
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
            resolver = Resolver(
                AzureBlobStore("az://bench-azure/adapters", settings, NodeCache(target))
            )
            assert resolver.resolve(BASE_MODEL, "big") is not None

        def sdk() -> None:
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir()
            client = BlobServiceClient.from_connection_string(server.connection_string())
            for path in source.iterdir():
                blob = client.get_blob_client("bench-azure", f"adapters/big/{path.name}")
                with (target / path.name).open("wb") as stream:
                    blob.download_blob(max_concurrency=8).readinto(stream)

        ours()
        sdk()
        ours_s, sdk_s = median_seconds(ours, RUNS), median_seconds(sdk, RUNS)
    report(
        "Azure resolver (Azurite on loopback)",
        [
            (
                f"ours, cold resolve of {size / MB:.0f} MB (median of {RUNS})",
                f"{ours_s:.2f} s = {size / ours_s / MB:.0f} MB/s",
            ),
            (
                "SDK download_blob(max_concurrency=8).readinto, same files",
                f"{sdk_s:.2f} s = {size / sdk_s / MB:.0f} MB/s",
            ),
            ("ratio ours / SDK (time; target <= 1)", f"{ours_s / sdk_s:.2f}x"),
        ],
    )


if __name__ == "__main__":
    main()
