"""The soak's bucket: adapters of mixed sizes, some invalid, and what each version holds.

The driver writes every adapter version it uploads into a `VersionTable` (adapter -> version ->
file -> sha256 and size), saved atomically as JSON; workers read it to check that the bytes behind
a path are those of the version its snapshot's manifest claims. Versions are computed exactly as
the S3 backend computes them, from one listing of the adapter's folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from devtools.models import write_broken_safetensors, write_large_adapter, write_lora_adapter
from devtools.stores import upload_folder
from vllm_lora_resolvers.adapter import adapter_from_listing
from vllm_lora_resolvers.remote import RemoteFile

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

BASE_MODEL = "/models/tiny-llama"
PREFIX = "adapters"
WEIGHTS = "adapter_model.safetensors"
_MB = 1 << 20
#: Bytes of weights per unit of rank in `write_large_adapter` (q_proj and v_proj of the tiny Llama).
_BYTES_PER_RANK = 4 * 2 * ((128 + 128) + (128 + 64))

Kind = Literal["valid", "rank_too_high", "broken_weights"]
BrokenKind = Literal["truncated", "bad_header", "offsets_out_of_range"]


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter of the corpus: its name, what it is and (for valid ones) its weights' size."""

    name: str
    kind: Kind
    size_bytes: int


@dataclass(frozen=True)
class CorpusPlan:
    """Every adapter to upload and the rank limit the workers run with."""

    adapters: tuple[AdapterSpec, ...]
    max_rank: int

    @property
    def largest_bytes(self) -> int:
        """The largest adapter's weights, in bytes (an upper bound: config files are tiny)."""
        return max(spec.size_bytes for spec in self.adapters) + _MB

    def valid(self) -> list[AdapterSpec]:
        """The adapters a worker must be able to resolve."""
        return [spec for spec in self.adapters if spec.kind == "valid"]


def plan_corpus(
    count: int, *, min_mb: float, max_mb: float, large: int, invalid: int, seed: int
) -> CorpusPlan:
    """``count`` adapters: ``invalid`` refused ones, ``large`` big ones up to ``max_mb``, the rest
    log-uniform between ``min_mb`` and ``min(8, max_mb)`` MB."""
    rng = random.Random(seed)
    small_top = min(8.0, max_mb)
    specs: list[AdapterSpec] = []
    for index in range(count):
        name = f"adapter-{index:04d}"
        if index < invalid:
            kind: Kind = "rank_too_high" if index % 2 == 0 else "broken_weights"
            specs.append(AdapterSpec(name, kind, 64 << 10))
            continue
        if index < invalid + large:
            mb = small_top + (max_mb - small_top) * (index - invalid + 1) / large
        else:
            mb = math.exp(rng.uniform(math.log(min_mb), math.log(small_top)))
        specs.append(AdapterSpec(name, "valid", int(mb * _MB)))
    rng.shuffle(specs)
    largest = max(spec.size_bytes for spec in specs)
    return CorpusPlan(tuple(specs), max_rank=largest // _BYTES_PER_RANK + 1)


@dataclass
class VersionTable:
    """adapter -> version -> file -> ``[sha256, size]``; saved atomically for the workers."""

    path: Path
    versions: dict[str, dict[str, dict[str, list[str | int]]]] = field(default_factory=dict)
    _guard: threading.Lock = field(default_factory=threading.Lock)

    def add(self, name: str, version: str, files: dict[str, list[str | int]]) -> None:
        """Record ``version`` of ``name`` and save the table."""
        with self._guard:
            self.versions.setdefault(name, {})[version] = files
            temporary = self.path.with_suffix(f".{os.getpid()}.tmp")
            temporary.write_text(json.dumps(self.versions))
            temporary.replace(self.path)

    def version_bytes(self, name: str, version: str) -> int:
        """Bytes of the files of one version."""
        return sum(int(entry[1]) for entry in self.versions[name][version].values())


def load_versions(path: Path) -> dict[str, dict[str, dict[str, list[str | int]]]]:
    """The table as the driver last saved it."""
    loaded: dict[str, dict[str, dict[str, list[str | int]]]] = json.loads(path.read_text())
    return loaded


def file_digest(path: Path) -> str:
    """sha256 of a file, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while piece := stream.read(_MB):
            digest.update(piece)
    return digest.hexdigest()


def write_adapter(spec: AdapterSpec, directory: Path, seed: int, max_rank: int) -> Path:
    """Write adapter ``spec`` (version ``seed``) into ``directory``."""
    if spec.kind == "rank_too_high":
        return write_lora_adapter(
            directory, base_model=BASE_MODEL, seed=seed, extra_config={"r": max_rank + 1}
        )
    if spec.kind == "broken_weights":
        write_lora_adapter(directory, base_model=BASE_MODEL, seed=seed)
        kinds: tuple[BrokenKind, ...] = ("truncated", "bad_header", "offsets_out_of_range")
        write_broken_safetensors(directory / WEIGHTS, kinds[seed % len(kinds)])
        return directory
    return write_large_adapter(
        directory, base_model=BASE_MODEL, size_bytes=spec.size_bytes, seed=seed
    )


class Uploader:
    """Writes adapter versions, uploads them (straight to the store) and records their versions."""

    def __init__(self, client: S3Client, bucket: str, table: VersionTable, work: Path) -> None:
        self.client = client
        self.bucket = bucket
        self.table = table
        self.work = work

    def upload(self, spec: AdapterSpec, seed: int, max_rank: int, *, weights_only: bool) -> None:
        """Upload version ``seed`` of ``spec`` (only its weights file when ``weights_only``, so a
        reader sees the old version or the new one, never a mix), then record its version."""
        with tempfile.TemporaryDirectory(dir=self.work) as tmp:
            folder = write_adapter(spec, Path(tmp) / spec.name, seed, max_rank)
            if weights_only:
                (folder / "adapter_config.json").unlink()
            upload_folder(self.client, self.bucket, f"{PREFIX}/{spec.name}", folder)
            digests = {p.name: file_digest(p) for p in folder.iterdir()}
            shutil.rmtree(folder)
        self._record(spec.name, digests)

    def _record(self, name: str, digests: dict[str, str]) -> None:
        folder = f"{PREFIX}/{name}/"
        page = self.client.list_objects_v2(Bucket=self.bucket, Prefix=folder, Delimiter="/")
        listed = {
            item["Key"][len(folder) :]: RemoteFile(
                item["Key"][len(folder) :], item.get("Size", 0), etag=item.get("ETag", "")
            )
            for item in page.get("Contents", [])
        }
        remote = adapter_from_listing(name, f"s3://{self.bucket}/{folder}", listed)
        assert remote is not None, f"{name} has no config after upload"
        known = self.table.versions.get(name, {})
        previous = next(iter(known.values()), {}) if known else {}
        files: dict[str, list[str | int]] = {}
        for file in remote.files:
            digest = digests.get(file.path) or str(previous[file.path][0])
            files[file.path] = [digest, file.size]
        self.table.add(name, remote.version, files)


def upload_corpus(uploader: Uploader, plan: CorpusPlan, workers: int = 3) -> None:
    """Upload version 0 of every adapter of ``plan``, a few at a time."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [
            pool.submit(uploader.upload, spec, 0, plan.max_rank, weights_only=False)
            for spec in plan.adapters
        ]
        for future in futures:
            future.result()
