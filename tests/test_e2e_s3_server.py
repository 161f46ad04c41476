"""End to end: a real vLLM server resolving adapters from S3 (SeaweedFS) and a folder.

One server for the whole module, started with ``VLLM_PLUGINS`` =
``lora_s3_resolver,lora_fs_resolver,lora_filesystem_resolver`` (ours first, vLLM's built-in
filesystem resolver last, over our cache directory), ``--max-loras 1 --max-cpu-loras 1`` (so the
engine evicts an adapter whenever another one is used, and re-reads it from its path later) and a
cache cap of about two adapters (so every fetch by the server evicts what no live process leases).
The opposite order is covered by ``test_e2e_builtin_first.py``. Tests run in file order and later
ones rely on the server having survived earlier ones; the last one (an expected failure
that documents a bug) kills it.
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
    metric,
    module_store,
    pull_elsewhere,
    running_server,
    text,
)

from devtools.models import build_tiny_llama, write_lora_adapter
from devtools.stores import S3Endpoint
from devtools.vllm_server import VllmServer
from vllm_lora_resolvers.adapter import AdapterPolicy, check_adapter_folder
from vllm_lora_resolvers.errors import InvalidAdapterError

pytest.importorskip("vllm")
pytestmark = [pytest.mark.server, pytest.mark.vllm]

PLUGINS = "lora_s3_resolver,lora_fs_resolver,lora_filesystem_resolver"
ADAPTER_BYTES = 30_000  # about one rank-8 q/v adapter of the tiny Llama, config included
CACHE_CAP = 2 * ADAPTER_BYTES + 20_000


@dataclass
class Setup:
    server: VllmServer
    store: Store
    model: Path
    cache: Path
    fs_dir: Path
    work: Path

    def adapter(self, name: str, seed: int, **options: object) -> Path:
        """Write an adapter for this server's model into the work folder (not served yet)."""
        folder = self.work / "adapters" / f"{name}-{seed}"
        options.setdefault("base_model", str(self.model))
        return write_lora_adapter(folder, seed=seed, **options)  # type: ignore[arg-type]

    def upload(self, name: str, seed: int, **options: object) -> Path:
        folder = self.adapter(name, seed, **options)
        self.store.upload(name, folder)
        return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, seaweed: S3Endpoint) -> Iterator[Setup]:
    work = tmp_path_factory.mktemp("e2e-s3")
    model = build_tiny_llama(work / "model")
    cache, fs_dir = work / "cache", work / "fs"
    cache.mkdir()
    fs_dir.mkdir()
    with module_store(seaweed, "e2e-main") as store:
        env = {
            **store.endpoint.env(),
            "VLLM_PLUGINS": PLUGINS,
            "VLLM_LORA_RESOLVER_CACHE_DIR": str(cache),
            "VLLM_LORA_RESOLVER_S3_URI": store.uri,
            "VLLM_LORA_RESOLVER_FS_DIR": str(fs_dir),
            "VLLM_LORA_RESOLVER_CACHE_MAX_BYTES": str(CACHE_CAP),
            "VLLM_LORA_RESOLVER_NEGATIVE_TTL": "120",
        }
        args = ["--max-loras", "1", "--max-cpu-loras", "1"]
        with running_server(model, work / "server", env, args) as server:
            yield Setup(server, store, model, cache, fs_dir, work)


def test_adapter_in_the_bucket_is_served_and_then_listed(setup: Setup) -> None:
    setup.upload("sql", seed=1)
    base = text(setup.server, str(setup.model))
    adapted = text(setup.server, "sql")
    assert adapted != base
    assert text(setup.server, "sql") == adapted
    card = listed_models(setup.server)["sql"]
    assert card["parent"] == str(setup.model)
    snapshots = setup.cache / ".vllm-lora" / "snapshots"
    assert Path(str(card["root"])).parent.parent == snapshots


def test_adapter_in_the_fs_dir_is_served_and_then_listed(setup: Setup) -> None:
    write_lora_adapter(setup.fs_dir / "poet", base_model=str(setup.model), seed=2)
    adapted = text(setup.server, "poet")
    assert adapted != text(setup.server, str(setup.model))
    card = listed_models(setup.server)["poet"]
    assert "/.vllm-lora/snapshots/" in str(card["root"])  # a snapshot, not the folder itself


