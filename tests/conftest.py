"""Shared fixtures: an isolated environment, a cache root, adapters and a resolver."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vllm_lora_resolvers.backends.filesystem import FilesystemStore
from vllm_lora_resolvers.cache import PROCESS_DIR_PREFIX, NodeCache, is_locked
from vllm_lora_resolvers.config import Settings
from vllm_lora_resolvers.resolver import Resolver

REPO = Path(__file__).resolve().parents[1]
#: What a test's worker process imports: this checkout's package (a git worktree's too), devtools
#: and the tests' own modules.
WORKER_PYTHONPATH = os.pathsep.join(str(path) for path in (REPO / "src", REPO, REPO / "tests"))
# Every process a test starts (vLLM servers, the command line, workers) runs it too, not the
# checkout the package was installed from.
os.environ["PYTHONPATH"] = WORKER_PYTHONPATH

BASE_MODEL = "/models/tiny-llama"
#: The ``vllm-lora`` command, as installed next to this Python.
CLI = Path(sys.executable).with_name("vllm-lora")


_ISOLATION = {
    "AWS_EC2_METADATA_DISABLED": "true",
    "NO_GCE_CHECK": "True",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads the developer's configuration or reaches beyond loopback."""
    for name in list(os.environ):
        if name.startswith(("VLLM_LORA_RESOLVER_", "AWS_")) or name == "VLLM_PLUGINS":
            monkeypatch.delenv(name)
    for name, value in _ISOLATION.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    path = tmp_path / "cache"
    path.mkdir()
    return path


@pytest.fixture
def adapters_dir(tmp_path: Path) -> Path:
    path = tmp_path / "adapters"
    path.mkdir()
    return path


@pytest.fixture
def make_settings(cache_dir: Path) -> Callable[..., Settings]:
    def make(**variables: str) -> Settings:
        environ = {"VLLM_LORA_RESOLVER_CACHE_DIR": str(cache_dir), **variables}
        return Settings.from_environ(environ, argv=[])

    return make


@pytest.fixture
def fs_resolver(
    adapters_dir: Path, cache_dir: Path, make_settings: Callable[..., Settings]
) -> Iterator[Resolver]:
    yield Resolver(FilesystemStore(adapters_dir, make_settings(), NodeCache(cache_dir)))


def vllm_lora(*arguments: str, **variables: str) -> subprocess.CompletedProcess[str]:
    """Run the installed command with this test's environment plus ``variables``."""
    return subprocess.run(
        [str(CLI), *arguments],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, **variables},
        timeout=120,
    )


def files_of(folder: Path) -> dict[str, str]:
    """The SHA-256 of every file of an adapter folder, by name: compared, two folders that
    differ print a short diff (pytest's diff of megabytes of bytes takes longer than a test may)."""
    return {path.name: sha256_of(path) for path in folder.iterdir()}


def sha256_of(path: Path) -> str:
    """The SHA-256 of a file, in hex."""
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def snapshot_dirs(cache_dir: Path) -> list[Path]:
    """The complete snapshots in a cache."""
    return sorted((cache_dir / ".vllm-lora" / "snapshots").iterdir())


def staging_entries(cache_dir: Path) -> list[Path]:
    """Fetches in progress (or debris of crashed ones) in a cache; the scratch folders of live
    processes (locked by them) are not counted."""
    return sorted(
        entry
        for entry in (cache_dir / ".vllm-lora" / "staging").iterdir()
        if not (entry.name.startswith(PROCESS_DIR_PREFIX) and is_locked(entry))
    )


def run_worker(script: str, *arguments: str) -> subprocess.Popen[str]:
    """Run ``tests/workers/<script>`` as another process on this node, its stdin and stdout
    piped: it prints JSON lines (`worker_result` reads one) and may wait for a line on stdin."""
    command = [sys.executable, str(REPO / "tests" / "workers" / script), *arguments]
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def start_worker(*arguments: str, hold: bool = False) -> subprocess.Popen[str]:
    """Run ``tests/workers/resolve_fs.py`` as another process on this node."""
    return run_worker("resolve_fs.py", *arguments, *(["--hold"] if hold else []))


def worker_result(worker: subprocess.Popen[str]) -> dict[str, Any]:
    """The JSON line a worker printed (waits for it)."""
    assert worker.stdout is not None
    line = worker.stdout.readline()
    assert line, f"worker {worker.args!r} printed nothing (exit {worker.poll()!r})"
    result: dict[str, Any] = json.loads(line)
    return result


from azure_fixtures import azure_container, azurite  # noqa: E402, F401
from gcs_fixtures import fake_gcs, gcs_bucket  # noqa: E402, F401
from s3_fixtures import any_bucket, bucket, moto, seaweed, unconditional_bucket  # noqa: E402, F401
