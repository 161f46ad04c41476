"""`make demo`: a real vLLM server resolving LoRA adapters from an S3 bucket, on this machine.

Builds a tiny Llama and a few adapters offline into ``.work/demo/`` (the model is reused), starts
SeaweedFS (an S3 server) and vLLM on 127.0.0.1 with our resolvers, shows what a client sees,
then rolls a new version of an adapter out (``vllm-lora publish``, switched by a ``vllm-lora sync``
beside the server) and back while a client loops on it, and stops everything it started, also on
Ctrl-C or an error. Exit code 0 only if every step behaved as
expected, so it doubles as a check. Run it with ``python -m devtools.demo``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import requests

from devtools.models import build_tiny_llama, write_lora_adapter
from devtools.stores import SeaweedS3, upload_folder
from devtools.sync_sidecar import VLLM_LORA, SyncSidecar
from devtools.vllm_server import VllmServer
from vllm_lora_resolvers.metrics import sample_sums

WORK = Path(__file__).resolve().parents[1] / ".work" / "demo"
BUCKET, PREFIX = "demo-adapters", "adapters"
PROMPT = "The quick brown fox"
PLUGINS = "lora_s3_resolver,lora_fs_resolver"
#: Seconds between the sync's rounds: a new version reaches the server within one, plus the fetch.
SYNC_INTERVAL = 2.0
#: The demo's patience for a rollout (far above what it takes), not a performance claim.
ROLLOUT_DEADLINE = 60.0
RANK_REASON = "rank 32 is above this server's limit of 16"
SHOWN_METRICS = ("vllm_lora_resolver_resolutions_total{", "vllm_lora_resolver_fetched_bytes_total")


@dataclass
class Step:
    title: str
    ok: bool
    ms: float
    detail: str


class Demo:
    """The running demo: what was started, what was seen."""

    def __init__(self) -> None:
        self.began = time.monotonic()
        self.steps: list[Step] = []
        self.server: VllmServer | None = None

    def say(self, message: str) -> None:
        print(f"[{time.monotonic() - self.began:6.1f}s] {message}", flush=True)

    def record(self, title: str, ok: bool, ms: float, detail: str) -> None:
        self.steps.append(Step(title, ok, ms, detail))
        self.say(f"{'ok ' if ok else 'FAIL'} {title}: {detail} ({ms:.0f} ms)")

    def complete(self, model: str) -> tuple[requests.Response, float]:
        """A greedy completion of `PROMPT`, and how long it took in ms."""
        assert self.server is not None
        started = time.perf_counter()
        response = self.server.completions(model, PROMPT, max_tokens=12)
        return response, (time.perf_counter() - started) * 1000

    def metric(self, sample: str, **labels: str) -> float:
        """Sum of the server's ``/metrics`` samples named ``sample`` that carry ``labels``."""
        assert self.server is not None
        return sample_sums(self.server.get("/metrics").text, {sample}, **labels).get(sample, 0.0)


def generated(response: requests.Response) -> str:
    if response.status_code != 200:
        return f"<HTTP {response.status_code}>"
    text: str = response.json()["choices"][0]["text"]
    return text


def prepare(demo: Demo) -> tuple[Path, dict[str, Path]]:
    """The tiny Llama (reused when present) and fresh adapters, cache and store folders."""
    demo.say(f"Building the tiny Llama and the adapters offline in {WORK} ...")
    for stale in ("adapters", "cache", "shared-disk", "seaweed", "vllm"):
        shutil.rmtree(WORK / stale, ignore_errors=True)
    model = build_tiny_llama(WORK / "model")
    (WORK / "shared-disk").mkdir()
    base = str(model)  # adapters must name the server's --model string exactly
    return model, {
        "sql-expert": write_lora_adapter(WORK / "adapters/sql-expert", base_model=base, seed=1),
        "sql-expert-v2": write_lora_adapter(
            WORK / "adapters/sql-expert-v2", base_model=base, seed=3
        ),
        "support-bot": write_lora_adapter(WORK / "adapters/support-bot", base_model=base, seed=2),
        "too-big": write_lora_adapter(WORK / "adapters/too-big", base_model=base, rank=32),
    }


