"""What the resolution pipeline remembers between requests, per process: names found missing,
adapter versions refused, a store found unreachable, which names are being resolved, and the
snapshot each name was last resolved to."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from vllm_lora_resolvers.errors import InvalidAdapterError, TransientStoreError


class MissCache:
    """Names recently found missing, remembered for ``ttl`` seconds (bounded in size)."""

    def __init__(self, ttl: float, max_entries: int = 10_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._expiry: dict[str, float] = {}
        self._guard = threading.Lock()

    def is_missing(self, name: str) -> bool:
        """Whether ``name`` was found missing less than ``ttl`` seconds ago."""
        with self._guard:
            expiry = self._expiry.get(name)
            if expiry is None:
                return False
            if expiry > time.monotonic():
                return True
            del self._expiry[name]
            return False

    def add(self, name: str) -> None:
        """Remember ``name`` as missing."""
        if self.ttl <= 0:
            return
        with self._guard:
            if len(self._expiry) >= self.max_entries:
                self._expiry.pop(next(iter(self._expiry)))
            self._expiry[name] = time.monotonic() + self.ttl


class RefusalMemory:
    """Refusals of adapter versions, per server policy: a version found invalid stays invalid,
    so asking again costs no lock and no download (a new upload is a new version)."""

    def __init__(self, max_entries: int = 10_000) -> None:
        self.max_entries = max_entries
        #: marker -> the refusal's kind and message (not the exception: no traceback is kept).
        self._refusals: dict[tuple[str, str], tuple[type[InvalidAdapterError], str]] = {}
        self._guard = threading.Lock()

    @contextmanager
    def remembered(self, marker: tuple[str, str]) -> Iterator[None]:
        """Raise the refusal remembered for ``marker`` (of its kind: a signature's refusal is
        one again), or run the block and remember its own."""
        with self._guard:
            refusal = self._refusals.get(marker)
        if refusal is not None:
            kind, message = refusal
            raise kind(message)
        try:
            yield
        except InvalidAdapterError as error:
            with self._guard:
                if len(self._refusals) >= self.max_entries:
                    self._refusals.pop(next(iter(self._refusals)))
                self._refusals[marker] = (type(error), str(error))
            raise


class StoreOutage:
    """Remembers for a few seconds that the store could not be reached, so that during an outage
    every request is answered at once (from the cache, or with an error) instead of each one
    waiting out its own retries."""

    def __init__(self, store: str, memory_seconds: float) -> None:
        self.store = store
        self.memory_seconds = memory_seconds
        self._until = 0.0

    def begin(self) -> None:
        """The store just could not be reached."""
        self._until = time.monotonic() + self.memory_seconds

    def end(self) -> None:
        """The store just answered."""
        self._until = 0.0

    def raise_if_ongoing(self) -> None:
        """While the outage is remembered, raise an error that says so (naming no adapter: the
        failure that started it may have been another name's)."""
        left = self._until - time.monotonic()
        if left > 0:
            raise TransientStoreError(
                f"the {self.store} store could not be reached a moment ago; it is asked again "
                f"in {left:.1f} s"
            )


class KeyedLocks:
    """One lock per key, created on demand and dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        """Hold the lock of ``key``."""
        with self._guard:
            lock, users = self._locks.get(key, (threading.Lock(), 0))
            self._locks[key] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._guard:
                lock, users = self._locks[key]
                if users == 1:
                    del self._locks[key]
                else:
                    self._locks[key] = (lock, users - 1)


class ServedNames:
    """The snapshot this process last handed vLLM for each name: a snapshot a name no longer
    resolves to is released (``release``) unless another name still resolves to it."""

    def __init__(self, release: Callable[[str], None]) -> None:
        self._release = release
        #: name -> the key of the snapshot this process last handed vLLM for it.
        self._served: dict[str, str] = {}
        self._guard = threading.Lock()

    def serve(self, name: str, key: str | None) -> None:
        """Record that ``name`` now resolves to snapshot ``key`` (``None``: to nothing) and
        release the snapshot it resolved to before, unless another name resolves to it."""
        with self._guard:
            previous = self._served.pop(name, None)
            if key is not None:
                self._served[name] = key
            replaced = previous not in (None, key) and previous not in self._served.values()
        if replaced and previous is not None:
            self._release(previous)
