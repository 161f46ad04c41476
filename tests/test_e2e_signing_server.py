"""End to end: a real vLLM server with ``VLLM_LORA_RESOLVER_TRUST`` resolving adapters from S3
(SeaweedFS): the one its release key signed is served; an unsigned one, one changed after
signing and one signed by another key get HTTP 400 with the reason, counted apart
(``outcome="untrusted"``). One server for the module, driven over HTTP only."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from e2e_support import Store, complete, error_message, metric, module_store, running_server, text
from signing_support import KeyPair, key_pair, sign_with_key

from devtools.models import build_tiny_llama, write_lora_adapter
from devtools.stores import S3Endpoint
from devtools.vllm_server import VllmServer

pytest.importorskip("vllm")
pytestmark = [pytest.mark.server, pytest.mark.vllm]

WEIGHTS = "adapter_model.safetensors"


@dataclass
class Setup:
    server: VllmServer
    store: Store
    model: Path
    keys: KeyPair
    work: Path

    def adapter(self, name: str, seed: int, keys: KeyPair | None = None) -> Path:
        """An adapter written in a folder named ``name``, signed by ``keys`` if given."""
        folder = write_lora_adapter(
            self.work / "adapters" / str(seed) / name, base_model=str(self.model), seed=seed
        )
        if keys is not None:
            sign_with_key(folder, keys)
        return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, seaweed: S3Endpoint) -> Iterator[Setup]:
    work = tmp_path_factory.mktemp("e2e-signing")
    model = build_tiny_llama(work / "model")
    keys = key_pair(work / "keys")
    with module_store(seaweed, "e2e-signing") as store:
        env = {
            **store.endpoint.env(),
            "VLLM_PLUGINS": "lora_s3_resolver,lora_filesystem_resolver",
            "VLLM_LORA_RESOLVER_CACHE_DIR": str(work / "cache"),
            "VLLM_LORA_RESOLVER_S3_URI": store.uri,
            "VLLM_LORA_RESOLVER_TRUST": keys.trust,
        }
        with running_server(model, work / "server", env) as server:
            yield Setup(server, store, model, keys, work)


def test_the_signed_adapter_is_served(setup: Setup) -> None:
    setup.store.upload("sql", setup.adapter("sql", seed=1, keys=setup.keys))
    assert text(setup.server, "sql") != text(setup.server, str(setup.model))


def test_what_its_release_key_did_not_sign_gets_400_with_the_reason(setup: Setup) -> None:
    tampered = setup.adapter("tampered", seed=2, keys=setup.keys)
    weights = bytearray((tampered / WEIGHTS).read_bytes())
    weights[-1] ^= 1
    (tampered / WEIGHTS).write_bytes(bytes(weights))
    cases = {
        "unsigned": (setup.adapter("unsigned", seed=3), "adapter 'unsigned' is not signed"),
        "tampered": (tampered, f"adapter 'tampered': {WEIGHTS} changed after it was signed"),
        "stranger": (
            setup.adapter("stranger", seed=4, keys=key_pair(setup.work / "mallory", "mallory")),
            "adapter 'stranger': it is not signed by a signer this server trusts",
        ),
    }
    before = metric(setup.server, "vllm_lora_resolver_resolutions_total", outcome="untrusted")
    for name, (folder, reason) in cases.items():
        setup.store.upload(name, folder)
        response = complete(setup.server, name)
        assert response.status_code == 400, response.text
        assert reason in error_message(response)
        assert setup.store.bucket not in error_message(response)
    after = metric(setup.server, "vllm_lora_resolver_resolutions_total", outcome="untrusted")
    assert after - before == len(cases)
    assert metric(setup.server, "vllm_lora_resolver_resolutions_total", outcome="invalid") == 0