def run(demo: Demo, stack: ExitStack) -> None:
    model, adapters = prepare(demo)
    demo.say("Starting SeaweedFS (S3) on 127.0.0.1 ...")
    store = stack.enter_context(SeaweedS3(WORK / "seaweed")).endpoint
    s3 = store.client()
    s3.create_bucket(Bucket=BUCKET)
    upload_folder(s3, BUCKET, f"{PREFIX}/too-big", adapters["too-big"])
    env = {
        **store.env(),
        "VLLM_PLUGINS": PLUGINS,
        "VLLM_LORA_RESOLVER_S3_URI": f"s3://{BUCKET}/{PREFIX}",
        "VLLM_LORA_RESOLVER_CACHE_DIR": str(WORK / "cache"),
        "VLLM_LORA_RESOLVER_FS_DIR": str(WORK / "shared-disk"),
    }
    publish(demo, env, "sql-expert", adapters["sql-expert"], "--version", "v1")
    demo.say(f"Bucket s3://{BUCKET}/{PREFIX}/ holds: sql-expert (published, v1), too-big (rank 32)")
    for variable in ("VLLM_PLUGINS", "VLLM_LORA_RESOLVER_S3_URI", "VLLM_LORA_RESOLVER_CACHE_DIR"):
        demo.say(f"  {variable}={env[variable]}")
    demo.server = VllmServer(model, workdir=WORK / "vllm", extra_env=env)
    stack.callback(demo.server.stop)  # registered first: a Ctrl-C during start-up stops it too
    demo.say("Starting vLLM (about 35 s on 2 cores) ...")
    demo.server.start()
    demo.say(f"vLLM is up at {demo.server.url} (log: {demo.server.log_path})")
    base = generated(demo.complete(str(model))[0])
    demo.say(f"Base model says {base!r} (a random tiny model: only differences matter)")

    response, ms = demo.complete("sql-expert")
    text = generated(response)
    demo.record(
        "1. first request for sql-expert (fetched from the bucket)",
        response.status_code == 200 and text != base,
        ms,
        f"HTTP {response.status_code}, {text!r}",
    )
    response, repeat_ms = demo.complete("sql-expert")
    demo.say(f"     asked again: vLLM already holds it ({repeat_ms:.0f} ms)")
    demo.server.post("/v1/unload_lora_adapter", {"lora_name": "sql-expert"}).raise_for_status()
    fetched = demo.metric("vllm_lora_resolver_fetched_bytes_total")
    hits = demo.metric("vllm_lora_resolver_resolutions_total", outcome="hit")
    response, ms = demo.complete("sql-expert")
    from_cache = (
        demo.metric("vllm_lora_resolver_fetched_bytes_total") == fetched
        and demo.metric("vllm_lora_resolver_resolutions_total", outcome="hit") == hits + 1
    )
    demo.record(
        "2. after vLLM forgot it (unload), resolved again from the node cache",
        response.status_code == 200 and generated(response) == text and from_cache,
        ms,
        f"HTTP {response.status_code}, same text, no bytes downloaded: {from_cache}",
    )

    upload_folder(s3, BUCKET, f"{PREFIX}/support-bot", adapters["support-bot"])
    demo.say("Uploaded support-bot to the bucket while the server runs")
    response, ms = demo.complete("support-bot")
    demo.record(
        "3. new adapter servable on its next request",
        response.status_code == 200 and generated(response) not in (base, text),
        ms,
        f"HTTP {response.status_code}, {generated(response)!r}",
    )

    response, ms = demo.complete("no-such-adapter")
    demo.record("4a. missing adapter", response.status_code == 404, ms, f"HTTP 404 {response.text}")
    response, ms = demo.complete("too-big")
    ok = response.status_code == 400 and RANK_REASON in response.text
    demo.record("4b. rank above the limit", ok, ms, f"HTTP {response.status_code} {response.text}")

    started = time.perf_counter()
    exposition = demo.server.get("/metrics").text
    ms = (time.perf_counter() - started) * 1000
    lines = [
        line
        for line in exposition.splitlines()
        if line.startswith(SHOWN_METRICS) and not line.endswith(" 0.0")
    ]
    demo.say("Our metrics on vLLM's own /metrics:\n" + "\n".join(f"     {x}" for x in lines))
    fetched_count = demo.metric(
        "vllm_lora_resolver_resolutions_total", backend="s3", outcome="fetched"
    )
    demo.record("5. metrics on /metrics", fetched_count == 2, ms, f"s3 fetched = {fetched_count:g}")

    roll_out(demo, stack, env, adapters["sql-expert-v2"], old=text)


def publish(demo: Demo, env: dict[str, str], name: str, folder: Path | None, *options: str) -> None:
    """``vllm-lora publish [FOLDER] s3://BUCKET/PREFIX/NAME [OPTIONS]``, as a release pipeline
    would run it, with the server's store settings; shows the command and what it did."""
    uri = f"s3://{BUCKET}/{PREFIX}/{name}"
    shown = ["vllm-lora", "publish", *([folder.name] if folder else []), uri, *options]
    command = [VLLM_LORA, *shown[1:2], *([str(folder)] if folder else []), uri, *options]
    done = subprocess.run(
        command, env=os.environ | env, capture_output=True, text=True, check=True, timeout=120
    )
    demo.say(f"$ {' '.join(shown)}\n     {done.stdout.strip().splitlines()[0]}")