def test_resolvers_are_tried_in_vllm_plugins_order_ours_before_the_builtin(setup: Setup) -> None:
    # One name in three sources, each with different weights; references under unique names.
    # In the cache: snapshots a pod of another store left on this node (linked by name).
    elsewhere = setup.work / "elsewhere"
    for name in ("three", "other-store", "two"):
        folder = write_lora_adapter(elsewhere / name, base_model=str(setup.model), seed=11)
        fetched_earlier(setup.cache, folder, setup.model)
    write_lora_adapter(setup.fs_dir / "three", base_model=str(setup.model), seed=12)
    setup.upload("three", seed=13)
    write_lora_adapter(setup.fs_dir / "ref-12", base_model=str(setup.model), seed=12)
    setup.upload("ref-13", seed=13)
    write_lora_adapter(setup.fs_dir / "two", base_model=str(setup.model), seed=12)
    references = {seed: text(setup.server, f"ref-{seed}") for seed in (12, 13)}
    assert len(set(references.values())) == 2, references  # the weights tell sources apart

    assert text(setup.server, "three") == references[13]  # lora_s3_resolver, listed first
    assert text(setup.server, "two") == references[12]  # lora_fs_resolver before the built-in
    # other-store is only another store's snapshot in the shared cache: nobody serves it here.
    assert setup.server.completions("other-store", "Hello").status_code == 404


def _expected_reason(setup: Setup, name: str, folder: Path) -> str:
    """Our own check's message for ``folder``, as vLLM shows it to a client."""
    from e2e_support import client_sees

    policy = AdapterPolicy(base_model=str(setup.model), max_rank=16)
    with pytest.raises(InvalidAdapterError) as raised:
        check_adapter_folder(name, folder, policy)
    return client_sees(str(raised.value))


@pytest.mark.parametrize(
    ("name", "options", "gist"),
    [
        ("rank-too-high", {"rank": 32}, "rank 32 is above this server's limit of 16"),
        ("other-base", {"base_model": "meta-llama/Llama-3.1-8B"}, "'meta-llama/Llama-3.1-8B'"),
        ("dora", {"extra_config": {"use_dora": True}}, "use_dora=true (DoRA) is not supported"),
        ("truncated", {}, "weights file adapter_model.safetensors is malformed"),
    ],
    ids=["rank", "base-model", "dora", "truncated-weights"],
)
def test_invalid_adapter_gets_400_saying_exactly_why(
    setup: Setup, name: str, options: dict[str, object], gist: str
) -> None:
    folder = setup.adapter(name, seed=3, **options)
    if name == "truncated":
        weights = folder / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    setup.store.upload(name, folder)
    response = complete(setup.server, name)
    assert response.status_code == 400, response.text
    message = error_message(response)
    assert message == _expected_reason(setup, name, folder)
    assert gist in message
    assert "could not be loaded" not in message  # not vLLM's generic answer


HOSTILE_NAMES = [
    "../x",
    "%2e%2e/x",
    "..",
    "x/../../y",
    "/etc/passwd",
    "/x/adapter",
    "x\\..\\y",
    "a" * 300,
    "sql\x00",
]


def test_hostile_names_get_404_without_a_store_call(setup: Setup) -> None:
    before = len(setup.store.relay.requests)
    rejected = metric(setup.server, "vllm_lora_resolver_resolutions_total", outcome="rejected")
    for name in HOSTILE_NAMES:
        response = complete(setup.server, name)
        assert response.status_code == 404, (name, response.text)
        assert response.json()["error"]["type"] == "NotFoundError"
    assert len(setup.store.relay.requests) == before  # refused before asking the bucket
    now = metric(setup.server, "vllm_lora_resolver_resolutions_total", outcome="rejected")
    assert now - rejected == 2 * len(HOSTILE_NAMES)  # by both of our resolvers


def test_server_is_alive_after_invalid_and_hostile_requests(setup: Setup) -> None:
    assert setup.server.get("/health").status_code == 200
    setup.upload("after-all-that", seed=4)
    assert text(setup.server, "after-all-that")


def test_hostile_name_does_not_escape_through_the_builtin_resolver(setup: Setup) -> None:
    write_lora_adapter(setup.fs_dir / "escapee", base_model=str(setup.model), seed=5)
    assert complete(setup.server, "../fs/escapee").status_code == 404


