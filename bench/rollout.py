"""Fleet rollout: how fast an update reaches every server, what clients see meanwhile, and what
the store pays per interval; `vllm-lora sync` against the per-server sidecar people run today.

One SeaweedFS bucket behind a counting relay; two vLLM servers (the tiny Llama, every process
of each on a core of its own) on one node cache; a client loop per server asking for ``x`` back
to back, greedy. ``REPEATS`` times, ``x`` is overwritten with new weights, at a random moment of
the interval, and for each server we note the seconds from the end of the upload (when the store
holds the new version: its weights are the last file written) until a response with the new
version's output comes back, every response that failed or matches neither version's output,
and the slowest response (a server starved of its core answers in seconds, not in a fraction of
one, and makes the convergence of both strategies long).

The random moment matters: each update starts when the previous one converged, which is at a
fixed time after a round, so uploads made a fixed time later all land at the same moment of the
rounds (they did: just after a round, every convergence a whole interval long).

- **ours**: a ``vllm-lora sync`` per server, ``--interval INTERVAL``.
- **baseline**: what a ConfigMap- or bucket-watching sidecar does (llm-d's dynamic-lora-sidecar
  style): per server, every ``INTERVAL`` list the adapter's folder; when it changed, download it
  to a new folder and ``POST /v1/load_lora_adapter`` with ``load_inplace``.

Store requests per round are counted at the relay with the sidecars idle, for 1, 2 and 4 syncs
on the node against one poller per server.
"""

from __future__ import annotations

import itertools
import os
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import requests

from bench.common import report
from devtools.models import build_tiny_llama, write_lora_adapter
from devtools.relay import FaultRelay
from devtools.stores import S3Endpoint, SeaweedS3, upload_folder
from devtools.sync_sidecar import SyncSidecar
from devtools.vllm_server import VllmServer

INTERVAL = 2.0
REPEATS = 8
BUCKET, PREFIX = "bench-rollout", "adapters"
PROMPT = " ".join(["The quick brown fox jumps over the lazy dog."] * 8)
#: Long enough that a switch often lands in the middle of a request's generation.
MAX_TOKENS = 48
#: Rounds over which store requests are counted.
COUNTED_ROUNDS = 5


@dataclass
class Node:
    servers: list[VllmServer]
    store: S3Endpoint  # through the relay
    relay: FaultRelay
    model: Path
    work: Path
    env: dict[str, str]
    outputs: dict[int, str] = field(default_factory=dict)

    def folder(self, seed: int) -> Path:
        folder = self.work / "adapters" / str(seed)
        if not folder.exists():
            write_lora_adapter(folder, base_model=str(self.model), seed=seed)
        return folder

    def upload(self, seed: int) -> None:
        upload_folder(self.store.client(), BUCKET, f"{PREFIX}/x", self.folder(seed))

    def output(self, seed: int) -> str:
        """Server 0's output with the adapter of ``seed``, loaded by vLLM from its folder."""
        if seed not in self.outputs:
            server, name = self.servers[0], f"reference-{seed}"
            body = {"lora_name": name, "lora_path": str(self.folder(seed))}
            server.post("/v1/load_lora_adapter", body).raise_for_status()
            self.outputs[seed] = completion(server.url, name, requests.Session())[1]
            server.post("/v1/unload_lora_adapter", {"lora_name": name}).raise_for_status()
        return self.outputs[seed]


