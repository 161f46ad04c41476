"""The soak driver: one SeaweedFS bucket behind a fault relay, one node cache, a fleet of workers.

While the workers run, background threads re-arm the relay's faults every second, re-upload
adapters (new versions), kill -9 a worker now and then (it is replaced), and sample the cache's
size. Afterwards everything observed goes to `devtools.soak.report`.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from devtools.relay import Fault, FaultRelay
from devtools.soak.corpus import (
    PREFIX,
    CorpusPlan,
    Uploader,
    VersionTable,
    plan_corpus,
    upload_corpus,
)
from devtools.soak.fleet import Fleet
from devtools.soak.report import CacheSample, Observed, build_report
from devtools.stores import S3Endpoint, SeaweedS3
from vllm_lora_resolvers.cache import LEASE, MANIFEST, NodeCache, is_locked

BUCKET = "soak"
_HOSTILE = (
    "../hostile", "hostile/../../etc", "/etc/hostile", "hostile\\x", "hostile\x00x",
    "hostile\nx", ".hostile", "hostile/./x", "hostile//x", "h" * 5000, "hostile:x", "hostile x",
)  # fmt: skip


@dataclass(frozen=True)
class SoakOptions:
    """Everything a soak run is shaped by."""

    processes: int = 16
    adapters: int = 200
    requests: int = 20_000
    minutes: float = 10.0
    min_size_mb: float = 1.0
    max_size_mb: float = 200.0
    large: int = 6
    invalid: int = 12
    absent: int = 20
    cache_cap_mb: float = 256.0
    fault_times: int = 1
    update_interval: float = 5.0
    chaos_interval: float = 45.0
    chaos_max: int = 1_000
    in_flight: int = 3
    negative_ttl: float = 30.0
    seed: int = 0
    work: Path | None = None


@dataclass
class Background:
    """Threads that run beside the fleet until ``stop`` is set, and what they counted."""

    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    samples: list[CacheSample] = field(default_factory=list)
    faults_armed: int = 0
    updates: int = 0
    errors: list[str] = field(default_factory=list)

    def every(self, seconds: float, action: Callable[[], None], name: str) -> None:
        """Run ``action`` every ``seconds`` until stopped; its failures are recorded."""

        def loop() -> None:
            while not self.stop.wait(seconds):
                try:
                    action()
                except Exception as error:  # reported as a soak failure
                    self.errors.append(f"{name}: {type(error).__name__}: {error}")

        thread = threading.Thread(target=loop, name=f"soak-{name}", daemon=True)
        thread.start()
        self.threads.append(thread)

    def join(self) -> None:
        """Stop every thread and wait for it."""
        self.stop.set()
        for thread in self.threads:
            thread.join()


def arm_faults(relay: FaultRelay, times: int, rng: random.Random) -> int:
    """Replace the relay's rules: ``times`` 503s, resets and truncations; how many were armed."""
    relay.clear_faults()
    relay.add_fault(Fault("status", times=times, status=503, code="SlowDown"))
    for kind in ("reset_after", "close_after"):
        relay.add_fault(
            Fault(kind, method="GET", times=times, after_bytes=rng.randint(0, 256 << 10))
        )
    return 3 * times


def sample_cache(root: Path, *, steady: bool) -> CacheSample:
    """Bytes in complete snapshots, of those the ones no live process leases, and in staging."""
    cache = root / ".vllm-lora"
    total = unleased = 0
    for entry in _entries(cache / "snapshots"):
        try:
            size = json.loads(Path(entry.path, MANIFEST).read_bytes())["files"]
            size = sum(file["size"] for file in size)
        except (OSError, ValueError):
            continue
        total += size
        if not is_locked(Path(entry.path, LEASE)):
            unleased += size
    staging = 0
    for directory, _, files in os.walk(cache / "staging"):
        for name in files:
            try:
                staging += Path(directory, name).lstat().st_size
            except OSError:
                continue
    return CacheSample(time.time(), total, unleased, staging, steady)


def _entries(directory: Path) -> list[os.DirEntry[str]]:
    try:
        return list(os.scandir(directory))
    except FileNotFoundError:
        return []  # no process created the cache yet