def test_engine_lru_rereads_the_snapshot_it_was_given(setup: Setup) -> None:
    setup.upload("lru-a", seed=21)
    setup.upload("lru-b", seed=22)
    first_a = text(setup.server, "lru-a")
    setup.upload("lru-a", seed=23)  # changed in the bucket while the server serves it
    first_b = text(setup.server, "lru-b")  # --max-cpu-loras 1: the engine drops lru-a
    setup.store.delete("lru-b")  # gone from the bucket while the server serves it
    assert text(setup.server, "lru-a") == first_a  # re-read from its snapshot, unchanged
    assert text(setup.server, "lru-b") == first_b  # re-read although deleted upstream
    assert text(setup.server, "lru-a") == first_a
    assert setup.server.get("/health").status_code == 200


def test_unloaded_adapter_updated_in_the_bucket_is_served_new(setup: Setup) -> None:
    setup.upload("evolving", seed=31)
    setup.upload("ref-32", seed=32)
    old = text(setup.server, "evolving")
    unload = setup.server.post("/v1/unload_lora_adapter", {"lora_name": "evolving"})
    assert unload.status_code == 200, unload.text
    setup.upload("evolving", seed=32)
    new = text(setup.server, "evolving")
    assert new != old
    assert new == text(setup.server, "ref-32")


def test_churn_with_evictions_never_loses_a_path_handed_to_the_engine(setup: Setup) -> None:
    served: dict[str, str] = {}
    for seed, name in enumerate(("churn-1", "churn-2", "churn-3"), start=41):
        setup.upload(name, seed=seed)
    evictions = metric(setup.server, "vllm_lora_resolver_evictions_total")
    # Other processes on the node fetch churn-1 and churn-2, then exit: nobody leases them.
    pull_elsewhere(setup.store, setup.cache, "churn-1", setup.model)
    pull_elsewhere(setup.store, setup.cache, "churn-2", setup.model)
    served["churn-3"] = text(setup.server, "churn-3")  # this fetch evicts both
    assert not (setup.cache / "churn-1").exists()
    served["churn-1"] = text(setup.server, "churn-1")  # fetched again
    # A new churn-1 is uploaded and fetched by another process; churn-3 leaves the bucket.
    setup.upload("churn-1", seed=44)
    pull_elsewhere(setup.store, setup.cache, "churn-1", setup.model)
    setup.store.delete("churn-3")
    served["churn-2"] = text(setup.server, "churn-2")  # fetched again; evicts the new churn-1
    for name in ("churn-3", "churn-1", "churn-2", "churn-3"):
        assert text(setup.server, name) == served[name], name
    assert metric(setup.server, "vllm_lora_resolver_evictions_total") - evictions >= 3
    for name, card in listed_models(setup.server).items():  # earlier tests' adapters too
        assert Path(str(card["root"])).is_dir(), name
        if name != str(setup.model):
            assert complete(setup.server, name).status_code == 200, name
    assert setup.server.get("/health").status_code == 200


def test_our_metrics_are_on_the_servers_own_metrics_endpoint(setup: Setup) -> None:
    resolutions = "vllm_lora_resolver_resolutions_total"
    fetched = metric(setup.server, resolutions, backend="s3", outcome="fetched")
    fetched_bytes = metric(setup.server, "vllm_lora_resolver_fetched_bytes_total", backend="s3")
    folder = setup.upload("metered", seed=6)
    text(setup.server, "metered")
    assert metric(setup.server, resolutions, backend="s3", outcome="fetched") == fetched + 1
    size = sum(file.stat().st_size for file in folder.iterdir())
    assert metric(
        setup.server, "vllm_lora_resolver_fetched_bytes_total", backend="s3"
    ) == pytest.approx(fetched_bytes + size)
    assert metric(setup.server, "vllm_lora_resolver_resolve_seconds_count", backend="s3") > 0


def test_adapter_another_process_fetched_during_a_remembered_miss_survives_eviction(
    setup: Setup,
) -> None:
    """Runs last: when it fails, the engine is dead."""
    assert complete(setup.server, "late").status_code == 404  # the miss is remembered
    setup.upload("late", seed=51)
    pull_elsewhere(setup.store, setup.cache, "late", setup.model)  # another pod on this node
    first = text(setup.server, "late")
    setup.upload("trigger", seed=52)
    text(setup.server, "trigger")  # a fetch, so an eviction; the engine drops "late"
    response = complete(setup.server, "late")  # the engine re-reads the path it was given
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == first
    assert setup.server.get("/health").status_code == 200
