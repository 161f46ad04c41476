"""`vllm-lora sync` without a vLLM server: answers shared by a node's processes, lease release when
a name is resolved again, the command's exit codes, and a sync against a loopback stand-in of a
server (`fake_vllm.FakeVllmServer`) for what a real one cannot be made to do on demand: odd
answers, redirects, a switch whose answer is lost, a busy or idle server at a given moment.

The sync itself, against two real vLLM servers, is tested in ``test_e2e_rollout.py``.
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from conftest import BASE_MODEL, REPO
from fake_vllm import Answer, FakeVllmServer
from prometheus_client import REGISTRY

from devtools.memory_store import MemoryBucket, MemoryStore
from devtools.models import write_lora_adapter
from vllm_lora_resolvers.backends.base import Store
from vllm_lora_resolvers.backends.filesystem import FilesystemStore
from vllm_lora_resolvers.cache import NodeCache, snapshot_key
from vllm_lora_resolvers.cli import main
from vllm_lora_resolvers.config import Settings
from vllm_lora_resolvers.errors import StoreRefusedError
from vllm_lora_resolvers.metrics import sample_sums
from vllm_lora_resolvers.resolver import Resolver
from vllm_lora_resolvers.sync import (
    ADAPTERS_AT_ONCE,
    ADMISSION_SECONDS,
    AdapterSync,
    RoundResult,
    StoreAnswer,
    VllmServerApi,
)

_ASK_ONCE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from vllm_lora_resolvers.cache import NodeCache

    cache, asked = NodeCache(Path(sys.argv[1])), Path(sys.argv[2])

    def ask():
        with asked.open("a") as log:
            log.write("asked\\n")
        time.sleep(0.5)
        return "current KEY"

    answer, asked_here = cache.node_answer("current of x", 30.0, ask)
    print(answer)
    """
)


def test_processes_of_a_node_asking_at_once_share_one_answer(
    cache_dir: Path, tmp_path: Path
) -> None:
    asked = tmp_path / "asked.log"
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _ASK_ONCE, str(cache_dir), str(asked)],
            stdout=subprocess.PIPE,
            text=True,
            env={"PYTHONPATH": str(REPO / "src")},
        )
        for _ in range(4)
    ]
    answers = [worker.communicate(timeout=60)[0].strip() for worker in workers]
    assert answers == ["current KEY"] * 4
    assert asked.read_text().splitlines() == ["asked"]


def test_an_answer_older_than_its_max_age_is_asked_again(cache_dir: Path) -> None:
    cache = NodeCache(cache_dir)
    answers = iter(["first", "second"])
    assert cache.node_answer("q", 0.2, lambda: next(answers)) == ("first", True)
    assert cache.node_answer("q", 0.2, lambda: "unused") == ("first", False)
    time.sleep(0.25)
    assert cache.node_answer("q", 0.2, lambda: next(answers)) == ("second", True)


def test_a_damaged_or_foreign_answer_record_is_asked_again(cache_dir: Path) -> None:
    cache = NodeCache(cache_dir)
    cache.node_answer("q", 60, lambda: "recorded")
    (record,) = cache.layout.answers.iterdir()
    record.write_text("{not json")
    assert cache.node_answer("q", 60, lambda: "asked again") == ("asked again", True)
    record.write_text(record.read_text().replace('"q"', '"another question"'))
    assert cache.node_answer("q", 60, lambda: "asked once more") == ("asked once more", True)


