"""Smoke test of devtools: a tiny local Llama served by vLLM with a static LoRA adapter."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from devtools.models import build_tiny_llama, write_lora_adapter
from devtools.vllm_server import VllmServer

pytestmark = pytest.mark.server

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    tmp = tmp_path_factory.mktemp("devtools-smoke")
    model = build_tiny_llama(tmp / "model")
    adapter1 = write_lora_adapter(tmp / "a1", base_model=str(model), seed=1)
    adapter2 = write_lora_adapter(tmp / "a2", base_model=str(model), seed=2)
    with VllmServer(
        model,
        workdir=tmp / "server",
        extra_args=[
            "--served-model-name",
            "base",
            "--lora-modules",
            f"a1={adapter1}",
            f"a2={adapter2}",
        ],
        extra_env={"VLLM_PLUGINS": ""},
    ) as running:
        yield running


def _text(server: VllmServer, model: str) -> str:
    response = server.completions(model, PROMPT, max_tokens=8)
    assert response.status_code == 200, response.text
    text: str = response.json()["choices"][0]["text"]
    return text


def test_base_model_generates(server: VllmServer) -> None:
    assert _text(server, "base")


def test_static_lora_changes_greedy_output(server: VllmServer) -> None:
    base = _text(server, "base")
    a1 = _text(server, "a1")
    a2 = _text(server, "a2")
    assert a1 != base
    assert a2 != base
    assert a1 != a2
    assert _text(server, "a1") == a1  # temperature 0 is deterministic


def test_unknown_model_is_404(server: VllmServer) -> None:
    assert server.completions("nope", PROMPT).status_code == 404
