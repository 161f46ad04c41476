"""`Resolver`: the one resolution pipeline, composed with a `Store`.

The store answers store-specific questions — `Store.locate` (does NAME exist, at what version,
made of which files; one cheap call, no download) and `Store.download` (copy one file to a local
path). The pipeline does the rest: name safety, the miss cache, single-flight fetching into the
node cache, adapter checks, atomic publishing, leases, eviction, retries, metrics and logs.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_lora_resolvers import metrics
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
    CacheFullError,
    InvalidAdapterError,
    ResolverError,
    SignatureError,
    StoreRefusedError,
    StoreUnavailableError,
    TransientStoreError,
    VersionChangedError,
)
from vllm_lora_resolvers.memory import KeyedLocks, MissCache, RefusalMemory, StoreOutage
from vllm_lora_resolvers.names import is_safe_name
from vllm_lora_resolvers.remote import RemoteAdapter, RemoteFile
from vllm_lora_resolvers.retry import call_with_retries, time_budget
from vllm_lora_resolvers.signing import CheckedSignature, load_trust, unsigned
from vllm_lora_resolvers.transfer import FetchedFile, beside, fetch_file

logger = logging.getLogger("vllm.lora_resolvers")

#: The outcomes whose resolution line is logged at INFO; the others' at DEBUG.
LOGGED_AT_INFO = ("fetched", "stale", "invalid", "untrusted", "refused", "error")
#: How long an unreachable store is remembered as such (at most the miss TTL).
OUTAGE_MEMORY_SECONDS = 5.0
#: Lookups per resolution: a second one when the adapter changed (or its cached snapshot was
#: evicted) between the lookup and the fetch, so the request gets the new version.
LOOKUPS_PER_RESOLUTION = 2
#: The first read of a safetensors header; a larger header costs a second, exact read.
_HEAD_PROBE_BYTES = 64 << 10
#: Weights up to this size are fetched at once with the config, not after its checks: an adapter
#: refused by them wastes at most this much, and a new small adapter costs one round trip less.
SMALL_WEIGHTS_BYTES = 1 << 20
#: Free space asked for beyond an adapter's bytes when a full disk is cleared (manifest, inodes).
_DISK_SLACK_BYTES = 1 << 20


class _LookAgainError(Exception):
    """What `locate` saw is gone or changed: the resolution looks the adapter up again."""


@dataclass(frozen=True)
class ResolvedAdapter:
    """A checked, leased snapshot ready to hand to vLLM."""

    name: str
    lora_int_id: int
    snapshot: Snapshot

    @property
    def path(self) -> Path:
        """The absolute, immutable folder vLLM loads the adapter from."""
        return self.snapshot.adapter_dir


class Resolver:
    """The resolution pipeline over one `Store`, its adapters cached on the node.

    The server (through `edge.VllmResolver`), ``vllm-lora pull``, ``validate``, ``ls`` and
    ``sync`` all call it as it is; it imports no vLLM.

    >>> resolver = Resolver(S3Store("s3://adapters/prod", settings, cache))  # doctest: +SKIP
    >>> resolver.resolve("meta-llama/Llama-3.1-8B", "sql-adapter").path  # doctest: +SKIP
    PosixPath('/var/cache/vllm-lora/.vllm-lora/snapshots/9c1e.../adapter')
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.source = store.source
        self.backend = store.backend
        self.settings = settings = store.settings
        self.cache = store.cache
        self.cache.serve_source(store.source)
        self.transfer = store.transfer
        #: The signers whose adapters are served (``None``: signatures are not checked).
        self.trust = load_trust(settings)
        self._misses = MissCache(settings.negative_ttl_seconds)
        self._refusals = RefusalMemory()
        self._outage = StoreOutage(
            self.backend, min(settings.negative_ttl_seconds, OUTAGE_MEMORY_SECONDS)
        )
        self._name_locks = KeyedLocks()
        #: name -> the key of the snapshot this process last handed vLLM for it.
        self._served: dict[str, str] = {}
        self._served_guard = threading.Lock()
        #: (snapshot key, base model, name): checked for this server, and ``name`` pointed at it.
        self._checked: set[tuple[str, str, str]] = set()
        self._outcome_metrics = {
            outcome: (
                metrics.RESOLUTIONS.labels(self.backend, outcome),
                metrics.RESOLVE_SECONDS.labels(self.backend, outcome),
            )
            for outcome in metrics.OUTCOMES
        }

    # -- the pipeline ---------------------------------------------------------------------

    def answer_at_once(
        self, base_model_name: str, lora_name: str
    ) -> tuple[bool, ResolvedAdapter | None]:
        """``(True, answer)`` for refused names, remembered misses and — when `locate` is local
        and cheap — snapshots this process already serves; ``(False, None)`` otherwise: then
        `resolve` answers, off the event loop. Never blocks (the vLLM edge calls it on the loop).
        """
        started = time.perf_counter()
        if not is_safe_name(lora_name):
            self._record(lora_name, "rejected", "-", 0, started)
            return True, None
        if not self.store.accepts_name(lora_name) or self._misses.is_missing(lora_name):
            self._record(lora_name, "missing", "-", 0, started)
            return True, None
        if not self.store.locate_is_local:
            return False, None
        try:
            remote = self.store.locate(lora_name)
        except ResolverError:
            return False, None  # the full pipeline retries, serves stale or explains
        if remote is None:
            return False, None
        key = self.store.snapshot_key_of(remote)
        snapshot = self.cache.held(key)
        if snapshot is None or (key, base_model_name, lora_name) not in self._checked:
            return False, None
        self._record(lora_name, "hit", remote.version, 0, started)
        self._serve_for_name(lora_name, key)
        return True, ResolvedAdapter(lora_name, _lora_int_id(key), snapshot)

    def resolve(self, base_model_name: str, lora_name: str) -> ResolvedAdapter | None:
        """Resolve ``lora_name`` for a server of ``base_model_name`` (blocking).

        Returns ``None`` when the adapter is not in this store; raises `InvalidAdapterError`
        when it is but cannot be served, `StoreUnavailableError` when the store cannot be read
        and nothing is cached, `CacheError` when the node cache cannot be written.

        vLLM asks again about a name only after dropping it (an unload), so the snapshot a name
        resolved to before is released here unless another name still resolves to it: a
        replaced version stops counting against the cache cap once nobody else leases it.
        """
        resolved = self._resolve(base_model_name, lora_name, serve_stale=True)
        self._serve_for_name(lora_name, None if resolved is None else resolved.snapshot.key)
        return resolved

    def current(self, base_model_name: str, lora_name: str) -> ResolvedAdapter | None:
        """The store's current version of ``lora_name``, fetched, checked and leased like
        `resolve`'s, or ``None`` if the store no longer has it; never a cached version instead:
        raises `StoreUnavailableError` when the store cannot answer. For `vllm-lora sync`."""
        return self._resolve(base_model_name, lora_name, serve_stale=False)

    def _resolve(
        self, base_model_name: str, lora_name: str, *, serve_stale: bool
    ) -> ResolvedAdapter | None:
        started = time.perf_counter()
        outcome, version, fetched_bytes = "error", "-", 0
        try:
            if not is_safe_name(lora_name):
                outcome = "rejected"
                return None
            if not self.store.accepts_name(lora_name):
                outcome = "missing"
                return None
            policy = AdapterPolicy(
                base_model=base_model_name,
                max_rank=self.settings.max_rank,
                base_model_aliases=self.settings.base_model_aliases,
            )
            with self._name_locks.hold(lora_name), time_budget(self.transfer.resolution_seconds):
                if serve_stale and self._misses.is_missing(lora_name):
                    outcome = "missing"
                    return None
                #: Snapshot keys whose fetch found the store serving other bytes than it declared.
                not_as_declared: set[str] = set()
                for lookup in range(LOOKUPS_PER_RESOLUTION):
                    try:
                        remote = self.lookup(lora_name)
                    except StoreUnavailableError as error:
                        if not serve_stale:
                            raise
                        resolved = self._serve_stale(lora_name, policy, error)
                        outcome, version = "stale", resolved.snapshot.manifest.version
                        return resolved
                    if remote is None:
                        self._misses.add(lora_name)
                        self._unpoint_if_ours(lora_name)
                        outcome = "missing"
                        return None
                    version = remote.version
                    key = self.store.snapshot_key_of(remote)
                    try:
                        with self._refusals.remembered((key, base_model_name)):
                            leased_before = self.cache.held(key) is not None
                            snapshot, outcome, fetched_bytes = self._lease_or_fetch(
                                remote, key, policy, not_as_declared
                            )
                            self._check_and_point(lora_name, snapshot, policy, leased_before)
                    except _LookAgainError as error:
                        if lookup == LOOKUPS_PER_RESOLUTION - 1:
                            raise StoreUnavailableError(str(error)) from None
                        logger.info("%s; looking %r up again", error, lora_name)
                        continue
                    return ResolvedAdapter(lora_name, _lora_int_id(key), snapshot)
                raise AssertionError("unreachable: the loop returns or raises")
        except InvalidAdapterError as error:
            outcome = "untrusted" if isinstance(error, SignatureError) else "invalid"
            raise
        except StoreRefusedError:
            outcome = "refused"
            raise
        finally:
            self._record(lora_name, outcome, version, fetched_bytes, started)

    def _serve_for_name(self, name: str, key: str | None) -> None:
        """Record that ``name`` now resolves to snapshot ``key`` (``None``: to nothing) and
        release the snapshot it resolved to before, unless another name resolves to it."""
        with self._served_guard:
            previous = self._served.pop(name, None)
            if key is not None:
                self._served[name] = key
            replaced = previous not in (None, key) and previous not in self._served.values()
        if replaced and previous is not None:
            self.cache.release(previous)

    def lookup(self, name: str) -> RemoteAdapter | None:
        """`locate` as a resolution asks it: with the lookups' short retry, and not at all while
        the store is known to be down (`StoreUnavailableError` then). For the command line too."""
        self._outage.raise_if_ongoing()
        try:
            remote = call_with_retries(
                lambda: self.store.locate(name),
                self.transfer.lookup_retry,
                f"{self.backend} lookup of {name!r}",
                self.store.count_retry,
            )
        except TransientStoreError:
            # Only a store that cannot be reached is remembered as down: a refusal (credentials,
            # a missing bucket or repo) may concern this name alone.
            self._outage.begin()
            raise
        self._outage.end()
        self.cache.resume_source(self.source)
        return remote

    def _lease_or_fetch(
        self, remote: RemoteAdapter, key: str, policy: AdapterPolicy, not_as_declared: set[str]
    ) -> tuple[Snapshot, str, int]:
        """The snapshot ``key`` leased, fetched first if it is not cached: (snapshot, outcome,
        bytes fetched). Raises `_LookAgainError` when what `locate` saw is gone or changed.

        A store that serves another size or ETag than it declared for a version may have just
        changed it (``key`` is added to ``not_as_declared``); if it declares that same version
        again and again serves otherwise, it does not serve it as it says: the version is refused
        (`InvalidAdapterError`, which the pipeline remembers), not downloaded on every request."""
        snapshot = self.cache.lease(key)
        if snapshot is not None:
            return snapshot, "hit", 0
        if remote.cached_snapshot is not None:
            raise _LookAgainError(f"cached snapshot of {remote.name!r} was evicted meanwhile")
        try:
            snapshot, fetched_bytes = self._fetch(remote, key, policy)
        except VersionChangedError as error:
            if key in not_as_declared:
                raise self._not_as_declared(remote, error) from None
            not_as_declared.add(key)
            raise _LookAgainError(str(error)) from None
        return snapshot, "fetched", fetched_bytes

    def _not_as_declared(
        self, remote: RemoteAdapter, error: VersionChangedError
    ) -> InvalidAdapterError:
        """The refusal of a version the store twice declared and twice served otherwise."""
        logger.warning(
            "%s store: %s; refusing version %s of %r",
            self.backend,
            error,
            remote.version,
            remote.name,
        )
        return InvalidAdapterError(
            f"adapter {remote.name!r}: the store does not serve version {remote.version} as it "
            "declares it (another size or ETag than its listing or pointer says); upload the "
            "adapter again, or publish it again with `vllm-lora publish`"
        )

    def _fetch(
        self, remote: RemoteAdapter, key: str, policy: AdapterPolicy
    ) -> tuple[Snapshot, int]:
        """Fetch, check and publish ``remote`` unless another thread or process just did.

        Room is made in the cache for the incoming bytes first; if the disk still fills up,
        snapshots no live process leases are evicted and the fetch is tried once more.
        """
        with self.cache.fetch_lock(key):
            snapshot = self.cache.lease(key)
            if snapshot is not None:
                return snapshot, 0
            files = self._adapter_files(remote)
            incoming_bytes = sum(file.size for file in files)
            if incoming_bytes > self.settings.max_adapter_bytes:
                raise InvalidAdapterError(
                    f"adapter {remote.name!r} is {incoming_bytes} bytes, above this server's "
                    f"limit of {self.settings.max_adapter_bytes} "
                    "(VLLM_LORA_RESOLVER_MAX_ADAPTER_BYTES)"
                )
            self.cache.evict(incoming_bytes)
            try:
                published = self._fetch_into_cache(remote, key, policy, files)
            except CacheFullError:
                evicted = self.cache.make_room_on_disk(incoming_bytes + _DISK_SLACK_BYTES)
                if not evicted:
                    raise
                logger.warning(
                    "the adapter cache's disk was full; evicted %d unused snapshots and "
                    "fetching %r again",
                    len(evicted),
                    remote.name,
                )
                published = self._fetch_into_cache(remote, key, policy, files)
        self._checked.add((published.key, policy.base_model, remote.name))  # checked as fetched
        self.cache.point_name(remote.name, published)
        metrics.FETCHED_BYTES.labels(self.backend).inc(published.manifest.total_bytes)
        self.cache.evict()
        return published, published.manifest.total_bytes

    def _fetch_into_cache(
        self,
        remote: RemoteAdapter,
        key: str,
        policy: AdapterPolicy,
        files: tuple[RemoteFile, ...],
    ) -> Snapshot:
        """Download, check and publish the snapshot: the signature first (when checked), then
        the config, then the weights, each refused as soon as it fails."""
        config_file, weights, *signature_file = files
        staging = self.cache.new_staging(key)
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
                source=self.source,
                name=self.store.snapshot_name(remote.name),
                version=self.store.snapshot_version(remote.version),
                files=tuple(
                    SnapshotFile(path=f.path, size=f.size, crc32c=f.crc32c) for f in fetched
                ),
                created_at=time.time(),
                trust=None if self.trust is None else self.trust.fingerprint,
            )
            return self.cache.publish(staging, key, manifest)
        finally:
            if staging.exists():
                self.cache.discard_staging(staging)

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
        every checksum the store declares verified (and ``digests`` computed in the same read).
        For the command line too."""
        destination.mkdir(parents=True, exist_ok=True)
        return [
            fetch_file(
                file,
                destination / file.path,
                lambda file, target: self.store.download(remote, file, target),
                policy=self.transfer.transfer_retry,
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

    def _adapter_files(self, remote: RemoteAdapter) -> tuple[RemoteFile, ...]:
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

    def _check_and_point(
        self, name: str, snapshot: Snapshot, policy: AdapterPolicy, leased_before: bool
    ) -> None:
        """Check a snapshot ``name`` resolved to against this server's policy (and its signature
        against this server's trust, unless the snapshot was fetched under it) and point ``name``
        at it, once per process and name (it is immutable; it may have several names). A
        snapshot that fails the checks is not served: the lease taken for it is given up (one
        this process held before is someone else's to release)."""
        marker = (snapshot.key, policy.base_model, name)
        if marker in self._checked:
            return
        try:
            check_adapter_folder(name, snapshot.adapter_dir, policy)
            if self.trust is not None and snapshot.manifest.trust != self.trust.fingerprint:
                # Checked under another trust (or none): its signature is checked again here.
                served_as = self.store.snapshot_name(name)
                self.trust.check_folder(name, snapshot.adapter_dir, served_as)
        except InvalidAdapterError:
            if not leased_before:
                self.cache.release(snapshot.key)
            raise
        self._checked.add(marker)
        self.cache.point_name(name, snapshot)

    def _serve_stale(
        self, name: str, policy: AdapterPolicy, error: StoreUnavailableError
    ) -> ResolvedAdapter:
        """The snapshot ``name`` last resolved to on this node (its ``NAME`` link), else the
        newest cached one of that name, when the store cannot answer, if
        ``VLLM_LORA_RESOLVER_SERVE_STALE`` allows it for ``error``; else ``error``.

        By default only a store that cannot be reached is served from the cache: one that
        refuses (revoked credentials, a deleted bucket) has answered.
        """
        unreachable = isinstance(error, TransientStoreError)
        allowed = self.settings.serve_stale == "always" or (
            self.settings.serve_stale == "unreachable" and unreachable
        )
        if not allowed:
            self.cache.withhold_source(self.source, self._withheld_because(unreachable))
            raise error
        cached = self._linked_snapshot(name) or self.cache.latest_for(self.source, name)
        leased_before = cached is not None and self.cache.held(cached.key) is not None
        snapshot = self.cache.lease(cached.key) if cached is not None else None
        if snapshot is None:
            raise error
        logger.warning(
            "%s store %s (%s); serving cached version %s of %r",
            self.backend,
            "unreachable" if unreachable else "refused",
            error,
            snapshot.manifest.version,
            name,
        )
        self._check_and_point(name, snapshot, policy, leased_before)
        return ResolvedAdapter(name, _lora_int_id(snapshot.key), snapshot)

    def _withheld_because(self, unreachable: bool) -> str:
        """What a client asking for a withheld snapshot of this store is told (no location:
        the store's own error is in the server's log)."""
        if unreachable:
            return (
                f"its {self.backend} store cannot be reached and cached copies are not served "
                "(VLLM_LORA_RESOLVER_SERVE_STALE=never)"
            )
        return (
            f"its {self.backend} store refuses this server (credentials, permissions, a missing "
            "bucket or repo: see the server's log), and cached copies of a refusing store's "
            f"adapters are not served (VLLM_LORA_RESOLVER_SERVE_STALE={self.settings.serve_stale})"
        )

    def _linked_snapshot(self, name: str) -> Snapshot | None:
        """The snapshot of this store the ``CACHE_DIR/NAME`` link points at, if any."""
        link = self.cache.root / name
        if not link.is_symlink():
            return None
        key = self.cache.snapshot_containing(str(link.resolve()))
        snapshot = self.cache.find(key) if key else None
        return (
            snapshot if snapshot is not None and snapshot.manifest.source == self.source else None
        )

    def _unpoint_if_ours(self, name: str) -> None:
        """The store no longer has ``name``: stop vLLM's filesystem resolver finding it by name."""
        snapshot = self._linked_snapshot(name)
        if snapshot is not None:
            self.cache.unpoint_name(name, only_if_key=snapshot.key)

    def _record(self, name: str, outcome: str, version: str, fetched: int, started: float) -> None:
        seconds = time.perf_counter() - started
        resolutions, latency = self._outcome_metrics[outcome]
        resolutions.inc()
        latency.observe(seconds)
        log = logger.info if outcome in LOGGED_AT_INFO else logger.debug
        log(
            "resolution backend=%s name=%r version=%s outcome=%s bytes=%d seconds=%.4f",
            self.backend,
            name[:300],
            version,
            outcome,
            fetched,
            seconds,
        )


def _lora_int_id(key: str) -> int:
    """A stable positive 31-bit id for a snapshot key (vLLM requires ids >= 1)."""
    return int(key[:8], 16) & 0x7FFFFFFF or 1
