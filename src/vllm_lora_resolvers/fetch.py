"""Fetching one adapter version into a staging folder of the node cache as a resolution does,
and publishing it: the signature first (when checked), the config and the weights (the head of
large weights read beside the config, their body only once both are checked), each file refused
as soon as it fails."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vllm_lora_resolvers.adapter import (
    CONFIG_FILE,
    MAX_SIGNATURE_BYTES,
    SIGNATURE_FILE,
    WEIGHTS_FILES,
    AdapterPolicy,
    LoraAdapterConfig,
    check_adapter_config,
    check_adapter_folder,
    check_weights_header,
    parse_adapter_config,
)
from vllm_lora_resolvers.backends.base import Store
from vllm_lora_resolvers.cache import (
    CACHE_DISK_ERRNOS,
    Snapshot,
    SnapshotFile,
    SnapshotManifest,
    cache_write_error,
)
from vllm_lora_resolvers.errors import (
    CacheError,
    InvalidAdapterError,
    SignatureError,
    TransientStoreError,
)
from vllm_lora_resolvers.remote import RemoteAdapter, RemoteFile
from vllm_lora_resolvers.signing import CheckedSignature, unsigned
from vllm_lora_resolvers.transfer import FetchedFile, beside, fetch_file

if TYPE_CHECKING:
    from vllm_lora_resolvers.signing import Trust

logger = logging.getLogger("vllm.lora_resolvers")

#: The first read of a safetensors header; a larger header costs a second, exact read.
_HEAD_PROBE_BYTES = 64 << 10
#: Weights up to this size are fetched at once with the config, not after its checks: an adapter
#: refused by them wastes at most this much, and a new small adapter costs one round trip less.
SMALL_WEIGHTS_BYTES = 1 << 20


class Fetcher:
    """Downloads from ``store`` checked as ``trust`` says (``None``: signatures unchecked)."""

    def __init__(self, store: Store, trust: Trust | None) -> None:
        self.store = store
        self.trust = trust

    def files_of(self, remote: RemoteAdapter) -> tuple[RemoteFile, ...]:
        """The config and the one weights file vLLM would load, in vLLM's order of preference,
        and the signature when signatures are checked."""
        config = remote.file(CONFIG_FILE)
        if config is None:
            raise InvalidAdapterError(f"adapter {remote.name!r} has no {CONFIG_FILE}")
        weights = next(filter(None, map(remote.file, WEIGHTS_FILES)), None)
        if weights is None:
            raise InvalidAdapterError(
                f"adapter {remote.name!r} has no weights file; expected one of "
                f"{', '.join(WEIGHTS_FILES)} in {remote.location}"
            )
        if self.trust is None:
            return config, weights
        signature = remote.file(SIGNATURE_FILE)
        if signature is None:
            raise unsigned(remote.name)
        if signature.size > MAX_SIGNATURE_BYTES:
            raise SignatureError(
                f"adapter {remote.name!r}: {SIGNATURE_FILE} is {signature.size} bytes, too large "
                "for a signature"
            )
        return config, weights, signature

    def into_cache(
        self,
        remote: RemoteAdapter,
        key: str,
        policy: AdapterPolicy,
        files: tuple[RemoteFile, ...],
    ) -> Snapshot:
        """Download, check and publish the snapshot: the signature first (when checked), then
        the config, then the weights, each refused as soon as it fails."""
        config_file, weights, *signature_file = files
        cache = self.store.cache
        staging = cache.new_staging(key)
        folder = staging / "adapter"
        try:
            fetched, signature = [], None
            if self.trust is not None:
                fetched += self._download(remote, tuple(signature_file), staging)
                signature = self.trust.check(
                    remote.name, folder / SIGNATURE_FILE, self.store.snapshot_name(remote.name)
                )
                signature.check_covers(remote.name, config_file.path, weights.path)
            if weights.size <= SMALL_WEIGHTS_BYTES:  # fetched beside the config, checked after
                weights_fetched = beside(
                    lambda: self._download(remote, (weights,), staging, signature)
                )
                fetched += self._fetch_config(
                    remote, config_file, staging, policy, signature, beside_it=weights_fetched
                )[0]
                fetched += weights_fetched.result()
            else:  # its head read beside the config; its body only once both are checked
                head = beside(lambda: self._weights_head(remote, weights))
                config_fetched, config = self._fetch_config(
                    remote, config_file, staging, policy, signature, beside_it=head
                )
                self._check_weights_head(remote, weights, config, head.result())
                fetched += config_fetched
                fetched += self._download(remote, (weights,), staging, signature)
            check_adapter_folder(remote.name, folder, policy)
            manifest = SnapshotManifest(
                source=self.store.source,
                name=self.store.snapshot_name(remote.name),
                version=self.store.snapshot_version(remote.version),
                files=tuple(
                    SnapshotFile(path=f.path, size=f.size, crc32c=f.crc32c) for f in fetched
                ),
                created_at=time.time(),
                trust=None if self.trust is None else self.trust.fingerprint,
            )
            return cache.publish(staging, key, manifest)
        finally:
            if staging.exists():
                cache.discard_staging(staging)

    def _fetch_config(
        self,
        remote: RemoteAdapter,
        config_file: RemoteFile,
        staging: Path,
        policy: AdapterPolicy,
        signature: CheckedSignature | None,
        *,
        beside_it: Future[Any],
    ) -> tuple[list[FetchedFile], LoraAdapterConfig]:
        """Fetch, parse and check the config while ``beside_it`` runs (a wrong base model or
        rank is refused before a large weights body is fetched); return (or raise) once
        ``beside_it`` ended, so that nothing writes into the staging folder after a refusal."""
        try:
            fetched = self._download(remote, (config_file,), staging, signature)
            raw = (staging / "adapter" / CONFIG_FILE).read_bytes()
            config = parse_adapter_config(remote.name, raw)
            check_adapter_config(remote.name, config, policy)
        finally:
            wait([beside_it])
        return fetched, config

    def fetch_to(
        self,
        remote: RemoteAdapter,
        files: tuple[RemoteFile, ...],
        destination: Path,
        digests: tuple[str, ...] = (),
    ) -> list[FetchedFile]:
        """Download ``files`` of ``remote`` into ``destination`` (created if need be) as a
        resolution does: one after the other, each in parallel parts, retried, with its size and
        every checksum the store declares verified (and ``digests`` computed in the same pass)."""
        destination.mkdir(parents=True, exist_ok=True)
        return [
            fetch_file(
                file,
                destination / file.path,
                lambda file, target: self.store.download(remote, file, target),
                policy=self.store.transfer.transfer_retry,
                on_retry=self.store.count_retry,
                digests=digests,
            )
            for file in files
        ]

    def _download(
        self,
        remote: RemoteAdapter,
        files: tuple[RemoteFile, ...],
        staging: Path,
        signature: CheckedSignature | None = None,
    ) -> list[FetchedFile]:
        """Download ``files`` into the staging folder; with a ``signature``, refuse each file
        whose bytes are not the signed ones (by the digests the download's read computed, when
        the signature's method is theirs)."""
        algorithm = None if signature is None else signature.digest_algorithm
        try:
            fetched = self.fetch_to(
                remote, files, staging / "adapter", (algorithm,) if algorithm else ()
            )
        except OSError as error:
            # Only errors of the cache's own disk are the cache's; a backend's read errors are
            # its own to translate (and a broken connection was retried as transient already).
            if isinstance(error, CacheError) or error.errno not in CACHE_DISK_ERRNOS:
                raise
            raise cache_write_error(error) from None
        if signature is not None:
            for file in fetched:
                signature.check_file(remote.name, staging / "adapter", file.path, file.digests)
        return fetched

    def _weights_head(
        self, remote: RemoteAdapter, weights: RemoteFile, length: int = _HEAD_PROBE_BYTES
    ) -> bytes | None:
        """The first ``length`` bytes of a safetensors weights file, to check before its body is
        fetched; ``None`` when the store cannot read a range cheaply, or the read failed but may
        not next time (not retried: the weights are checked once fetched, with the download's
        retries)."""
        if not weights.path.endswith(".safetensors"):
            return None
        try:
            return self.store.read_head(remote, weights, min(length, weights.size))
        except TransientStoreError as error:
            logger.info("the weights of %r will be checked once fetched: %s", remote.name, error)
            return None

    def _check_weights_head(
        self,
        remote: RemoteAdapter,
        weights: RemoteFile,
        config: LoraAdapterConfig,
        head: bytes | None,
    ) -> None:
        """Refuse a safetensors file whose header (``head``, its first bytes) is malformed, does
        not account for its exact size (a sparse terabyte behind a small header, say) or holds
        tensors vLLM would refuse, before its body is fetched."""
        if head is None:
            return
        needed = check_weights_header(remote.name, config, head, weights.size)
        if needed > len(head):
            whole = self._weights_head(remote, weights, needed)
            if whole is not None:
                check_weights_header(remote.name, config, whole, weights.size)
