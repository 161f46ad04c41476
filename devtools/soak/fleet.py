"""The soak's worker processes: start, kill -9 (chaos), replace, and wait for them all."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Slot:
    """One server of the fleet; a chaos kill replaces its process with a new incarnation."""

    index: int
    quota: int
    outputs: list[Path] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None
    finished: bool = False


def resolutions_in(path: Path) -> int:
    """Resolutions recorded in one worker output."""
    try:
        return path.read_bytes().count(b'"event": "resolve"')
    except FileNotFoundError:
        return 0


class Fleet:
    """``processes`` workers sharing ``requests`` resolutions, each a Python process of its own."""

    def __init__(
        self, work: Path, plan_path: Path, env: dict[str, str], processes: int, requests: int
    ) -> None:
        self.work = work
        self.plan_path = plan_path
        self.env = env
        self._guard = threading.Lock()
        share, extra = divmod(requests, processes)
        self.slots = [Slot(i, share + (i < extra)) for i in range(processes)]
        self.kills = 0
        self.last_kill = 0.0
        self.crashes: list[str] = []

    def start(self) -> None:
        """Start every worker."""
        with self._guard:
            for slot in self.slots:
                self._spawn(slot)

    def _spawn(self, slot: Slot) -> None:
        done = sum(resolutions_in(path) for path in slot.outputs)
        remaining = max(0, slot.quota - done)
        out = self.work / f"worker-{slot.index:02d}-{len(slot.outputs)}.jsonl"
        slot.outputs.append(out)
        log = (self.work / f"{out.stem}.log").open("wb")
        command = [sys.executable, "-m", "devtools.soak.worker"]
        arguments = [str(self.plan_path), str(slot.index), str(remaining), str(out)]
        slot.process = subprocess.Popen(
            [*command, *arguments], env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()

    def kill_one(self, rng: random.Random, min_resolutions: int = 5) -> bool:
        """kill -9 a random busy worker and start its replacement; whether one was killed."""
        with self._guard:
            busy = [
                slot
                for slot in self.slots
                if slot.process is not None
                and slot.process.poll() is None
                and resolutions_in(slot.outputs[-1]) >= min_resolutions
            ]
            if not busy:
                return False
            slot = rng.choice(busy)
            assert slot.process is not None
            os.kill(slot.process.pid, signal.SIGKILL)
            slot.process.wait()
            self.kills += 1
            self.last_kill = time.monotonic()
            self._spawn(slot)
            return True

    def steady(self, settle: float = 5.0) -> bool:
        """Whether every worker is running and none was killed in the last ``settle`` seconds
        (a dead process's leases are released at once, but evicted only at the next fetch)."""
        with self._guard:
            running = all(s.process is not None and s.process.poll() is None for s in self.slots)
            return running and time.monotonic() - self.last_kill > settle

    def poll(self) -> bool:
        """Note finished workers (an unexpected exit is a crash); whether all are finished."""
        with self._guard:
            for slot in self.slots:
                if slot.finished or slot.process is None:
                    continue
                code = slot.process.poll()
                if code is None:
                    continue
                slot.finished = True
                if code != 0:
                    self.crashes.append(f"worker {slot.index} exited with {code}")
            return all(slot.finished for slot in self.slots)

    def wait(self, deadline: float) -> None:
        """Wait for every worker; past ``deadline`` the rest are killed and count as crashes."""
        while not self.poll():
            if time.time() > deadline:
                with self._guard:
                    for slot in self.slots:
                        if slot.process is not None and slot.process.poll() is None:
                            slot.process.kill()
                            slot.process.wait()
                            self.crashes.append(f"worker {slot.index} overran and was killed")
                        slot.finished = True
                return
            time.sleep(0.2)

    def outputs(self) -> list[Path]:
        """Every worker output, of every incarnation."""
        return [path for slot in self.slots for path in slot.outputs]
