"""`Resolver`: the one resolution pipeline, composed with a `Store`.

The store answers store-specific questions — `Store.locate` (does NAME exist, at what version,
made of which files; one cheap call, no download) and `Store.download` (copy one file to a local
path). The pipeline does the rest: name safety, the miss cache, single-flight fetching into the
node cache, adapter checks, atomic publishing, leases, eviction, retries, metrics and logs. Beside
it: `fetch` (downloading, checking and publishing one version), `stale` (cached snapshots served
during an outage), `recording` (the metrics and the log line) and `memory` (what it remembers).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from vllm_lora_resolvers import metrics
from vllm_lora_resolvers.adapter import AdapterPolicy, check_adapter_folder
from vllm_lora_resolvers.backends.base import Store
from vllm_lora_resolvers.cache import Snapshot
from vllm_lora_resolvers.errors import (
    CacheFullError,
    InvalidAdapterError,
    ResolverError,
    SignatureError,
    StoreRefusedError,
    StoreUnavailableError,
    TransientStoreError,
    VersionChangedError,
)
from vllm_lora_resolvers.fetch import Fetcher
from vllm_lora_resolvers.memory import (
    KeyedLocks,
    MissCache,
    RefusalMemory,
    ServedNames,
    StoreOutage,
)
from vllm_lora_resolvers.names import is_safe_name
from vllm_lora_resolvers.recording import Recorder
from vllm_lora_resolvers.remote import RemoteAdapter
from vllm_lora_resolvers.retry import call_with_retries, time_budget
from vllm_lora_resolvers.signing import load_trust
from vllm_lora_resolvers.stale import StaleServing

logger = logging.getLogger("vllm.lora_resolvers")

#: How long an unreachable store is remembered as such (at most the miss TTL).
OUTAGE_MEMORY_SECONDS = 5.0
#: Lookups per resolution: a second one when the adapter changed (or its cached snapshot was
#: evicted) between the lookup and the fetch, so the request gets the new version.
LOOKUPS_PER_RESOLUTION = 2
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
        #: Downloads as a resolution does (the command line's `Fetcher.fetch_to` too).
        self.fetcher = Fetcher(store, self.trust)
        self._stale = StaleServing(store)
        self._recorder = Recorder(self.backend)
        self._misses = MissCache(settings.negative_ttl_seconds)
        self._refusals = RefusalMemory()
        self._outage = StoreOutage(
            self.backend, min(settings.negative_ttl_seconds, OUTAGE_MEMORY_SECONDS)
        )
        self._name_locks = KeyedLocks()
        #: The snapshot this process last handed vLLM for each name.
        self._served = ServedNames(self.cache.release)
        #: (snapshot key, base model, name): checked for this server, and ``name`` pointed at it.
        self._checked: set[tuple[str, str, str]] = set()

    @property
    def checks(self) -> str:
        """What this resolver checks adapters against, besides the base model asked for: its
        limits of rank and size, the base model's aliases and the signers it trusts. Two resolvers
        of a store answer alike about an adapter only when theirs are the same."""
        settings = self.settings
        return "\0".join(
            (
                f"rank<={settings.max_rank}",
                f"bytes<={settings.max_adapter_bytes}",
                f"aliases={','.join(settings.base_model_aliases)}",
                f"trust={'' if self.trust is None else self.trust.fingerprint}",
            )
        )

    def answer_at_once(
        self, base_model_name: str, lora_name: str
    ) -> tuple[bool, ResolvedAdapter | None]:
        """``(True, answer)`` for refused names, remembered misses and — when `locate` is local
        and cheap — snapshots this process already serves; ``(False, None)`` otherwise: then
        `resolve` answers, off the event loop. Never blocks (the vLLM edge calls it on the loop).
        """
        started = time.perf_counter()
        if not is_safe_name(lora_name):
            self._recorder.record(lora_name, "rejected", "-", 0, started)
            return True, None
        if not self.store.accepts_name(lora_name) or self._misses.is_missing(lora_name):
            self._recorder.record(lora_name, "missing", "-", 0, started)
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
        self._recorder.record(lora_name, "hit", remote.version, 0, started)
        self._served.serve(lora_name, key)
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
        self._served.serve(lora_name, None if resolved is None else resolved.snapshot.key)
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
                        snapshot, leased_before = self._stale.lease(lora_name, error)
                        self._check_and_point(lora_name, snapshot, policy, leased_before)
                        outcome, version = "stale", snapshot.manifest.version
                        return ResolvedAdapter(lora_name, _lora_int_id(snapshot.key), snapshot)
                    if remote is None:
                        self._misses.add(lora_name)
                        self.cache.unpoint_name_of(lora_name, self.source)
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
            self._recorder.record(lora_name, outcome, version, fetched_bytes, started)

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
        (`InvalidAdapterError`, which the pipeline remembers), not downloaded on every request.
        Local files seen to change (`FilesChangedError`) are only looked up again: the same
        version back is the same files back."""
        snapshot = self.cache.lease(key)
        if snapshot is not None:
            return snapshot, "hit", 0
        if remote.cached_snapshot is not None:
            raise _LookAgainError(f"cached snapshot of {remote.name!r} was evicted meanwhile")
        try:
            snapshot, fetched_bytes = self._fetch(remote, key, policy)
        except VersionChangedError as error:
            if error.contradicts_declaration:
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
            files = self.fetcher.files_of(remote)
            incoming_bytes = sum(file.size for file in files)
            if incoming_bytes > self.settings.max_adapter_bytes:
                raise InvalidAdapterError(
                    f"adapter {remote.name!r} is {incoming_bytes} bytes, above this server's "
                    f"limit of {self.settings.max_adapter_bytes} "
                    "(VLLM_LORA_RESOLVER_MAX_ADAPTER_BYTES)"
                )
            self.cache.evict(incoming_bytes)
            try:
                published = self.fetcher.into_cache(remote, key, policy, files)
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
                published = self.fetcher.into_cache(remote, key, policy, files)
        self._checked.add((published.key, policy.base_model, remote.name))  # checked as fetched
        self.cache.point_name(remote.name, published)
        metrics.FETCHED_BYTES.labels(self.backend).inc(published.manifest.total_bytes)
        self.cache.evict()
        return published, published.manifest.total_bytes

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


def _lora_int_id(key: str) -> int:
    """A stable positive 31-bit id for a snapshot key (vLLM requires ids >= 1)."""
    return int(key[:8], 16) & 0x7FFFFFFF or 1
