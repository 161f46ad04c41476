"""Hub fixtures: a local Hub-compatible server per test, reached through a fault relay.

``HF_ENDPOINT`` points at the relay (loopback only); huggingface_hub's import-time settings that
would let a test reach elsewhere or use a developer's login are pinned for the test.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from huggingface_hub import constants
from resolver_setup import FAST_TRANSFER, Relayed

from devtools.hub_server import HubServer
from devtools.relay import FaultRelay
from vllm_lora_resolvers import stores
from vllm_lora_resolvers.backends.hf_hub import HfHubStore
from vllm_lora_resolvers.cache import NodeCache
from vllm_lora_resolvers.config import Settings
from vllm_lora_resolvers.resolver import Resolver
from vllm_lora_resolvers.transfer import TransferConfig

REPO_ID = "org/adapters"


@dataclass
class Hub(Relayed):
    """A local Hub (``server``: push, tag, make private or gated) behind ``relay``."""

    server: HubServer
    relay: FaultRelay

    def resolver(
        self,
        cache_dir: Path,
        repos: str = REPO_ID,
        transfer: TransferConfig = FAST_TRANSFER,
        **variables: str,
    ) -> Resolver:
        """A resolver of ``repos`` (a comma list) with a node cache in ``cache_dir``."""
        environ = {
            "VLLM_LORA_RESOLVER_CACHE_DIR": str(cache_dir),
            "VLLM_LORA_RESOLVER_HF_REPO_LIST": repos,
            **variables,
        }
        settings = Settings.from_environ(environ, argv=[])
        cache = NodeCache(cache_dir, settings.cache_max_bytes)
        return Resolver(HfHubStore(stores.HF.source(settings), settings, cache, transfer))


@pytest.fixture(name="hub")
def hub_fixture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Hub]:
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    # Read by huggingface_hub at import: offline mode (conftest sets it for every other test)
    # and the stored login, which must not stand in for "no token".
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
    with HubServer(tmp_path / "hub") as server, FaultRelay(server.port) as relay:
        monkeypatch.setenv("HF_ENDPOINT", relay.url)
        yield Hub(server, relay)
