"""One soak worker: a process that loads our plugins exactly as vLLM's API server does and
resolves a Zipf-distributed stream of names through ``LoRAResolverRegistry``.

Run by the driver as ``python -m devtools.soak.worker PLAN.json SLOT REQUESTS OUT.jsonl``. Every
resolution is appended to ``OUT.jsonl`` as it ends (so a worker killed with ``-9`` leaves its
record). Each path handed out is checked against the version table (the bytes must be those of
the version its manifest claims) and remembered; random earlier paths are re-read later, as vLLM's
engine re-reads an adapter after its own LRU evicted it, and must be unchanged.

The worker keeps vLLM's rules for a name (``OpenAIServingModels``): one resolution of a name at a
time, and a name is asked about again only after vLLM dropped it (an unload), so the path it
resolved to before is no longer held and may be evicted once no one else leases it.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import json
import random
import sys
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from devtools.soak.corpus import file_digest, load_versions

#: How long a version missing from the table is waited for (the driver records an update just
#: after uploading it, so a worker may see it first).
_UNKNOWN_VERSION_WAIT = 20.0


@dataclass(frozen=True)
class Handed:
    """A path a resolver handed out, and the digests its files must keep."""

    path: str
    name: str
    version: str
    digests: dict[str, str]


class NameStream:
    """Names as clients send them: Zipf over the corpus, plus absent and hostile names."""

    def __init__(self, plan: dict[str, Any], rng: random.Random) -> None:
        self.rng = rng
        self.ranked: list[str] = plan["ranked"]
        self.absent: list[str] = plan["absent"]
        self.hostile: list[str] = plan["hostile"]
        self.absent_share: float = plan["absent_share"]
        self.hostile_share: float = plan["hostile_share"]
        weights = [1.0 / (rank + 1) ** plan["zipf_s"] for rank in range(len(self.ranked))]
        self.cumulative = list(itertools.accumulate(weights))

    def next(self) -> tuple[str, str]:
        """``(class, name)``: class is ``corpus``, ``absent`` or ``hostile``."""
        draw = self.rng.random()
        if draw < self.hostile_share:
            return "hostile", self.rng.choice(self.hostile)
        if draw < self.hostile_share + self.absent_share:
            return "absent", self.rng.choice(self.absent)
        point = self.rng.random() * self.cumulative[-1]
        return "corpus", self.ranked[bisect.bisect_left(self.cumulative, point)]


class Worker:
    """Resolves names with a few in flight, checks every answer, records everything."""

    def __init__(self, plan: dict[str, Any], slot: int, out: IO[str]) -> None:
        self.plan = plan
        self.rng = random.Random(f"{plan['seed']}-{slot}-{time.time_ns()}")
        self.names = NameStream(plan, self.rng)
        self.table_path = Path(plan["table"])
        self.versions = load_versions(self.table_path)
        self.kinds: dict[str, str] = plan["kinds"]
        self.out = out
        self.handed: dict[str, Handed] = {}  # by name: the path vLLM holds for it
        self.name_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    def emit(self, record: dict[str, Any]) -> None:
        """Append one record to the output, flushed at once."""
        self.out.write(json.dumps(record) + "\n")
        self.out.flush()

    async def run(self, requests: int, deadline: float) -> None:
        """Issue ``requests`` resolutions (or until ``deadline``), ``in_flight`` at a time."""
        from vllm.lora.resolver import LoRAResolverRegistry
        from vllm.plugins import load_general_plugins

        load_general_plugins()  # type: ignore[no-untyped-call]
        resolvers = [
            LoRAResolverRegistry.get_resolver(name)
            for name in LoRAResolverRegistry.get_supported_resolvers()
        ]
        self.emit({"event": "ready", "resolvers": len(resolvers)})
        counter = itertools.count()

        async def loop() -> None:
            while next(counter) < requests and time.time() < deadline:
                await self.one(resolvers)
                if self.handed and self.rng.random() < self.plan["reread_share"]:
                    await self.reread(self.rng.choice(list(self.handed)))

        await asyncio.gather(*(loop() for _ in range(self.plan["in_flight"])))

    async def one(self, resolvers: list[Any]) -> None:
        """Resolve one name as vLLM's ``OpenAIServingModels`` does, check and record it."""
        kind, name = self.names.next()
        async with self.name_locks[name]:
            self.handed.pop(name, None)  # vLLM unloaded it before asking again
            await self.resolve_and_check(resolvers, kind, name)

    async def resolve_and_check(self, resolvers: list[Any], kind: str, name: str) -> None:
        """Resolve ``name`` through the resolvers in order, check the answer and record it."""
        started_wall, started = time.time(), time.perf_counter()
        record: dict[str, Any] = {"event": "resolve", "class": kind, "name": name}
        path: str | None = None
        try:
            for resolver in resolvers:
                request = await resolver.resolve_lora(self.plan["base_model"], name)
                if request is not None:
                    path = str(request.lora_path)
                    break
            record["answer"] = "none" if path is None else "path"
        except ValueError as error:
            record.update(answer="invalid", error=str(error)[:300])
        except Exception as error:  # every failure is recorded and judged
            record.update(answer="error", error_type=type(error).__name__, error=describe(error))
        record["seconds"] = time.perf_counter() - started
        if path is not None:
            record.update(await asyncio.to_thread(self.check_answer, name, path, started_wall))
        record["problem"] = record.get("problem") or self.judge(kind, name, record["answer"])
        self.emit(record)

    def judge(self, kind: str, name: str, answer: str) -> str | None:
        """What is wrong with an answer of the right shape, or ``None``."""
        expected = self.kinds.get(name, "absent") if kind == "corpus" else kind
        if answer == "error":
            return None  # judged by the report: store errors allowed, others not
        if expected == "valid":
            return None if answer == "path" else f"valid adapter answered {answer}"
        if expected in ("rank_too_high", "broken_weights"):
            return None if answer == "invalid" else f"invalid adapter answered {answer}"
        return None if answer == "none" else f"{expected} name answered {answer}"

    def check_answer(self, name: str, path: str, started_wall: float) -> dict[str, Any]:
        """Check a returned path against the version its manifest claims; remember it."""
        manifest = json.loads((Path(path).parent / "manifest.json").read_text())
        fetched = manifest["created_at"] >= started_wall
        result: dict[str, Any] = {"version": manifest["version"], "fetched": fetched}
        if manifest["name"] != name:
            return {**result, "problem": f"wrong answer: {path} is {manifest['name']!r}"}
        expected = self.expected_digests(name, manifest["version"])
        if expected is None:
            return {**result, "problem": f"wrong answer: unknown version {manifest['version']}"}
        found = {file.name: file_digest(file) for file in Path(path).iterdir()}
        if found != expected:
            return {**result, "problem": f"wrong answer: bytes of {path} differ from its version"}
        self.handed[name] = Handed(path, name, manifest["version"], expected)
        return result

    def expected_digests(self, name: str, version: str) -> dict[str, str] | None:
        """sha256 of each file of ``version`` of ``name``, waiting briefly for the table."""
        deadline = time.monotonic() + _UNKNOWN_VERSION_WAIT
        while version not in self.versions.get(name, {}):
            if time.monotonic() > deadline:
                return None
            time.sleep(0.2)
            self.versions = load_versions(self.table_path)
        return {file: str(entry[0]) for file, entry in self.versions[name][version].items()}

    async def reread(self, name: str) -> None:
        """Re-read the path vLLM holds for ``name``: it must still exist with the same bytes."""
        async with self.name_locks[name]:
            handed = self.handed.get(name)
            if handed is not None:
                await asyncio.to_thread(self.reread_path, handed)

    def reread_path(self, handed: Handed) -> None:
        """Read every file of ``handed`` again and record whether it vanished or changed."""
        path = handed.path
        try:
            found = {file.name: file_digest(file) for file in Path(path).iterdir()}
        except OSError as error:
            found, reason = {}, f"vanished: {error.strerror}"
        else:
            reason = "changed"
        ok = found == handed.digests
        self.emit({"event": "reread", "path": path, "problem": None if ok else reason})


def describe(error: BaseException) -> str:
    """The error's message, and where it was raised (a bare ``assert`` has no message)."""
    frame = traceback.extract_tb(error.__traceback__)[-1]
    where = f"{Path(frame.filename).name}:{frame.lineno}"
    return f"{str(error)[:300] or type(error).__name__} (raised at {where})"


def main() -> None:
    """``python -m devtools.soak.worker PLAN.json SLOT REQUESTS OUT.jsonl``."""
    plan_path, slot, requests, out_path = sys.argv[1:5]
    plan = json.loads(Path(plan_path).read_text())
    with Path(out_path).open("a") as out:
        worker = Worker(plan, int(slot), out)
        asyncio.run(worker.run(int(requests), plan["deadline"]))
        worker.emit({"event": "done"})


if __name__ == "__main__":
    main()
