"""End to end: ``VLLM_PLUGINS`` lists vLLM's built-in filesystem resolver first, then ours
(folder before bucket); the server tries them in exactly that order.

The opposite order (bucket, folder, built-in) is covered by ``test_e2e_s3_server.py``. One server.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from e2e_support import (
    Store,
    complete,
    error_message,
    fetched_earlier,
    listed_models,
    module_store,
    pull_elsewhere,
    running_server,
    text,
)

from devtools.models import build_tiny_llama, write_lora_adapter, write_peft_adapter
from devtools.stores import S3Endpoint
from devtools.vllm_server import VllmServer

pytest.importorskip("vllm")
pytestmark = [pytest.mark.server, pytest.mark.vllm]

PLUGINS = "lora_filesystem_resolver,lora_fs_resolver,lora_s3_resolver"
IN_CACHE, IN_FOLDER, IN_BUCKET = 61, 62, 63  # seeds: different weights in each source


@dataclass
class Setup:
    server: VllmServer
    model: Path
    cache: Path
    fs_dir: Path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, seaweed: S3Endpoint) -> Iterator[Setup]:
    work = tmp_path_factory.mktemp("e2e-builtin-first")
    model = build_tiny_llama(work / "model")
    cache, fs_dir = work / "cache", work / "fs"
    with module_store(seaweed, "e2e-builtin-first") as store:
        _place(store, model, cache, fs_dir)
        env = {
            **store.endpoint.env(),
            "VLLM_PLUGINS": PLUGINS,
            "VLLM_LORA_RESOLVER_CACHE_DIR": str(cache),
            "VLLM_LORA_RESOLVER_S3_URI": store.uri,
            "VLLM_LORA_RESOLVER_FS_DIR": str(fs_dir),
        }
        with running_server(model, work / "server", env) as server:
            yield Setup(server, model, cache, fs_dir)


def _place(store: Store, model: Path, cache: Path, fs_dir: Path) -> None:
    """``three`` in all three sources, ``two`` in the folder and the bucket, and each seed's
    weights once more under a name found in one source only (``ref-SEED``). The cache holds
    snapshots an earlier pod of the same bucket fetched (the built-in resolver serves nothing
    else): ``three`` at the version before the bucket's current one. ``elsewhere`` is a snapshot
    another store's pod left on this node: never served here."""

    def write(folder: Path, seed: int) -> Path:
        return write_lora_adapter(folder, base_model=str(model), seed=seed)

    upload = model.parent / "upload"
    store.upload("three", write(upload / "three-before", IN_CACHE))
    pull_elsewhere(store, cache, "three", model)
    store.upload(f"ref-{IN_CACHE}", write(upload / "ref-before", IN_CACHE))
    pull_elsewhere(store, cache, f"ref-{IN_CACHE}", model)
    fetched_earlier(cache, write(model.parent / "other-store" / "elsewhere", IN_CACHE), model)
    write(fs_dir / "three", IN_FOLDER)
    store.upload("three", write(upload / "three", IN_BUCKET))
    write(fs_dir / "two", IN_FOLDER)
    store.upload("two", write(upload / "two", IN_BUCKET))
    write(fs_dir / f"ref-{IN_FOLDER}", IN_FOLDER)
    store.upload(f"ref-{IN_BUCKET}", write(upload / "ref", IN_BUCKET))


def test_resolvers_are_tried_in_vllm_plugins_order_builtin_first(setup: Setup) -> None:
    references = {seed: text(setup.server, f"ref-{seed}") for seed in (IN_CACHE, IN_FOLDER)}
    references[IN_BUCKET] = text(setup.server, f"ref-{IN_BUCKET}")  # after two Nones
    assert len(set(references.values())) == 3, references  # the weights tell sources apart
    assert text(setup.server, "three") == references[IN_CACHE]  # the built-in, listed first
    assert text(setup.server, "two") == references[IN_FOLDER]  # lora_fs_resolver before S3
    models = listed_models(setup.server)
    assert Path(str(models["three"]["root"])) == (setup.cache / "three").resolve()
    assert "/.vllm-lora/snapshots/" in str(models["two"]["root"])
    assert "/.vllm-lora/snapshots/" in str(models[f"ref-{IN_BUCKET}"]["root"])


def test_another_stores_snapshot_in_the_node_cache_is_never_served(setup: Setup) -> None:
    assert (setup.cache / "elsewhere").is_symlink()  # linked by a pod of another store
    response = setup.server.completions("elsewhere", "Hello")
    assert response.status_code == 404, response.text


QV = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
#: Saved by the real PEFT library, with random A and B (PEFT's default B = 0 would change nothing).
PEFT_SERVED = {
    "peft-qv": QV,
    "peft-all-linear": {"r": 8, "lora_alpha": 8, "target_modules": "all-linear"},
    "peft-patterns": {**QV, "rank_pattern": {"q_proj": 4}, "alpha_pattern": {"v_proj": 32}},
    "peft-rslora": {**QV, "use_rslora": True},
}
PEFT_REFUSED = {
    "peft-dora": ({**QV, "use_dora": True}, "DoRA"),
    "peft-trainable-tokens": ({**QV, "trainable_token_indices": [1, 2, 3]}, "trainable"),
}


def test_peft_adapters_vllm_loads_are_served_identically_and_the_rest_get_our_reason(
    setup: Setup,
) -> None:
    base = text(setup.server, str(setup.model))
    formats = {"peft-qv": (True, False)}  # safetensors and .bin
    for name, config in PEFT_SERVED.items():
        for safe in formats.get(name, (True,)):
            served_as = name if safe else f"{name}-bin"
            folder = write_peft_adapter(
                setup.fs_dir / served_as,
                setup.model,
                {**config, "init_lora_weights": False},
                safe_serialization=safe,
            )
            static = setup.server.post(
                "/v1/load_lora_adapter",
                {"lora_name": f"static-{served_as}", "lora_path": str(folder)},
            )
            assert static.status_code == 200, static.text  # vLLM's own loader takes it
            ours = text(setup.server, served_as)  # resolved by lora_fs_resolver
            assert ours == text(setup.server, f"static-{served_as}"), served_as
            assert ours != base, served_as
    for name, (config, reason) in PEFT_REFUSED.items():
        folder = write_peft_adapter(
            setup.fs_dir / name, setup.model, {**config, "init_lora_weights": False}
        )
        static = setup.server.post(
            "/v1/load_lora_adapter", {"lora_name": f"static-{name}", "lora_path": str(folder)}
        )
        assert static.status_code != 200, name  # vLLM's own loader refuses it...
        response = complete(setup.server, name)
        assert response.status_code == 400, response.text
        assert reason in error_message(response), response.text  # ...and we say why
