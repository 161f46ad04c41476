"""End to end: a fleet rollout. Two real vLLM servers on one node cache, each with its own
``vllm-lora sync``, one SeaweedFS bucket behind a counting relay.

Both servers run with prefix caching on and ``VLLM_PLUGINS=lora_s3_resolver,
lora_filesystem_resolver``. Each test changes the bucket and watches, from outside, what the
servers answer: updates, refused versions, outages, a restart, deletions, many updates. Tests run
in file order, on the same two servers.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import e2e_support
import pytest
import requests
from e2e_support import MAX_TOKENS, Store, listed_models, module_store, running_servers

from devtools.models import build_tiny_llama, write_lora_adapter
from devtools.relay import Fault
from devtools.stores import S3Endpoint
from devtools.sync_sidecar import VLLM_LORA, SyncSidecar
from devtools.vllm_server import VllmServer

pytest.importorskip("vllm")
pytestmark = [pytest.mark.server, pytest.mark.vllm]

INTERVAL = 2.0
#: A prompt longer than several KV blocks, so prefix caching has blocks to reuse.
PROMPT = " ".join(["The quick brown fox jumps over the lazy dog."] * 8)
#: A change is served within one interval plus the fetch and the switch; this is the test's
#: patience, far above it (2 cores, two servers), not a performance claim (see bench rollout).
CONVERGENCE_DEADLINE = 4 * INTERVAL + 30
ADAPTER_BYTES = 30_000
CACHE_CAP = 4 * ADAPTER_BYTES


def sidecar(server: VllmServer, env: dict[str, str], log: Path) -> SyncSidecar:
    return SyncSidecar(server, env, log, interval=INTERVAL, extra_args=("--drain-seconds", "30"))


@dataclass
class Fleet:
    servers: list[VllmServer]
    syncs: list[SyncSidecar]
    store: Store
    model: Path
    cache: Path
    work: Path
    env: dict[str, str]
    references: dict[int, str] = field(default_factory=dict)

    def adapter(self, seed: int, **options: object) -> Path:
        folder = self.work / "adapters" / f"{seed}-{'-'.join(map(str, options.values()))}"
        if not folder.exists():
            options.setdefault("base_model", str(self.model))
            write_lora_adapter(folder, seed=seed, **options)  # type: ignore[arg-type]
        return folder

    def upload(self, name: str, seed: int, **options: object) -> None:
        self.store.upload(name, self.adapter(seed, **options))

    def reference(self, seed: int) -> str:
        """What the adapter of ``seed`` makes server 0 say, loaded by vLLM itself from its
        folder (not through our cache) under a name of its own, then unloaded."""
        if seed not in self.references:
            server, name = self.servers[0], f"ref-{seed}"
            loaded = server.post(
                "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(self.adapter(seed))}
            )
            assert loaded.status_code == 200, loaded.text
            self.references[seed] = text(server, name)
            server.post("/v1/unload_lora_adapter", {"lora_name": name}).raise_for_status()
        return self.references[seed]


complete = partial(e2e_support.complete, prompt=PROMPT)
text = partial(e2e_support.text, prompt=PROMPT)


def wait_until_served(fleet: Fleet, name: str, expected: str) -> float:
    """Seconds until every server answers ``name`` with ``expected`` (fails after the deadline)."""
    started = time.monotonic()
    pending = set(range(len(fleet.servers)))
    while pending and time.monotonic() - started < CONVERGENCE_DEADLINE:
        for index in list(pending):
            response = complete(fleet.servers[index], name)
            if response.status_code == 200 and response.json()["choices"][0]["text"] == expected:
                pending.discard(index)
        time.sleep(0.2)
    assert not pending, f"servers {sorted(pending)} never served the expected {name!r}"
    return time.monotonic() - started


def wait_until_status(fleet: Fleet, name: str, status: int) -> None:
    started = time.monotonic()
    while time.monotonic() - started < CONVERGENCE_DEADLINE:
        if all(complete(server, name).status_code == status for server in fleet.servers):
            return
        time.sleep(0.2)
    pytest.fail(f"{name!r} never answered {status} on every server")


class ClientLoop:
    """Requests for one name to every server, back to back, recording each answer."""

    def __init__(self, fleet: Fleet, name: str) -> None:
        self.answers: list[tuple[int, str]] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(server, name)) for server in fleet.servers
        ]
        for thread in self._threads:
            thread.start()

    def _run(self, server: VllmServer, name: str) -> None:
        session = requests.Session()
        session.trust_env = False
        body = {"model": name, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
        while not self._stop.is_set():
            response = session.post(f"{server.url}/v1/completions", json=body, timeout=120)
            answer = (
                response.json()["choices"][0]["text"]
                if response.status_code == 200
                else response.text
            )
            self.answers.append((response.status_code, answer))

    def stop(self) -> list[tuple[int, str]]:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        return self.answers


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, seaweed: S3Endpoint) -> Iterator[Fleet]:
    work = tmp_path_factory.mktemp("e2e-rollout")
    model = build_tiny_llama(work / "model")
    cache = work / "cache"
    cache.mkdir()
    with module_store(seaweed, "e2e-rollout") as store:
        env = {
            **store.endpoint.env(),
            "VLLM_PLUGINS": "lora_s3_resolver,lora_filesystem_resolver",
            "VLLM_LORA_RESOLVER_CACHE_DIR": str(cache),
            "VLLM_LORA_RESOLVER_S3_URI": store.uri,
            "VLLM_LORA_RESOLVER_CACHE_MAX_BYTES": str(CACHE_CAP),
            "VLLM_LORA_RESOLVER_NEGATIVE_TTL": "1",
        }
        args = ["--enable-prefix-caching"]
        setups = [(work / f"server-{core}", env, core) for core in (0, 1)]
        with running_servers(model, setups, args) as (first, second):
            sync_env = {
                key: value
                for key, value in os.environ.items()
                if not key.startswith(("VLLM_LORA_RESOLVER_", "AWS_"))
            }
            sync_env |= env
            syncs = [
                sidecar(server, sync_env, work / f"sync-{index}.log")
                for index, server in enumerate((first, second))
            ]
            for sync in syncs:
                sync.wait_for_a_round()
            fleet = Fleet([first, second], syncs, store, model, cache, work, sync_env)
            try:
                yield fleet
            finally:
                for sync in fleet.syncs:
                    sync.stop()


def test_each_server_runs_on_a_core_of_its_own(fleet: Fleet) -> None:
    # Otherwise a busy server's engine process runs on the other server's core and starves it.
    for core, server in enumerate(fleet.servers):
        processes = server.processes()
        assert len(processes) >= 3  # the API server, the engine, the worker
        assert {frozenset(os.sched_getaffinity(pid)) for pid in processes} == {frozenset({core})}


def test_an_update_reaches_every_server_with_no_failed_or_mixed_response(fleet: Fleet) -> None:
    old, new = fleet.reference(1), fleet.reference(2)
    assert old != new
    fleet.upload("x", 1)
    assert [text(server, "x") for server in fleet.servers] == [old, old]
    loop = ClientLoop(fleet, "x")
    time.sleep(1)
    fleet.upload("x", 2)
    seconds = wait_until_served(fleet, "x", new)
    time.sleep(0.5)
    answers = loop.stop()
    failed = [(status, answer) for status, answer in answers if status != 200]
    # vLLM 0.32's own race (docs/rollout.md, "What a client sees"): a request that passed vLLM's
    # model check just before the unload and looks its adapter up just after gets vLLM's 404,
    # before any resolver is asked. Each client loop has one request in flight: one at most.
    assert all(status == 404 and "does not exist" in answer for status, answer in failed), failed
    assert len(failed) <= len(fleet.servers), failed
    assert {answer for status, answer in answers if status == 200} == {old, new}
    print(f"converged in {seconds:.1f} s; {len(answers)} requests during the rollout")
    assert sum(sync.metric("vllm_lora_sync_updates_total") for sync in fleet.syncs) == 2


def test_prefix_cache_blocks_of_the_old_version_are_not_reused(fleet: Fleet) -> None:
    # The client loop above ran PROMPT on the old version right up to the switch; prefix
    # caching was on, and the same prompt now gives the new version's output, as a server
    # that never saw the old version gives it.
    hits = e2e_support.metric(fleet.servers[0], "vllm:prefix_cache_hits_total")
    assert hits > 0, "prefix caching was not exercised"
    assert text(fleet.servers[0], "x") == fleet.reference(2)


def test_an_invalid_new_version_keeps_the_old_one_served(fleet: Fleet) -> None:
    fleet.upload("x", 3, rank=64)  # above the servers' --max-lora-rank 16
    time.sleep(3 * INTERVAL)
    assert [text(server, "x") for server in fleet.servers] == [fleet.reference(2)] * 2
    assert sum(sync.metric("vllm_lora_sync_refused_versions_total") for sync in fleet.syncs) >= 1
    assert "is refused" in fleet.syncs[0].log.read_text()


def test_a_store_outage_changes_nothing_and_the_update_lands_after_it(fleet: Fleet) -> None:
    # Every read of the bucket (lookups and downloads are GETs) fails; uploads (PUTs) pass.
    fleet.store.relay.add_fault(Fault("status", status=503, method="GET", times=10**9))
    try:
        fleet.upload("x", 4)
        time.sleep(3 * INTERVAL)
        assert [text(server, "x") for server in fleet.servers] == [fleet.reference(2)] * 2
    finally:
        fleet.store.relay.clear_faults()
    wait_until_served(fleet, "x", fleet.reference(4))


def test_a_server_restarted_mid_rollout_comes_up_serving_the_new_version(fleet: Fleet) -> None:
    restarted = fleet.servers[1]
    restarted.stop()
    fleet.upload("x", 5)
    restarted.start()
    assert text(restarted, "x") == fleet.reference(5)
    wait_until_served(fleet, "x", fleet.reference(5))


def test_a_deleted_adapter_is_withdrawn_everywhere_and_served_again_once_reuploaded(
    fleet: Fleet,
) -> None:
    fleet.store.delete("x")
    wait_until_status(fleet, "x", 404)
    assert all("x" not in listed_models(server) for server in fleet.servers)
    fleet.upload("x", 2)  # served again once the servers' memory of the miss expires (1 s)
    wait_until_served(fleet, "x", fleet.reference(2))


def test_twenty_updates_leave_the_cache_within_its_cap(fleet: Fleet) -> None:
    for round_number in range(20):
        seed = 100 + round_number
        fleet.upload("y", seed)
        if round_number == 0:
            for server in fleet.servers:
                text(server, "y")
        else:
            wait_until_served(fleet, "y", fleet.reference(seed))
    time.sleep(2 * INTERVAL)  # a round after the last switch releases the replaced version
    snapshots = list((fleet.cache / ".vllm-lora" / "snapshots").iterdir())
    total = sum(file.stat().st_size for folder in snapshots for file in folder.rglob("*"))
    assert total <= CACHE_CAP, f"{len(snapshots)} snapshots, {total} bytes"


def test_published_versions_roll_out_and_back_and_a_pin_never_moves(fleet: Fleet) -> None:
    publish(fleet, fleet.adapter(6), "--version", "v6")
    publish(fleet, fleet.adapter(7), "--version", "v7")
    six, seven = fleet.reference(6), fleet.reference(7)
    assert [text(server, "p") for server in fleet.servers] == [seven] * 2
    assert text(fleet.servers[0], "p@v6") == six
    publish(fleet, "--rollback")  # the pointer moves back to v6: the syncs roll the fleet back
    wait_until_served(fleet, "p", six)
    publish(fleet, fleet.adapter(8), "--version", "v8")
    wait_until_served(fleet, "p", fleet.reference(8))
    assert text(fleet.servers[0], "p@v6") == six  # the pin never moved


def publish(fleet: Fleet, *arguments: object) -> None:
    """``vllm-lora publish ... s3://BUCKET/PREFIX/p`` with the servers' store settings."""
    uri = f"{fleet.store.uri}/p"
    command = [VLLM_LORA, "publish", *map(str, arguments[:1]), uri, *map(str, arguments[1:])]
    if arguments[:1] == ("--rollback",):
        command = [VLLM_LORA, "publish", "--rollback", uri]
    done = subprocess.run(command, env=fleet.env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_store_lookups_per_round_are_the_same_with_one_sync_or_four_on_the_node(
    fleet: Fleet,
) -> None:
    for sync in fleet.syncs:
        sync.stop()
    one = lookups_per_round(fleet, [fleet.servers[0]])
    four = lookups_per_round(fleet, [*fleet.servers, *fleet.servers])
    names = {"x", "y", "p", "p@v6"}  # what the servers hold from the bucket now (listings)
    assert one == four == len(names)


def lookups_per_round(fleet: Fleet, servers: list[VllmServer]) -> float:
    """Listing requests the store sees per round while one sync per entry of ``servers`` runs."""
    syncs = [
        sidecar(server, fleet.env, fleet.work / f"count-{index}.log")
        for index, server in enumerate(servers)
    ]
    try:
        for sync in syncs:
            sync.wait_for_a_round()
        time.sleep(INTERVAL / 4)  # between rounds
        fleet.store.relay.reset_counters()
        rounds_before = syncs[0].metric("vllm_lora_sync_rounds_total")
        time.sleep(5 * INTERVAL)
        rounds = syncs[0].metric("vllm_lora_sync_rounds_total") - rounds_before
        listings = [path for _, path in fleet.store.relay.requests if "list-type=2" in path]
    finally:
        for sync in syncs:
            sync.stop()
    assert rounds >= 4
    return len(listings) / rounds


def test_a_version_the_server_refuses_at_the_switch_is_switched_to_once(fleet: Fleet) -> None:
    # The sync's checks pass rank 32 (--max-rank 64); the server's (16) refuse it at the switch.
    for sync in fleet.syncs:
        sync.stop()  # their checks (16) would refuse the version first, for the whole node
    server = fleet.servers[0]
    fleet.upload("z", 9)
    assert text(server, "z") == fleet.reference(9)
    permissive = SyncSidecar(
        server,
        fleet.env,
        fleet.work / "sync-permissive.log",
        interval=INTERVAL,
        extra_args=("--drain-seconds", "30", "--max-rank", "64"),
    )
    try:
        permissive.wait_for_a_round()
        fleet.upload("z", 10, rank=32)
        deadline = time.monotonic() + CONVERGENCE_DEADLINE
        while permissive.metric("vllm_lora_sync_refused_versions_total") < 1:
            assert time.monotonic() < deadline, permissive.log.read_text()[-3000:]
            time.sleep(0.2)
        rounds = permissive.metric("vllm_lora_sync_rounds_total")
        while permissive.metric("vllm_lora_sync_rounds_total") < rounds + 3:
            assert text(server, "z") == fleet.reference(9)  # never a 400: no switch any more
            time.sleep(0.2)
        assert permissive.metric("vllm_lora_sync_refused_versions_total") == 1
        assert permissive.metric("vllm_lora_sync_failures_total") == 1
        assert permissive.log.read_text().count("switching 'z' to version") == 1
        fleet.upload("z", 11)  # a new version is switched to
        wait_until_served(fleet, "z", fleet.reference(11))
    finally:
        permissive.stop()