def test_an_answer_the_cache_cannot_record_is_still_given_and_asked_again_next_time(
    cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = NodeCache(cache_dir)
    cache.node_answer("q", 60, lambda: "recorded")
    (record,) = cache.layout.answers.iterdir()
    record.unlink()
    record.mkdir()  # where the record goes, something it cannot replace (as a full disk would)
    with caplog.at_level(logging.WARNING, logger="vllm.lora_resolvers.cache"):
        assert cache.node_answer("q", 60, lambda: "unrecorded") == ("unrecorded", True)
    assert "cannot record an answer" in caplog.text
    assert cache.node_answer("q", 60, lambda: "asked again") == ("asked again", True)


def test_a_released_snapshot_can_be_evicted(cache_dir: Path, adapters_dir: Path) -> None:
    settings = Settings.from_environ({"VLLM_LORA_RESOLVER_CACHE_DIR": str(cache_dir)}, argv=[])
    resolver = Resolver(FilesystemStore(adapters_dir, settings, NodeCache(cache_dir)))
    write_lora_adapter(adapters_dir / "sql", base_model=BASE_MODEL)
    resolved = resolver.current(BASE_MODEL, "sql")
    assert resolved is not None
    key = resolved.snapshot.key
    assert resolver.cache.is_leased_by_anyone(key)
    resolver.cache.release(key)
    assert not resolver.cache.is_leased_by_anyone(key)
    assert [snapshot.key for snapshot in resolver.cache.prune(0)] == [key]


def test_a_name_resolved_again_releases_the_version_it_replaced_unless_another_name_uses_it(
    make_settings: Callable[..., Settings], cache_dir: Path, adapters_dir: Path
) -> None:
    resolver = Resolver(FilesystemStore(adapters_dir, make_settings(), NodeCache(cache_dir)))
    write_lora_adapter(adapters_dir / "sql", base_model=BASE_MODEL, seed=1)
    write_lora_adapter(adapters_dir / "chat", base_model=BASE_MODEL, seed=3)
    first = resolver.resolve(BASE_MODEL, "sql")
    chat = resolver.resolve(BASE_MODEL, "chat")
    assert first is not None and chat is not None
    write_lora_adapter(adapters_dir / "sql", base_model=BASE_MODEL, seed=2)
    second = resolver.resolve(BASE_MODEL, "sql")  # as vLLM asks after an unload
    assert second is not None and second.snapshot.key != first.snapshot.key
    assert not resolver.cache.is_leased_by_anyone(first.snapshot.key)
    assert resolver.cache.is_leased_by_anyone(second.snapshot.key)
    assert resolver.cache.is_leased_by_anyone(chat.snapshot.key)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("current " + "0123abcd" * 5, StoreAnswer("current", "0123abcd" * 5)),
        ("gone ", StoreAnswer("gone")),
        ("refused rank 64 is above 16", StoreAnswer("refused", "rank 64 is above 16")),
        ("unreachable HTTP 503", StoreAnswer("unreachable", "HTTP 503")),
    ],
)
def test_store_answers_read_back_as_written(text: str, expected: StoreAnswer) -> None:
    assert StoreAnswer.decode(text) == expected
    assert StoreAnswer.decode(expected.encode()) == expected


def test_a_current_answer_names_a_snapshot_key_as_the_cache_makes_them() -> None:
    key = snapshot_key("file:///adapters", "sql", "v1")
    assert StoreAnswer.decode(f"current {key}") == StoreAnswer("current", key)
    for damaged in ("garbage", f"current {key.upper()}", "current ../../x", "gone 0123"):
        assert StoreAnswer.decode(damaged) is None, damaged


