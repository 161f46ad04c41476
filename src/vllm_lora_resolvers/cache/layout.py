"""Where everything is under the cache root (``VLLM_LORA_RESOLVER_CACHE_DIR``)::

NAME -> .vllm-lora/snapshots/KEY/adapter   symlink to the current snapshot of NAME
.vllm-lora/snapshots/KEY/adapter/          immutable adapter files: the path vLLM is handed
.vllm-lora/snapshots/KEY/manifest.json     what the snapshot is: source, name, version, files
.vllm-lora/snapshots/KEY/lease             every process serving KEY holds a shared flock on it
.vllm-lora/staging/KEY.PID.RANDOM/         a fetch in progress (renamed into snapshots/ whole)
.vllm-lora/staging/process.RANDOM/         one live process's scratch space (name links in the
                                           making), locked by that process for its life
.vllm-lora/trash/                          snapshots being deleted
.vllm-lora/quarantine/KEY.RANDOM/          damaged snapshots, set aside for inspection
.vllm-lora/locks/KEY.lock                  one fetcher per KEY across processes
.vllm-lora/answers/DIGEST.json             the last answer to a question processes of this
                                           node share (`node_answer`: a store lookup, say)
.vllm-lora/evictions                       the node's count of evicted snapshots
"""

from __future__ import annotations

from pathlib import Path

STATE_DIR = ".vllm-lora"
MANIFEST = "manifest.json"
LEASE = "lease"
ADAPTER_DIR = "adapter"
PROCESS_DIR_PREFIX = "process."
#: The node's count of evicted snapshots, under `STATE_DIR`.
EVICTIONS = "evictions"


class Layout:
    """The folders of the cache rooted at ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.state = root / STATE_DIR
        self.snapshots = self.state / "snapshots"
        self.staging = self.state / "staging"
        self.trash = self.state / "trash"
        self.locks = self.state / "locks"
        self.quarantine = self.state / "quarantine"
        self.answers = self.state / "answers"

    def make(self) -> None:
        """Create the cache's folders (again, if someone removed them while we ran)."""
        for directory in (
            self.snapshots,
            self.staging,
            self.trash,
            self.locks,
            self.quarantine,
            self.answers,
        ):
            directory.mkdir(parents=True, exist_ok=True)