class ClientLoop:
    """A client asking for one adapter back to back, recording each answer's status and text."""

    def __init__(self, demo: Demo, model: str) -> None:
        self.demo, self.model = demo, model
        self.answers: list[tuple[int, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            response, _ = self.demo.complete(self.model)
            self.answers.append((response.status_code, generated(response)))

    def seconds_until(self, expected: str, change: Callable[[], None]) -> float:
        """Seconds from the start of ``change()`` to the first answer ``expected`` after it
        (``inf`` past the deadline)."""
        started, seen = time.monotonic(), len(self.answers)
        change()
        while time.monotonic() - started < ROLLOUT_DEADLINE:
            if any(answer == expected for _, answer in self.answers[seen:]):
                return time.monotonic() - started
            time.sleep(0.05)
        return float("inf")

    def stop(self) -> list[tuple[int, str]]:
        self._stop.set()
        self._thread.join(timeout=60)
        return self.answers


def roll_out(demo: Demo, stack: ExitStack, env: dict[str, str], v2: Path, old: str) -> None:
    """A new version published while a client loops on the adapter, switched by `vllm-lora sync`
    beside the server; then rolled back. Every answer is one version's or the other's."""
    assert demo.server is not None
    new_response = demo.server.post(
        "/v1/load_lora_adapter", {"lora_name": "v2-reference", "lora_path": str(v2)}
    )
    new_response.raise_for_status()
    new = generated(demo.complete("v2-reference")[0])  # what v2 says, loaded by vLLM itself
    demo.server.post("/v1/unload_lora_adapter", {"lora_name": "v2-reference"}).raise_for_status()
    demo.say(f"Starting `vllm-lora sync` beside the server (a round every {SYNC_INTERVAL:g} s) ...")
    sync = SyncSidecar(demo.server, os.environ | env, WORK / "sync.log", interval=SYNC_INTERVAL)
    stack.callback(sync.stop)
    sync.wait_for_a_round()
    loop = ClientLoop(demo, "sql-expert")
    try:
        rolled_out = loop.seconds_until(
            new, lambda: publish(demo, env, "sql-expert", v2, "--version", "v2")
        )
        rolled_back = loop.seconds_until(
            old, lambda: publish(demo, env, "sql-expert", None, "--rollback")
        )
        time.sleep(0.5)  # a few more answers after the switch back
    finally:
        answers = loop.stop()
    failed = sum(status != 200 for status, _ in answers)
    mixed = sum(status == 200 and answer not in (old, new) for status, answer in answers)
    clean = f"{len(answers)} answers while it ran: {failed} failed, {mixed} of neither version"
    demo.record(
        "6a. v2 published while a client loops: the sync switched the server",
        rolled_out <= ROLLOUT_DEADLINE and failed == mixed == 0,
        rolled_out * 1000,
        f"v2 served {rolled_out:.1f} s after the publish began; {clean}",
    )
    demo.record(
        "6b. rolled back with `vllm-lora publish --rollback`: v1 served again",
        rolled_back <= ROLLOUT_DEADLINE and failed == mixed == 0,
        rolled_back * 1000,
        f"v1 served {rolled_back:.1f} s after the rollback began",
    )


def summary(demo: Demo) -> None:
    width = max((len(step.title) for step in demo.steps), default=4)
    print(f"\n  {'step':<{width}}      ms  result")
    for step in demo.steps:
        print(f"  {step.title:<{width}}  {step.ms:6.0f}  {'ok' if step.ok else 'FAIL'}")
    passed = sum(step.ok for step in demo.steps)
    print(f"\n  {passed}/{len(demo.steps)} steps behaved as expected.")


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    signal.signal(signal.SIGTERM, _terminate)
    for name in [name for name in os.environ if name.startswith("VLLM_LORA_RESOLVER_")]:
        del os.environ[name]  # the demo's configuration is exactly what it prints
    demo = Demo()
    code = 1
    try:
        with ExitStack() as stack:
            try:
                run(demo, stack)
                code = 0 if demo.steps and all(step.ok for step in demo.steps) else 1
            finally:
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the clean-up finish
                demo.say("Stopping the sync, vLLM and SeaweedFS (up to 20 s) ...")
    except KeyboardInterrupt:
        demo.say("Interrupted; stopped everything the demo started.")
        return 130
    except Exception as error:  # the demo is a check: say what broke, exit non-zero
        demo.say(f"Stopped everything the demo started. It failed: {type(error).__name__}: {error}")
        code = 1
    else:
        demo.say("Stopped everything the demo started.")
    summary(demo)
    return code


if __name__ == "__main__":
    sys.exit(main())
