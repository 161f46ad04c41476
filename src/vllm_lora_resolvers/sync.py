"""Keep a running vLLM server's adapters at their store's current version (`vllm-lora sync`).

vLLM asks resolvers only about names it does not hold, so without this a server serves the
version it resolved first until it restarts. Beside each server, once per round:

1. ask the server what it holds (``GET /v1/models``). An adapter is managed when its path is a
   snapshot of this node cache (a path this process can see must be that snapshot's folder; one
   it cannot see is taken as the cache mounted at another path in the server's container), the
   snapshot's manifest names that adapter (`Store.snapshot_name`: an alias loaded by hand from
   another name's snapshot is not), and its store is configured here. Anything else is left
   alone (and logged once);
2. ask its store for the current version (through the resolvers' pipeline: one lookup, retries,
   outage memory) once per round and node, however many servers the node runs (the answer is
   shared through the node cache, `NodeCache.node_answer`); a new version is fetched and checked
   into the node cache by the first process to see it, before any server switches;
3. switch: ``POST /v1/unload_lora_adapter`` then ``POST /tokenize`` with the name, which makes
   the server resolve it again through its own resolvers, to the new snapshot. vLLM gives the
   new version a new adapter id and path: requests in flight finish on the old weights (the
   engine keeps them under the old id), later ones run on the new ones, none on a mix, and no
   prefix-cache block computed with the old weights is reused (vLLM keys blocks by adapter name
   and path). ``load_inplace`` would swap the weights under requests in flight;
4. a new version that fails the checks leaves the old one served (logged, counted); so does one
   the server refuses at the switch (HTTP 400: the old one is loaded back), which is remembered
   and not tried again until the store's version changes; a name gone from the store is unloaded
   (``--on-delete unload``) or kept (``keep``);
5. a snapshot a managed name stops being served from (switched, also when the switch then failed,
   or unloaded) stays leased by this process until the server has been seen idle (no request
   running or waiting) on a sample taken `ADMISSION_SECONDS` or more after that, or
   ``drain_seconds`` have passed, since a request that started before the switch may make vLLM
   read its folder again; then it is released. ``/metrics`` counts a request only once it
   reached the engine: one the server accepted before the switch but was still tokenizing is
   not counted. The grace covers it: such a request is in the engine (counted) or done by the
   idle sample, unless it took more than `ADMISSION_SECONDS` from arriving to the engine's queue.

Whatever the server answers that is not what the sync expects (a page that is not vLLM's model
list, a list without a base model, ``/metrics`` without the request gauges, a redirect: none is
followed, so the API key reaches no other origin) is "cannot ask": nothing changes, the next round
asks again. The records the node's processes share (`NodeCache.node_answer`: the round phase, the
stores' answers) are parsed strictly; a damaged one is asked again and rewritten.

Rounds of every sync on a node start together (the node's processes share one phase), so a
change reaches every server on the node within one interval plus the fetch and the switch. Steps
2 to 4 run for `ADAPTERS_AT_ONCE` adapters at once, so adapters changed together do not wait for
each other's fetch or switch; a round that ends past the next round time is followed by one at
once, so a long round does not make a change wait a second interval.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.message import Message
from enum import IntEnum
from pathlib import Path
from typing import IO, Any, Literal

from prometheus_client import Counter, Gauge, Histogram
from pydantic import BaseModel, ValidationError

from vllm_lora_resolvers.cache import NodeCache, Snapshot
from vllm_lora_resolvers.config import ConfigurationError
from vllm_lora_resolvers.errors import (
    CacheError,
    InvalidAdapterError,
    ResolverError,
    StoreUnavailableError,
)
from vllm_lora_resolvers.metrics import sample_sums
from vllm_lora_resolvers.resolver import Resolver

logger = logging.getLogger("vllm.lora_resolvers.sync")

MANAGED = Gauge(
    "vllm_lora_sync_adapters_managed", "Adapters this sync keeps at their store's version."
)
UPDATES = Counter("vllm_lora_sync_updates", "Adapters switched to a new version.")
RETIREMENTS = Counter(
    "vllm_lora_sync_retirements", "Adapters unloaded because their store no longer has them."
)
REFUSED = Counter(
    "vllm_lora_sync_refused_versions",
    "New versions refused by the checks (the old one stays served).",
)
FAILURES = Counter(
    "vllm_lora_sync_failures", "Rounds or switches that failed, by what failed.", ["what"]
)
LOOKUPS = Counter(
    "vllm_lora_sync_store_lookups", "Store lookups this process made (the node shares them)."
)
SWITCH_SECONDS = Histogram(
    "vllm_lora_sync_switch_seconds",
    "Seconds from seeing a new version to the server serving it (fetch included).",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
ROUNDS = Counter("vllm_lora_sync_rounds", "Rounds run, whatever their result.", ["result"])
RELEASED = Counter(
    "vllm_lora_sync_released_snapshots", "Replaced snapshots whose lease was released."
)

#: Adapters a round looks up, fetches and switches at once: one slow fetch or switch (a large
#: adapter, a busy server) holds no other adapter back; more at once would burst the store's and
#: the server's load at the round's start.
ADAPTERS_AT_ONCE = 8

#: Seconds after a name stopped being served from a snapshot before an idle ``/metrics`` sample
#: may release it: a request accepted just before the switch reaches the engine within them.
ADMISSION_SECONDS = 5.0

_WARM_PROMPT = "."
_SCHEDULE_QUESTION = "vllm-lora sync: the node's phase"
_IN_FLIGHT_GAUGES = frozenset({"vllm:num_requests_running", "vllm:num_requests_waiting"})
#: A snapshot key as `cache.snapshot_key` makes them.
_SNAPSHOT_KEY = re.compile(r"[0-9a-f]{40}")


class RoundResult(IntEnum):
    """How a round ended, as ``vllm-lora sync --once`` exits."""

    IN_SYNC = 0  #: every managed adapter is at its store's version (changes applied)
    NOT_APPLIED = 1  #: a new version was refused or a switch failed; the old one is served
    CANNOT_ASK = 2  #: the server or a store could not be asked; nothing changed for those


class ServerError(ResolverError):
    """The vLLM server could not be asked, or refused what was asked."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class _ModelCard(BaseModel):
    id: str
    root: str
    parent: str | None = None