def worker_env(
    options: SoakOptions, relayed: S3Endpoint, cache: Path, max_rank: int
) -> dict[str, str]:
    """The environment of a worker: a vLLM server's, with our S3 plugin only."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "VLLM_"))},
        **relayed.env(),
        "VLLM_PLUGINS": "lora_s3_resolver",
        "VLLM_LORA_RESOLVER_CACHE_DIR": str(cache),
        "VLLM_LORA_RESOLVER_S3_URI": f"s3://{BUCKET}/{PREFIX}",
        "VLLM_LORA_RESOLVER_CACHE_MAX_BYTES": str(int(options.cache_cap_mb * (1 << 20))),
        "VLLM_LORA_RESOLVER_MAX_RANK": str(max_rank),
        "VLLM_LORA_RESOLVER_NEGATIVE_TTL": str(options.negative_ttl),
        "NO_PROXY": "127.0.0.1,localhost",
    }


def write_plan(
    options: SoakOptions, work: Path, corpus: CorpusPlan, table: VersionTable, deadline: float
) -> Path:
    """The JSON every worker reads: names, their kinds, the version table's path, the pacing."""
    rng = random.Random(options.seed)
    ranked = [spec.name for spec in corpus.adapters]
    rng.shuffle(ranked)
    plan: dict[str, Any] = {
        "ranked": ranked,
        "kinds": {spec.name: spec.kind for spec in corpus.adapters},
        "absent": [f"absent-{i:03d}" for i in range(options.absent)],
        "hostile": list(_HOSTILE),
        "absent_share": 0.08,
        "hostile_share": 0.04,
        "zipf_s": 1.1,
        "reread_share": 0.3,
        "in_flight": options.in_flight,
        "base_model": "/models/tiny-llama",
        "table": str(table.path),
        "seed": options.seed,
        "deadline": deadline,
    }
    path = work / "plan.json"
    path.write_text(json.dumps(plan))
    return path


def run_soak(options: SoakOptions) -> dict[str, Any]:
    """Run one soak and return its report (``report["passed"]`` says whether every check held)."""
    with tempfile.TemporaryDirectory(prefix="soak-", dir=options.work) as tmp:
        work = Path(tmp)
        with SeaweedS3(work / "seaweed") as store:
            return _run_with_store(options, work, store.endpoint)


def _run_with_store(options: SoakOptions, work: Path, endpoint: S3Endpoint) -> dict[str, Any]:
    client = endpoint.client()
    client.create_bucket(Bucket=BUCKET)
    corpus = plan_corpus(
        options.adapters, min_mb=options.min_size_mb, max_mb=options.max_size_mb,
        large=options.large, invalid=options.invalid, seed=options.seed,
    )  # fmt: skip
    table = VersionTable(work / "versions.json")
    uploader = Uploader(client, BUCKET, table, work)
    started = time.time()
    upload_corpus(uploader, corpus)
    upload_seconds = time.time() - started
    cache = work / "cache"
    cache.mkdir()
    upstream = int(endpoint.url.rsplit(":", 1)[1])
    with FaultRelay(upstream) as relay:
        relayed = S3Endpoint(relay.url, endpoint.access_key, endpoint.secret_key)
        deadline = time.time() + options.minutes * 60
        plan_path = write_plan(options, work, corpus, table, deadline)
        env = worker_env(options, relayed, cache, corpus.max_rank)
        fleet = Fleet(work, plan_path, env, options.processes, options.requests)
        background = _start_background(
            options, relay=relay, uploader=uploader, corpus=corpus, fleet=fleet, cache=cache
        )
        run_started = time.time()
        fleet.start()
        fleet.wait(deadline + 120)
        background.join()
        observed = Observed(
            options=asdict(options) | {"work": str(options.work)},
            corpus=corpus,
            table=table,
            outputs=fleet.outputs(),
            samples=background.samples,
            relay_requests=relay.requests,
            relay_body_bytes=relay.response_body_bytes,
            cache_root=cache,
            kills=fleet.kills,
            crashes=fleet.crashes + background.errors,
            faults_armed=background.faults_armed,
            updates=background.updates,
            upload_seconds=upload_seconds,
            run_seconds=time.time() - run_started,
        )
    observed.debris_after_run = debris(cache)
    NodeCache(cache)  # the next start cleans what crashed processes left
    observed.debris_after_restart = debris(cache)
    observed.verify_problems = NodeCache(cache).verify()
    return build_report(observed)


def _start_background(
    options: SoakOptions,
    *,
    relay: FaultRelay,
    uploader: Uploader,
    corpus: CorpusPlan,
    fleet: Fleet,
    cache: Path,
) -> Background:
    background = Background()
    rng = random.Random(options.seed + 1)
    updatable = [spec for spec in corpus.valid() if spec.size_bytes <= 8 << 20]
    seeds = iter(range(1, 1 << 30))

    def faults() -> None:
        background.faults_armed += arm_faults(relay, options.fault_times, rng)

    def update() -> None:
        uploader.upload(rng.choice(updatable), next(seeds), corpus.max_rank, weights_only=True)
        background.updates += 1

    def chaos() -> None:
        if fleet.kills < options.chaos_max:
            fleet.kill_one(rng)

    if options.fault_times > 0:
        background.every(1.0, faults, "faults")
    if options.update_interval > 0 and updatable:
        background.every(options.update_interval, update, "updates")
    if options.chaos_interval > 0 and options.chaos_max > 0:
        background.every(options.chaos_interval, chaos, "chaos")

    def sample() -> None:
        steady = fleet.steady()  # before sampling: a kill during the sample makes it unsteady
        background.samples.append(sample_cache(cache, steady=steady and fleet.steady()))

    background.every(0.5, sample, "sampler")
    return background


def debris(cache: Path) -> list[str]:
    """What is left in staging and trash (a clean cache has nothing there)."""
    state = cache / ".vllm-lora"
    return sorted(
        f"{directory}/{entry.name}"
        for directory in ("staging", "trash")
        for entry in os.scandir(state / directory)
    )
