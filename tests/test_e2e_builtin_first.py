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
    fetched_earlier,
    listed_models,
    module_store,
    pull_elsewhere,
    running_server,
    text,
)

from devtools.models import build_tiny_llama, write_lora_adapter
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
            yield Setup(server, model, cache)


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