def completion(url: str, model: str, session: requests.Session) -> tuple[int, str]:
    body = {"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
    response = session.post(f"{url}/v1/completions", json=body, timeout=120)
    if response.status_code != 200:
        return response.status_code, response.text
    return 200, str(response.json()["choices"][0]["text"])


@dataclass
class Rollout:
    """What the client loops saw during one rollout strategy's updates."""

    convergence: list[float] = field(default_factory=list)
    responses: int = 0
    failed: int = 0
    mixed: int = 0
    slowest: float = 0.0


def measure_updates(node: Node, rollout: Rollout, first_seed: int) -> None:
    """``REPEATS`` updates of ``x`` under client loops, into ``rollout``."""
    seeds = [first_seed + repeat for repeat in range(REPEATS + 1)]
    expected = {seed: node.output(seed) for seed in seeds}
    node.upload(seeds[0])
    session = requests.Session()
    for server in node.servers:
        wait_for(partial(answers, server.url, session, expected[seeds[0]]))
    for old, new in itertools.pairwise(seeds):
        seen: list[Seen] = []
        stop = threading.Event()
        loops = [
            threading.Thread(target=client_loop, args=(index, server.url, stop, seen))
            for index, server in enumerate(node.servers)
        ]
        for loop in loops:
            loop.start()
        time.sleep(0.5 + random.uniform(0, INTERVAL))
        node.upload(new)
        published = time.monotonic()
        wait_for(partial(converged, seen, len(node.servers), expected[new]))
        time.sleep(0.5)
        stop.set()
        for loop in loops:
            loop.join()
        for index in range(len(node.servers)):
            first_new = min(r.at for r in seen if r.server == index and r.text == expected[new])
            rollout.convergence.append(first_new - published)
        rollout.responses += len(seen)
        rollout.failed += sum(1 for r in seen if r.status != 200)
        versions = (expected[old], expected[new])
        rollout.mixed += sum(1 for r in seen if r.status == 200 and r.text not in versions)
        rollout.slowest = max(rollout.slowest, *(r.seconds for r in seen))


@dataclass(frozen=True)
class Seen:
    """A response a client loop got: from which server, what, when it came back, how long it
    took."""

    server: int
    status: int
    text: str
    at: float
    seconds: float


def client_loop(index: int, url: str, stop: threading.Event, seen: list[Seen]) -> None:
    session = requests.Session()
    session.trust_env = False
    while not stop.is_set():
        sent = time.monotonic()
        status, text = completion(url, "x", session)
        at = time.monotonic()
        seen.append(Seen(index, status, text, at, at - sent))


def answers(url: str, session: requests.Session, text: str) -> bool:
    return completion(url, "x", session)[1] == text


def converged(seen: list[Seen], servers: int, text: str) -> bool:
    return {r.server for r in seen if r.text == text} == set(range(servers))


def wait_for(condition: Callable[[], bool], timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the rollout did not converge")
        time.sleep(0.05)


class InPlacePoller:
    """The baseline sidecar: poll the folder's listing, download a changed adapter to a new
    folder, ``load_inplace`` it."""

    def __init__(self, node: Node, server: VllmServer, name: str) -> None:
        self.node, self.server, self.name = node, server, name
        self.client = node.store.client()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)
        self._seen = ""
        self.poll()  # the version served now
        self._thread.start()

    def poll(self) -> None:
        listing = self.client.list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/{self.name}/")
        contents = listing.get("Contents", [])
        version = ",".join(sorted(item["ETag"] for item in contents))
        if version == self._seen:
            return
        folder = self.node.work / "baseline" / f"{self.server.port}-{time.monotonic_ns()}"
        folder.mkdir(parents=True)
        for item in contents:
            target = folder / item["Key"].rsplit("/", 1)[1]
            self.client.download_file(BUCKET, item["Key"], str(target))
        if self._seen:
            body = {"lora_name": self.name, "lora_path": str(folder), "load_inplace": True}
            self.server.post("/v1/load_lora_adapter", body).raise_for_status()
        self._seen = version

    def _run(self) -> None:
        while not self._stop.wait(INTERVAL):
            self.poll()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def requests_per_round(node: Node, start: Callable[[], Callable[[], None]]) -> float:
    """Store requests per round while the sidecars ``start`` returns a stopper for run idle."""
    stop = start()
    try:
        time.sleep(INTERVAL * 1.25)
        node.relay.reset_counters()
        time.sleep(INTERVAL * COUNTED_ROUNDS)
        return len(node.relay.requests) / COUNTED_ROUNDS
    finally:
        stop()


@contextmanager
def running_node(work: Path) -> Iterator[Node]:
    model = build_tiny_llama(work / "model")
    with SeaweedS3(work / "seaweed") as seaweed:
        seaweed.endpoint.client().create_bucket(Bucket=BUCKET)
        with FaultRelay(int(seaweed.endpoint.url.rsplit(":", 1)[1])) as relay:
            store = S3Endpoint(relay.url, seaweed.endpoint.access_key, seaweed.endpoint.secret_key)
            env = {
                **store.env(),
                "VLLM_PLUGINS": "lora_s3_resolver,lora_filesystem_resolver",
                "VLLM_LORA_RESOLVER_S3_URI": f"s3://{BUCKET}/{PREFIX}",
                "VLLM_LORA_RESOLVER_CACHE_DIR": str(work / "cache"),
            }
            args = ["--enable-prefix-caching"]
            servers = [
                VllmServer(
                    model, workdir=work / f"s{core}", extra_env=env, extra_args=args, core=core
                )
                for core in (0, 1)
            ]
            with servers[0], servers[1]:
                yield Node(servers, store, relay, model, work, env)


def start_syncs(node: Node, per_server: int) -> Callable[[], None]:
    env = {**os.environ, **node.env}
    syncs = [
        SyncSidecar(server, env, node.work / f"sync-{index}.log", interval=INTERVAL)
        for index, server in enumerate(node.servers * per_server)
    ]
    for sync in syncs:
        sync.wait_for_a_round()

    def stop() -> None:
        for sync in syncs:
            sync.stop()

    return stop


def start_pollers(node: Node) -> Callable[[], None]:
    pollers = [InPlacePoller(node, server, "x") for server in node.servers]

    def stop() -> None:
        for poller in pollers:
            poller.stop()

    return stop


def main() -> None:
    ours, baseline = Rollout(), Rollout()
    with (
        tempfile.TemporaryDirectory(prefix="bench-rollout-") as directory,
        running_node(Path(directory)) as node,
    ):
        stop = start_syncs(node, 1)
        try:
            measure_updates(node, ours, first_seed=10)
        finally:
            stop()
        ours_requests = {
            count: requests_per_round(node, partial(start_syncs, node, count)) for count in (1, 2)
        }
        for server in node.servers:
            server.post("/v1/unload_lora_adapter", {"lora_name": "x"})
        node.upload(50)
        for server in node.servers:
            body = {"lora_name": "x", "lora_path": str(node.folder(50))}
            server.post("/v1/load_lora_adapter", body).raise_for_status()
        stop = start_pollers(node)
        try:
            measure_updates(node, baseline, first_seed=50)
        finally:
            stop()
        baseline_requests = requests_per_round(node, partial(start_pollers, node))
    rows = []
    for label, rollout in (("vllm-lora sync", ours), ("baseline (poll + load_inplace)", baseline)):
        samples = sorted(rollout.convergence)
        p50, p100 = statistics.median(samples), samples[-1]
        counts = f"{rollout.responses}, {rollout.failed}, {rollout.mixed}"
        rows += [
            (f"{label}: convergence p50 / p100", f"{p50:.2f} / {p100:.2f} s"),
            (f"{label}: responses, failed, neither version", counts),
            (f"{label}: slowest response", f"{rollout.slowest:.2f} s"),
        ]
    rows += [
        ("store requests per round, 1 sync per server (2 servers)", f"{ours_requests[1]:.1f}"),
        ("store requests per round, 2 syncs per server (4 on the node)", f"{ours_requests[2]:.1f}"),
        ("store requests per round, baseline poller per server", f"{baseline_requests:.1f}"),
        (
            "baseline / ours, store requests per round",
            f"{baseline_requests / max(ours_requests[1], 0.1):.1f}x",
        ),
    ]
    title = f"fleet rollout: 2 vLLM servers on one node, {REPEATS} updates, interval {INTERVAL:g} s"
    report(title, rows)


if __name__ == "__main__":
    main()