class _ModelList(BaseModel):
    """The part of vLLM's ``GET /v1/models`` answer the sync reads."""

    data: list[_ModelCard]


class _FollowNoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is answered as an error: the API key goes to ``--server`` and nowhere else."""

    def redirect_request(  # noqa: PLR0917 - urllib's signature
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: Message,
        newurl: str,
    ) -> None:
        return None


class VllmServerApi:
    """The few routes of a vLLM OpenAI-compatible server that sync uses."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 30.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise ConfigurationError(f"--server {url!r} must be an http:// or https:// URL")
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self._opener = urllib.request.build_opener(_FollowNoRedirect)

    def models(self) -> tuple[str, dict[str, str]]:
        """``(base model, {adapter name: path it was loaded from})``. The base model is what vLLM
        hands resolvers (the model's path or id), the first base model card's ``root``."""
        body = self._call("GET", "/v1/models")
        try:
            cards = _ModelList.model_validate_json(body).data
        except ValidationError:
            shown = body[:200].decode(errors="replace")
            raise ServerError(
                f"GET /v1/models answered what is not a model list: {shown!r}"
            ) from None
        base = next((card.root for card in cards if not card.parent), None)
        if base is None:
            raise ServerError("GET /v1/models answered a model list without a base model")
        return base, {card.id: card.root for card in cards if card.parent}

    def unload(self, name: str) -> None:
        """Stop serving ``name`` (requests in flight finish); absent already is fine."""
        try:
            self._call("POST", "/v1/unload_lora_adapter", {"lora_name": name})
        except ServerError as error:
            if error.status != 404:
                raise

    def load(self, name: str, path: str) -> None:
        """Serve ``name`` from the adapter folder ``path`` again."""
        self._call("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})

    def resolve(self, name: str) -> None:
        """Make the server resolve ``name`` through its resolvers and load it, without
        generating anything (``/tokenize`` resolves unknown names as generation routes do)."""
        self._call("POST", "/tokenize", {"model": name, "prompt": _WARM_PROMPT})

    def is_idle(self) -> bool:
        """Whether the server reports no request running or waiting (``/metrics``); a
        `ServerError` when it does not report both."""
        text = self._call("GET", "/metrics").decode(errors="replace")
        try:
            in_flight = sample_sums(text, _IN_FLIGHT_GAUGES)
        except ValueError as error:
            raise ServerError(
                f"GET /metrics answered what is not Prometheus text: {error}"
            ) from None
        if in_flight.keys() != _IN_FLIGHT_GAUGES:
            raise ServerError(f"GET /metrics does not report {' and '.join(_IN_FLIGHT_GAUGES)}")
        return sum(in_flight.values()) == 0

    def _call(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> bytes:
        request = urllib.request.Request(  # noqa: S310 - the scheme is checked in __init__
            self.url + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        if self.api_key:
            request.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                return bytes(response.read())
        except urllib.error.HTTPError as error:
            if 300 <= error.code < 400:
                raise ServerError(
                    f"{method} {path} answered HTTP {error.code}, a redirect; the sync follows "
                    "none (its API key goes to --server only): give --server the server's URL",
                    error.code,
                ) from None
            detail = error.read()[:500].decode(errors="replace")
            raise ServerError(
                f"{method} {path} answered HTTP {error.code}: {detail}", error.code
            ) from None
        except (OSError, ValueError) as error:
            raise ServerError(f"cannot reach the vLLM server at {self.url}: {error}") from None


@dataclass(frozen=True)
class StoreAnswer:
    """What a store says of one adapter, as the node's processes share it."""

    state: Literal["current", "gone", "refused", "unreachable"]
    #: The current snapshot's key, or why the version is refused or the store unreachable.
    detail: str = ""

    def encode(self) -> str:
        return f"{self.state} {self.detail}"

    @classmethod
    def decode(cls, text: str) -> StoreAnswer | None:
        """The answer `encode` wrote as ``text``; ``None`` for a damaged record (a current
        answer's detail becomes a path in the cache: it must be a snapshot key)."""
        state, _, detail = text.partition(" ")
        if state == "current" and _SNAPSHOT_KEY.fullmatch(detail):
            return cls("current", detail)
        if state == "gone" and not detail:
            return cls("gone")
        if state == "refused":
            return cls("refused", detail)
        if state == "unreachable":
            return cls("unreachable", detail)
        return None


def _is_store_answer(text: str) -> bool:
    return StoreAnswer.decode(text) is not None


def _phase(text: str) -> float | None:
    """The node's round phase as recorded: a finite fraction in [0, 1); ``None`` if damaged."""
    try:
        phase = float(text)
    except ValueError:
        return None
    return phase if 0 <= phase < 1 else None  # NaN fails both comparisons


def _is_phase(text: str) -> bool:
    return _phase(text) is not None


def _is_snapshot_folder(path: str, snapshot: Snapshot) -> bool:
    """Whether ``path`` is ``snapshot``'s adapter folder as this process sees it. A path it cannot
    see is the cache mounted at another path in the server's container: the key in it names the
    snapshot."""
    try:
        return Path(path).samefile(snapshot.adapter_dir)
    except (FileNotFoundError, NotADirectoryError):
        return True
    except (OSError, ValueError):  # unreadable here, or no path at all (a NUL in it)
        return False


@dataclass
class AdapterSync:
    """One server's sync: `run_round` once, or `run` until stopped."""

    server: VllmServerApi
    #: Our resolvers by the source they declare (a snapshot's manifest names its source).
    resolvers: Mapping[str, Resolver]
    cache: NodeCache
    interval: float = 30.0
    on_delete: Literal["unload", "keep"] = "unload"
    drain_seconds: float = 600.0
    #: Seconds an answer another process of the node got stays good for this one (a round of
    #: every sync on the node shares one lookup); 0 asks the store every time.
    answer_max_age: float | None = None
    #: The clock of the drain (see the module's 5.).
    clock: Callable[[], float] = time.monotonic
    #: The clock of the node's round times: a Unix time, the same in every process of the node.
    wall_clock: Callable[[], float] = time.time
    #: Replaced snapshots still leased: key -> when its name stopped being served from it.
    _draining: dict[str, float] = field(default_factory=dict)
    #: Managed names -> the key of the snapshot the server serves each from.
    _serving: dict[str, str] = field(default_factory=dict)
    #: Managed names -> the key of the version the server refused at the switch.
    _refused_at_switch: dict[str, str] = field(default_factory=dict)
    #: Managed names -> the cause (state, refusal) of the problem last reported for each.
    _reported: dict[str, tuple[str, str]] = field(default_factory=dict)
    #: (name, path) the server holds that this sync leaves alone (each reported once).
    _left_alone: set[tuple[str, str]] = field(default_factory=set)
    #: The round phase of this sync alone, for when the node cache cannot hold the node's.
    _own_phase: float = field(default_factory=random.random)
    #: Whether the last round time came from `_own_phase` (said once, not every round).
    _keeping_own_phase: bool = False

    def run(self, stop: threading.Event) -> None:
        """Run a round at each of the node's round times until ``stop`` is set. A round that
        ends past the next round time is followed by one at once, not by the round after: a
        change waits for the lookup at most one interval, or one round when a round is longer."""
        due = self.next_round_time(self.wall_clock())
        while not stop.wait(max(0.0, due - self.wall_clock())):
            self.run_round()
            due = self.next_round_time(max(due, self.wall_clock() - self.interval))

    def drain(self, poll_seconds: float = 1.0) -> None:
        """Wait until the versions this sync replaced are released (see the module's 5.)."""
        while self._draining:
            time.sleep(poll_seconds)
            self._release_leases()

    def next_round_time(self, after: float) -> float:
        """The node's first round time later than ``after`` (a `wall_clock` time): every sync on
        the node wakes at the same phase of the interval (so they share one store lookup), and
        nodes at different phases (so the fleet's lookups spread over the interval)."""
        phase = self._round_phase() * self.interval
        round_time = math.floor((after - phase) / self.interval + 1) * self.interval + phase
        return round_time if round_time > after else round_time + self.interval

    def _round_phase(self) -> float:
        """The node's round phase, a fraction of the interval: the one its first sync drew, or
        this sync's own when the node cache cannot hold one (logged once, and once when the cache
        holds the node's again)."""
        try:
            text, _ = self.cache.node_answer(
                _SCHEDULE_QUESTION, math.inf, lambda: repr(random.random()), _is_phase
            )
        except CacheError as error:
            if not self._keeping_own_phase:
                logger.warning(
                    "sync: %s; this sync keeps a round phase of its own meanwhile", error
                )
            self._keeping_own_phase = True
            return self._own_phase
        if self._keeping_own_phase:
            logger.info("sync: the node cache holds the round phase again; it is the node's")
            self._keeping_own_phase = False
        fraction = _phase(text)
        assert fraction is not None, "node_answer returns only phases _is_phase accepts"
        return fraction

    def run_round(self) -> RoundResult:
        """Bring every managed adapter to its store's version once; release drained leases."""
        result = self._round()
        ROUNDS.labels(result.name.lower()).inc()
        return result

    def _round(self) -> RoundResult:
        try:
            base_model, held = self.server.models()
        except ServerError as error:
            FAILURES.labels("server").inc()
            logger.warning("sync: %s; nothing changed", error)
            return RoundResult.CANNOT_ASK
        managed = self._managed(held)
        MANAGED.set(len(managed))
        served_last_round = self._serving
        self._serving = {name: snapshot.key for name, (_, snapshot, _) in managed.items()}
        served = {*served_last_round.items(), *self._serving.items()}
        self._reported = {n: c for n, c in self._reported.items() if n in managed}
        self._refused_at_switch = {n: k for n, k in self._refused_at_switch.items() if n in managed}
        with ThreadPoolExecutor(ADAPTERS_AT_ONCE, "vllm-lora-sync") as adapters:
            results = adapters.map(
                lambda item: self._sync_adapter(base_model, item[0], *item[1]), managed.items()
            )
            result = max(results, default=RoundResult.IN_SYNC)
        for name, key in served:
            if self._serving.get(name) != key:  # switched or unloaded, here or by someone else
                self._draining.setdefault(key, self.clock())
        self._release_leases()
        return result

    def _managed(self, held: Mapping[str, str]) -> dict[str, tuple[str, Snapshot, Resolver]]:
        """The adapters of `held` this sync manages (see the module's 1.), each snapshot leased
        (so it stays while the server may read it)."""
        managed = {}
        left_alone = set()
        for name, path in held.items():
            ours = self._ours(name, path)
            if isinstance(ours, str):
                if (name, path) not in self._left_alone:
                    logger.info("sync: leaving %r alone: %s", name, ours)
                left_alone.add((name, path))
            elif self.cache.lease(ours[0].key) is not None:
                managed[name] = (path, *ours)
        self._left_alone = left_alone
        return managed

    def _ours(self, name: str, path: str) -> tuple[Snapshot, Resolver] | str:
        """The snapshot and store of adapter ``name`` loaded from ``path`` if this sync manages
        it, else why it does not."""
        snapshot = self.cache.snapshot_in_path(path)
        if snapshot is None:
            return f"{path} is not a snapshot of this node cache"
        if not _is_snapshot_folder(path, snapshot):
            return f"{path} is not this node cache's snapshot {snapshot.key}"
        resolver = self.resolvers.get(snapshot.manifest.source)
        if resolver is None:
            return f"its store {snapshot.manifest.source} is not configured here"
        if resolver.store.snapshot_name(name) != snapshot.manifest.name:
            return f"it was loaded from a snapshot of {snapshot.manifest.name!r}"
        return snapshot, resolver

    def _sync_adapter(
        self,
        base_model: str,
        name: str,
        path: str,
        served: Snapshot,
        resolver: Resolver,
    ) -> RoundResult:
        seen_at = time.perf_counter()
        answer = self._ask_store(resolver, base_model, name)
        if answer.state == "unreachable":
            FAILURES.labels("store").inc()
            self._report_once(name, answer, "sync: cannot ask the store about %r (%s); keeping it")
            return RoundResult.CANNOT_ASK
        if answer.state == "refused":
            if self._report_once(
                name, answer, "sync: the new version of %r is refused (%s); keeping the old one"
            ):
                REFUSED.inc()
            return RoundResult.NOT_APPLIED
        if answer.state == "gone":
            if self.on_delete == "keep":
                self._report_once(name, answer, "sync: %r is gone from its store%s; keeping it")
                return RoundResult.IN_SYNC
            return self._retire(name, served)
        self._reported.pop(name, None)  # answered: a later problem is reported again
        if self._refused_at_switch.get(name) != answer.detail:
            self._refused_at_switch.pop(name, None)  # the store's version changed
        if answer.detail == served.key:
            return RoundResult.IN_SYNC
        if name in self._refused_at_switch:
            return RoundResult.NOT_APPLIED
        return self._switch(name, path, served, answer.detail, seen_at)

    def _ask_store(self, resolver: Resolver, base_model: str, name: str) -> StoreAnswer:
        """The store's answer for ``name``, asked at most once per half interval by the syncs of
        this node that check adapters alike (`Resolver.checks`: a version one server's rank limit
        refuses may be another's current one)."""

        def ask() -> str:
            LOOKUPS.inc()
            return self._look_up(resolver, base_model, name).encode()

        question = f"current\0{resolver.source}\0{base_model}\0{name}\0{resolver.checks}"
        try:
            max_age = self.interval / 2 if self.answer_max_age is None else self.answer_max_age
            text, _ = self.cache.node_answer(question, max_age, ask, _is_store_answer)
        except CacheError as error:
            return StoreAnswer("unreachable", str(error))
        answer = StoreAnswer.decode(text)
        assert answer is not None, "node_answer returns only answers _is_store_answer accepts"
        return answer

    def _look_up(self, resolver: Resolver, base_model: str, name: str) -> StoreAnswer:
        try:
            current = resolver.current(base_model, name)
        except InvalidAdapterError as error:
            return StoreAnswer("refused", str(error))
        except (StoreUnavailableError, CacheError) as error:
            return StoreAnswer("unreachable", str(error))
        if current is None:
            return StoreAnswer("gone")
        return StoreAnswer("current", current.snapshot.key)

    def _switch(
        self, name: str, path: str, served: Snapshot, key: str, seen_at: float
    ) -> RoundResult:
        new = self.cache.lease(key)
        if new is None:  # evicted since it was fetched: the next round fetches it again
            FAILURES.labels("switch").inc()
            return RoundResult.NOT_APPLIED
        try:
            self.server.unload(name)
            try:
                self.server.resolve(name)
            except ServerError as error:
                if error.status != 400:
                    raise
                self._refused_at_switch[name] = key
                REFUSED.inc()
                self.server.load(name, path)
                raise ServerError(
                    f"{error}; the old version is served again, and this one is not tried "
                    "again until the store's version changes"
                ) from None
            _, held = self.server.models()
        except ServerError as error:
            FAILURES.labels("switch").inc()
            logger.warning(
                "sync: switching %r to version %s failed: %s", name, new.manifest.version, error
            )
            return RoundResult.NOT_APPLIED
        now_served = self.cache.snapshot_in_path(held.get(name, ""))
        if now_served is not None:
            self._serving[name] = now_served.key
        else:
            self._serving.pop(name, None)
        if now_served is None or now_served.key != key:
            logger.warning(
                "sync: %r was switched but the server resolved it to %s", name, held.get(name)
            )
            return RoundResult.NOT_APPLIED
        UPDATES.inc()
        SWITCH_SECONDS.observe(time.perf_counter() - seen_at)
        logger.info(
            "sync: %r updated from version %s to %s",
            name,
            served.manifest.version,
            new.manifest.version,
        )
        return RoundResult.IN_SYNC

    def _retire(self, name: str, served: Snapshot) -> RoundResult:
        try:
            self.server.unload(name)
        except ServerError as error:
            FAILURES.labels("retire").inc()
            logger.warning("sync: unloading %r, gone from its store, failed: %s", name, error)
            return RoundResult.NOT_APPLIED
        RETIREMENTS.inc()
        self._serving.pop(name, None)
        logger.info(
            "sync: %r is gone from its store; unloaded (version %s)", name, served.manifest.version
        )
        return RoundResult.IN_SYNC

    def _release_leases(self) -> None:
        """Release the leases of replaced snapshots no request can need any more (see the
        module's 5.), and of versions fetched here but not served."""
        serving = set(self._serving.values())
        for key in serving & self._draining.keys():
            del self._draining[key]  # served again: it drains from when it is replaced again
        drained = self._drained()
        for key in drained:
            del self._draining[key]
        RELEASED.inc(len(drained))
        released = self.cache.leased_keys() - serving - self._draining.keys()
        for key in released:
            self.cache.release(key)
        if released:
            self.cache.evict()  # what nobody leases any more counts against the cap again

    def _drained(self) -> list[str]:
        """The draining snapshots no request can need any more: replaced ``drain_seconds`` ago,
        or `ADMISSION_SECONDS` ago and the server idle now."""
        now = self.clock()
        timed_out = [
            key for key, since in self._draining.items() if now - since >= self.drain_seconds
        ]
        admitted = [
            key
            for key, since in self._draining.items()
            if key not in timed_out and now - since >= ADMISSION_SECONDS
        ]
        if admitted and self._is_idle():
            return timed_out + admitted
        return timed_out

    def _is_idle(self) -> bool:
        try:
            return self.server.is_idle()
        except ServerError as error:
            logger.debug("sync: cannot tell whether the server is idle: %s", error)
            return False

    def _report_once(self, name: str, answer: StoreAnswer, message: str) -> bool:
        """Log ``message`` about ``name``'s answer unless its cause was the last reported for
        ``name``: its state, and for a refusal the reason (an outage is reported when it starts,
        whatever its messages say since: they count down); whether it was new."""
        cause = (answer.state, answer.detail if answer.state == "refused" else "")
        if self._reported.get(name) == cause:
            return False
        self._reported[name] = cause
        logger.warning(message, name, answer.detail)
        return True