def test_sync_once_exits_2_when_the_server_cannot_be_asked(
    cache_dir: Path, adapters_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VLLM_LORA_RESOLVER_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("VLLM_LORA_RESOLVER_FS_DIR", str(adapters_dir))
    runner = CliRunner()
    closed_port = runner.invoke(main, ["sync", "--server", "http://127.0.0.1:9", "--once"])
    assert closed_port.exit_code == 2, closed_port.output
    not_http = runner.invoke(main, ["sync", "--server", "file:///etc/passwd", "--once"])
    assert not_http.exit_code == 2
    assert "must be an http:// or https:// URL" in not_http.output


def test_sync_refuses_to_start_without_a_store(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VLLM_LORA_RESOLVER_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("VLLM_PLUGINS", "lora_s3_resolver")
    result = CliRunner().invoke(main, ["sync", "--server", "http://127.0.0.1:9", "--once"])
    assert result.exit_code == 2
    assert "no store is configured" in result.output


# -- a sync against a stand-in of the server ------------------------------------------------


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Node:
    """One node cache, a store, and a server (`FakeVllmServer`) that resolves through a resolver
    of its own, as a vLLM server does; each sync gets its own resolver and cache, as the sync's
    own process would have."""

    cache_dir: Path
    make_store: Callable[[Settings, NodeCache], Store]
    server: FakeVllmServer

    def sync(self, max_rank: int = 16, api_key: str | None = None, **options: Any) -> AdapterSync:
        """A sync of the server that asks the store every round (unless told otherwise)."""
        settings = Settings.from_environ(
            {
                "VLLM_LORA_RESOLVER_CACHE_DIR": str(self.cache_dir),
                "VLLM_LORA_RESOLVER_MAX_RANK": str(max_rank),
            },
            argv=[],
        )
        resolver = Resolver(self.make_store(settings, NodeCache(self.cache_dir)))
        options.setdefault("answer_max_age", 0.0)
        server = VllmServerApi(self.server.url, api_key)
        return AdapterSync(server, {resolver.source: resolver}, resolver.cache, **options)

    def serve(self, name: str) -> str:
        """Have the server resolve ``name`` (as a first request would); the snapshot's key."""
        assert self.server.resolver is not None
        resolved = self.server.resolver.resolve(BASE_MODEL, name)
        assert resolved is not None
        self.server.adapters[name] = str(resolved.path)
        return resolved.snapshot.key

    def served_key(self, name: str) -> str | None:
        snapshot = NodeCache(self.cache_dir).snapshot_in_path(self.server.adapters.get(name, ""))
        return None if snapshot is None else snapshot.key


@contextmanager
def running_node(
    cache_dir: Path, make_store: Callable[[Settings, NodeCache], Store]
) -> Iterator[Node]:
    settings = Settings.from_environ({"VLLM_LORA_RESOLVER_CACHE_DIR": str(cache_dir)}, argv=[])
    with FakeVllmServer(Resolver(make_store(settings, NodeCache(cache_dir)))) as server:
        yield Node(cache_dir, make_store, server)


@pytest.fixture
def node(cache_dir: Path, adapters_dir: Path) -> Iterator[Node]:
    """A node whose store is the folder ``adapters_dir``."""
    with running_node(cache_dir, partial(FilesystemStore, adapters_dir)) as running:
        yield running


def publish(adapters_dir: Path, name: str, seed: int, rank: int = 8) -> None:
    write_lora_adapter(adapters_dir / name, base_model=BASE_MODEL, seed=seed, rank=rank)


def serve_then_update(
    node: Node, adapters_dir: Path, rank: int = 8, **sync_options: Any
) -> tuple[str, AdapterSync]:
    """``sql`` served at a first version, a sync of the server (``sync_options``), then a second
    version of ``sql`` (of ``rank``) in the store: the key of the served snapshot (the one a
    switch replaces) and the sync."""
    publish(adapters_dir, "sql", seed=1)
    old = node.serve("sql")
    sync = node.sync(**sync_options)
    publish(adapters_dir, "sql", seed=2, rank=rank)
    return old, sync


def sync_once(node: Node, *arguments: str) -> Result:
    """``vllm-lora sync --server SERVER --once ARGUMENTS``; the environment names the store."""
    command = ["sync", "--server", node.server.url, "--once", *arguments]
    return CliRunner().invoke(main, command)


@pytest.fixture
def sync_environment(cache_dir: Path, adapters_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_LORA_RESOLVER_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("VLLM_LORA_RESOLVER_FS_DIR", str(adapters_dir))


def counted(metric: str) -> float:
    return REGISTRY.get_sample_value(metric) or 0.0


HTML_PAGE = Answer(
    200, b"<html><body><h1>502 Bad Gateway</h1></body></html>", (("Content-Type", "text/html"),)
)
SQL_CARD_WITHOUT_ROOT = {"id": "sql", "root": None, "parent": BASE_MODEL}
UNREADABLE_MODEL_LISTS = {
    "an HTML page": HTML_PAGE,
    "no model": Answer(200, b'{"data": []}'),
    "no base model": Answer(
        200, json.dumps({"data": [{"id": "sql", "root": "/x", "parent": "b"}]}).encode()
    ),
    "a card whose root is null": Answer(
        200,
        json.dumps(
            {"data": [{"id": BASE_MODEL, "root": BASE_MODEL}, SQL_CARD_WITHOUT_ROOT]}
        ).encode(),
    ),
    "no data": Answer(200, b'{"object": "list"}'),
}


@pytest.mark.parametrize(
    "answer", UNREADABLE_MODEL_LISTS.values(), ids=UNREADABLE_MODEL_LISTS.keys()
)
@pytest.mark.usefixtures("sync_environment")
def test_a_model_list_the_sync_cannot_read_is_cannot_ask(node: Node, answer: Answer) -> None:
    node.server.answers["GET /v1/models"] = answer
    assert node.sync().run_round() is RoundResult.CANNOT_ASK
    result = sync_once(node)
    assert result.exit_code == 2, result.output


UNREADABLE_METRICS = {
    "an HTML page": HTML_PAGE,
    "no request gauges": Answer(
        200, b"# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 1.5\n"
    ),
}


@pytest.mark.parametrize("answer", UNREADABLE_METRICS.values(), ids=UNREADABLE_METRICS.keys())
def test_metrics_the_sync_cannot_read_keep_the_replaced_version_until_drain_seconds(
    node: Node, adapters_dir: Path, answer: Answer
) -> None:
    clock = Clock()
    old, sync = serve_then_update(node, adapters_dir, drain_seconds=60, clock=clock)
    node.server.answers["GET /metrics"] = answer
    assert sync.run_round() is RoundResult.IN_SYNC
    clock.advance(59)
    assert sync.run_round() is RoundResult.IN_SYNC
    assert "GET /metrics" in node.server.routes_called()
    assert old in sync.cache.leased_keys()  # the server may still be busy
    clock.advance(1)
    sync.run_round()
    assert old not in sync.cache.leased_keys()


@pytest.mark.usefixtures("sync_environment")
def test_sync_once_with_unreadable_metrics_ends_by_drain_seconds(
    node: Node, adapters_dir: Path
) -> None:
    publish(adapters_dir, "sql", seed=1)
    node.serve("sql")
    node.server.answers["GET /metrics"] = HTML_PAGE
    publish(adapters_dir, "sql", seed=2)
    result = sync_once(node, "--drain-seconds", "0")
    assert result.exit_code == 0, result.output
    assert node.served_key("sql") == node.serve("sql")


LEFT_ALONE = [
    "an alias of our snapshot",
    "a name with spaces",
    "another cache's snapshot",
    "a path no process can open",
]


@pytest.mark.parametrize("case", LEFT_ALONE)
def test_the_sync_leaves_alone_what_our_resolvers_did_not_load_under_that_name(
    node: Node,
    adapters_dir: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    case: str,
) -> None:
    publish(adapters_dir, "sql", seed=1)
    node.serve("sql")
    ours = node.server.adapters.pop("sql")
    if case == "another cache's snapshot":
        other_cache = tmp_path / "other-cache"
        with running_node(other_cache, partial(FilesystemStore, adapters_dir)) as other:
            name, path = "sql", str(Path(ours.replace(str(node.cache_dir), str(other_cache))))
            other.serve("sql")
            assert Path(path).is_dir() and path != ours
    elif case == "a path no process can open":
        name, path = "sql", ours.replace(str(node.cache_dir), "/no\0where")
    else:
        name, path = ("prod-sql" if case == LEFT_ALONE[0] else "sql copy"), ours
    node.server.adapters[name] = path
    shutil.rmtree(adapters_dir / "sql")  # were it managed, the sync would unload it as gone
    sync = node.sync()
    with caplog.at_level(logging.INFO, logger="vllm.lora_resolvers.sync"):
        assert [sync.run_round(), sync.run_round()] == [RoundResult.IN_SYNC] * 2
    assert node.server.adapters == {name: path}
    assert "POST /v1/unload_lora_adapter" not in node.server.routes_called()
    assert len([r for r in caplog.records if f"leaving {name!r} alone" in r.getMessage()]) == 1


def test_an_adapter_of_ours_gone_from_its_store_is_unloaded(node: Node, adapters_dir: Path) -> None:
    publish(adapters_dir, "sql", seed=1)
    node.serve("sql")
    shutil.rmtree(adapters_dir / "sql")
    assert node.sync().run_round() is RoundResult.IN_SYNC
    assert node.server.adapters == {}


def test_a_slow_switch_holds_no_other_adapter_back(cache_dir: Path, tmp_path: Path) -> None:
    bucket = MemoryBucket()
    for seed in (1, 2):
        write_lora_adapter(tmp_path / str(seed), base_model=BASE_MODEL, seed=seed)
    for name in ("a", "b"):
        bucket.put_folder(name, tmp_path / "1")
    b_looked_up = threading.Event()
    waited_for_b: list[bool] = []

    def note_lookups(method: str, path: str) -> None:
        if (method, path) == ("LIST", "b"):
            b_looked_up.set()

    def switch_a_once_b_is_looked_up(name: str) -> None:
        if name == "a":  # a round that waited for this switch would never look 'b' up
            waited_for_b.append(b_looked_up.wait(timeout=30))

    with running_node(cache_dir, partial(MemoryStore, bucket)) as node:
        old = {name: node.serve(name) for name in ("a", "b")}  # 'a' first in the server's list
        sync = node.sync()
        for name in ("a", "b"):
            bucket.put_folder(name, tmp_path / "2")
        bucket.on_request = note_lookups
        node.server.on_tokenize = switch_a_once_b_is_looked_up
        assert sync.run_round() is RoundResult.IN_SYNC
        assert waited_for_b == [True]
        assert all(node.served_key(name) not in (None, old[name]) for name in ("a", "b"))


def test_a_version_the_server_refuses_at_the_switch_is_not_switched_to_again(
    node: Node, adapters_dir: Path
) -> None:
    # The sync's checks pass rank 32, the server's (16) do not.
    old, sync = serve_then_update(node, adapters_dir, rank=32, max_rank=64)
    refused = counted("vllm_lora_sync_refused_versions_total")
    assert sync.run_round() is RoundResult.NOT_APPLIED
    switch = ["POST /v1/unload_lora_adapter", "POST /tokenize", "POST /v1/load_lora_adapter"]
    assert [r for r in node.server.routes_called() if r.startswith("POST")] == switch
    assert node.served_key("sql") == old
    node.server.received.clear()
    assert [sync.run_round(), sync.run_round()] == [RoundResult.NOT_APPLIED] * 2
    assert node.server.routes_called() == ["GET /v1/models"] * 2  # no unload, no 400 for anyone
    assert counted("vllm_lora_sync_refused_versions_total") == refused + 1
    publish(adapters_dir, "sql", seed=3)  # the store's version changes: it is tried
    assert sync.run_round() is RoundResult.IN_SYNC
    assert node.served_key("sql") not in (None, old)


def test_syncs_of_a_node_share_store_answers_only_with_syncs_that_check_alike(
    node: Node, adapters_dir: Path
) -> None:
    # The server's limit is rank 16. A sync told 64 finds rank 32 current (the server then
    # refuses it at the switch); a sync told 16 must not take that answer for its own.
    old, told_64 = serve_then_update(node, adapters_dir, rank=32, max_rank=64, answer_max_age=3600)
    assert told_64.run_round() is RoundResult.NOT_APPLIED
    node.server.received.clear()
    refused = counted("vllm_lora_sync_refused_versions_total")
    told_16 = node.sync(max_rank=16, answer_max_age=3600)
    assert told_16.run_round() is RoundResult.NOT_APPLIED
    assert node.server.routes_called() == ["GET /v1/models"]  # refused by its own checks
    assert counted("vllm_lora_sync_refused_versions_total") == refused + 1
    assert node.served_key("sql") == old
    again_16 = node.sync(max_rank=16, answer_max_age=3600)  # shares the answer of its like
    lookups = counted("vllm_lora_sync_store_lookups_total")
    assert lookups > 0
    assert again_16.run_round() is RoundResult.NOT_APPLIED
    assert counted("vllm_lora_sync_store_lookups_total") == lookups


def test_a_switch_that_fails_after_the_unload_keeps_the_replaced_version_leased(
    node: Node, adapters_dir: Path
) -> None:
    old, sync = serve_then_update(node, adapters_dir)
    node.server.in_flight = 1  # busy: nothing drains before drain_seconds
    node.server.tokenize_status = 504  # the server switched; its answer was lost
    assert sync.run_round() is RoundResult.NOT_APPLIED
    assert node.served_key("sql") != old
    assert sync.run_round() is RoundResult.IN_SYNC
    assert old in sync.cache.leased_keys()


def test_an_idle_server_right_after_the_switch_does_not_release_the_replaced_version(
    node: Node, adapters_dir: Path
) -> None:
    # A request accepted just before the switch may not have reached the engine yet: /metrics
    # does not count it. The server is idle on every sample here.
    old, sync = serve_then_update(node, adapters_dir)
    assert sync.run_round() is RoundResult.IN_SYNC
    assert node.served_key("sql") != old
    assert old in sync.cache.leased_keys()


def test_the_replaced_version_is_released_once_the_server_is_idle_after_the_admission_grace(
    node: Node, adapters_dir: Path
) -> None:
    clock = Clock()
    old, sync = serve_then_update(node, adapters_dir, drain_seconds=60, clock=clock)
    assert sync.run_round() is RoundResult.IN_SYNC
    clock.advance(ADMISSION_SECONDS - 0.5)
    sync.run_round()
    assert old in sync.cache.leased_keys()
    clock.advance(0.5)
    node.server.in_flight = 1
    sync.run_round()
    assert old in sync.cache.leased_keys()
    node.server.in_flight = 0
    sync.run_round()
    assert old not in sync.cache.leased_keys()
    assert node.served_key("sql") in sync.cache.leased_keys()


DAMAGED_PHASES = ["nan", "abc", "1e300", "inf", "-1"]


@pytest.mark.parametrize("damage", DAMAGED_PHASES)
def test_a_damaged_round_phase_is_ignored_and_rewritten(node: Node, damage: str) -> None:
    sync = node.sync(interval=30)
    sync.next_round_time(1000.0)
    (record,) = sync.cache.layout.answers.iterdir()
    record.write_text(json.dumps(json.loads(record.read_text()) | {"answer": damage}))
    assert 1000 < sync.next_round_time(1000.0) <= 1030
    phase = json.loads(record.read_text())["answer"]
    assert 0 <= float(phase) < 1
    sync.next_round_time(1000.0)
    assert json.loads(record.read_text())["answer"] == phase  # kept from then on


def test_a_node_cache_that_cannot_hold_the_round_phase_leaves_the_sync_a_phase_of_its_own(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    sync = node.sync(interval=30, wall_clock=clock)
    answers = sync.cache.layout.answers
    shutil.rmtree(answers)
    answers.write_text("not a folder: no answer can be recorded or read\n")
    with caplog.at_level(logging.INFO, logger="vllm.lora_resolvers.sync"):
        first = sync.next_round_time(1000.0)
        assert 1000 < first <= 1030
        assert sync.next_round_time(1000.0) == first  # the same phase, round after round
        sync.run(Timeline(clock, waits=3))  # and the rounds go on
        assert caplog.text.count("keeps a round phase of its own") == 1  # said once
        answers.unlink()
        sync.next_round_time(1000.0)
        assert caplog.text.count("holds the round phase again") == 1
        assert len(list(answers.iterdir())) == 1  # the node's phase is recorded once more


class Timeline(threading.Event):
    """A stop event for `AdapterSync.run` whose waits pass at once on ``clock``; it stops the
    sync at its wait number ``waits``."""

    def __init__(self, clock: Clock, waits: int) -> None:
        super().__init__()
        self.clock = clock
        self.waits_left = waits

    def wait(self, timeout: float | None = None) -> bool:
        assert timeout is not None and timeout >= 0
        self.clock.advance(timeout)
        self.waits_left -= 1
        return self.waits_left == 0


def test_rounds_start_at_the_node_s_round_times_and_one_that_overran_is_followed_at_once(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    sync = node.sync(interval=30, wall_clock=clock)
    first = sync.next_round_time(clock.now)
    durations = iter([1.0, 45.0, 1.0, 1.0])  # the second round ends 15 s past the third's time
    starts = []

    def round_of_its_duration() -> RoundResult:
        starts.append(clock.now)
        clock.advance(next(durations))
        return RoundResult.IN_SYNC

    monkeypatch.setattr(sync, "run_round", round_of_its_duration)
    sync.run(Timeline(clock, waits=5))
    # The third round starts as the second ends, not at the next round time (first + 90): a
    # change published during the long round waits for its lookup no more than that round.
    assert starts == pytest.approx([first, first + 30, first + 75, first + 90])


@pytest.mark.parametrize("damage", ["current ../../x", "current", "gone 0123", "sideways x"])
def test_a_damaged_store_answer_is_asked_again_and_rewritten(
    node: Node, adapters_dir: Path, damage: str
) -> None:
    publish(adapters_dir, "sql", seed=1)
    key = node.serve("sql")
    sync = node.sync(answer_max_age=3600)  # a good record would be read back all along
    assert sync.run_round() is RoundResult.IN_SYNC
    (record,) = sync.cache.layout.answers.iterdir()
    record.write_text(json.dumps(json.loads(record.read_text()) | {"answer": damage}))
    assert sync.run_round() is RoundResult.IN_SYNC
    assert json.loads(record.read_text())["answer"] == f"current {key}"
    assert sync.cache.leased_keys() == {key}


def test_a_store_outage_is_reported_once_whatever_its_messages_say(
    cache_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bucket = MemoryBucket()
    write_lora_adapter(tmp_path / "sql", base_model=BASE_MODEL)
    bucket.put_folder("sql", tmp_path / "sql")
    request_ids = itertools.count()

    def refuse(method: str, path: str) -> None:
        raise StoreRefusedError(f"{method} {path}: HTTP 403, request id {next(request_ids)}")

    with running_node(cache_dir, partial(MemoryStore, bucket)) as node:
        node.serve("sql")
        sync = node.sync()
        bucket.on_request = refuse
        with caplog.at_level(logging.WARNING, logger="vllm.lora_resolvers.sync"):
            assert [sync.run_round() for _ in range(3)] == [RoundResult.CANNOT_ASK] * 3
            bucket.on_request = None
            assert sync.run_round() is RoundResult.IN_SYNC
            bucket.on_request = refuse
            assert [sync.run_round() for _ in range(2)] == [RoundResult.CANNOT_ASK] * 2
    reports = [r for r in caplog.records if "cannot ask the store" in r.getMessage()]
    assert len(reports) == 2  # one per outage
    assert "request id 0" in reports[0].getMessage()


SECRET = "sk-never-elsewhere"


@pytest.mark.usefixtures("sync_environment")
def test_a_redirect_is_not_followed_so_the_api_key_reaches_no_other_origin(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    with FakeVllmServer() as elsewhere:
        node.server.answers["GET /v1/models"] = Answer(
            302, headers=(("Location", f"{elsewhere.url}/v1/models"),)
        )
        with caplog.at_level(logging.DEBUG, logger="vllm.lora_resolvers.sync"):
            assert node.sync(api_key=SECRET).run_round() is RoundResult.CANNOT_ASK
        result = sync_once(node, "--api-key", SECRET)
        assert result.exit_code == 2, result.output
        assert elsewhere.received == []
    assert [r.headers["Authorization"] for r in node.server.received] == [f"Bearer {SECRET}"] * 2
    assert "a redirect" in caplog.text
    assert SECRET not in caplog.text + result.output


def test_the_rollout_page_states_the_admission_grace_and_the_adapters_handled_at_once() -> None:
    page = (REPO / "docs" / "rollout.md").read_text()
    assert f"at least {ADMISSION_SECONDS:g} seconds after the switch" in page
    assert f"up to {ADAPTERS_AT_ONCE} adapters at once" in page


def test_sample_sums_add_up_the_samples_of_each_name_that_carry_the_labels() -> None:
    exposition = (
        "# TYPE r counter\n"
        'r_total{backend="s3",outcome="hit"} 2.0\n'
        'r_total{backend="gcs",outcome="hit"} 3.0\n'
        'r_total{backend="s3",outcome="fetched"} 5.0\n'
        "# TYPE g gauge\n"
        "g 7.0\n"
    )
    assert sample_sums(exposition, {"r_total", "g", "absent"}) == {"r_total": 10.0, "g": 7.0}
    assert sample_sums(exposition, {"r_total"}, outcome="hit") == {"r_total": 5.0}
    assert sample_sums(exposition, {"r_total"}, backend="s3", outcome="hit") == {"r_total": 2.0}
    with pytest.raises(ValueError):
        sample_sums("<html>not prometheus</html>", {"g"})
