"""The Hugging Face Hub resolver against a local Hub-compatible server, through a fault relay."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import huggingface_hub
import prometheus_client
import pytest
from conftest import BASE_MODEL, REPO, files_of, snapshot_dirs
from hf_fixtures import REPO_ID, Hub, hub_fixture  # noqa: F401 - the fixture
from huggingface_hub.utils._http import default_client_factory

from devtools.models import write_lora_adapter
from devtools.relay import Fault
from vllm_lora_resolvers import metrics
from vllm_lora_resolvers.backends.hf_hub import HfHubStore, parse_repo_list
from vllm_lora_resolvers.config import ConfigurationError, Settings
from vllm_lora_resolvers.configured import build_resolver
from vllm_lora_resolvers.errors import (
    InvalidAdapterError,
    StoreUnavailableError,
    TransientStoreError,
)
from vllm_lora_resolvers.stores import HF

TOKEN = "hf_obviouslyFakeTokenForTests0123456789"
OTHER_TOKEN = "hf_anotherFakeTokenForTests9876543210"


def adapter(tmp_path: Path, label: str, seed: int = 0) -> Path:
    return write_lora_adapter(tmp_path / label, base_model=BASE_MODEL, seed=seed)


def weights_gets(hub: Hub) -> list[str]:
    return [path for _, path in hub.requests("GET") if "adapter_model" in path]


def resolutions(outcome: str) -> float:
    return float(metrics.RESOLUTIONS.labels("hf", outcome)._value.get())


# -- finding adapters -------------------------------------------------------------------------


def test_the_hub_client_is_built_with_the_store_not_by_the_first_adapter_s_request(
    hub: Hub, tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = []

    def counted_client() -> httpx2.Client:
        built.append("client")
        return default_client_factory()

    huggingface_hub.close_session()
    monkeypatch.setattr(huggingface_hub.utils._http, "_GLOBAL_CLIENT_FACTORY", counted_client)
    resolver = hub.resolver(cache_dir)
    assert built == ["client"]
    hub.server.push(REPO_ID, {"first": adapter(tmp_path, "first")})
    assert resolver.resolve(BASE_MODEL, f"{REPO_ID}/first") is not None
    assert built == ["client"]  # the request found it built
    huggingface_hub.close_session()  # the next test builds its own, with the default factory


def test_resolves_an_adapter_at_the_repo_root(hub: Hub, tmp_path: Path, cache_dir: Path) -> None:
    source = adapter(tmp_path, "root")
    hub.server.push(REPO_ID, {"": source, "README.md": b"# adapters\n"})
    resolved = hub.resolver(cache_dir).resolve(BASE_MODEL, REPO_ID)
    assert resolved is not None
    assert files_of(resolved.path) == files_of(source)
    assert (cache_dir / REPO_ID).resolve() == resolved.path.resolve()


def test_resolves_an_adapter_in_a_nested_folder(hub: Hub, tmp_path: Path, cache_dir: Path) -> None:
    source = adapter(tmp_path, "sql")
    hub.server.push(REPO_ID, {"team/sql": source, "team/other": adapter(tmp_path, "other", 1)})
    resolved = hub.resolver(cache_dir).resolve(BASE_MODEL, f"{REPO_ID}/team/sql")
    assert resolved is not None
    assert files_of(resolved.path) == files_of(source)


def test_version_is_the_commit_the_branch_points_to(
    hub: Hub, tmp_path: Path, cache_dir: Path
) -> None:
    commit = hub.server.push(REPO_ID, {"sql": adapter(tmp_path, "sql")})
    resolver = hub.resolver(cache_dir)
    assert resolver.resolve(BASE_MODEL, f"{REPO_ID}/sql") is not None
    located = resolver.store.locate(f"{REPO_ID}/sql")
    assert located is not None and located.version == commit


def test_cold_resolve_costs_a_head_a_paths_info_and_one_get_per_file(
    hub: Hub, tmp_path: Path, cache_dir: Path
) -> None:
    hub.server.push(REPO_ID, {"sql": adapter(tmp_path, "sql")})
    for index in range(60):  # a listing of the repo would take two pages: it is never listed
        commit = hub.server.push(REPO_ID, {f"filler/{index}/adapter_config.json": b"{}"})
    assert hub.resolver(cache_dir).resolve(BASE_MODEL, f"{REPO_ID}/sql") is not None
    requests = hub.requests()
    assert requests[:2] == [
        ("HEAD", f"/{REPO_ID}/resolve/main/sql/adapter_config.json"),
        ("POST", f"/api/models/{REPO_ID}/paths-info/{commit}"),
    ]
    assert sorted(requests[2:]) == [
        ("GET", f"/{REPO_ID}/resolve/{commit}/sql/adapter_config.json"),
        ("GET", f"/{REPO_ID}/resolve/{commit}/sql/adapter_model.safetensors"),
    ]


def test_cache_hit_costs_one_head_and_no_download(
    hub: Hub, tmp_path: Path, cache_dir: Path
) -> None:
    hub.server.push(REPO_ID, {"sql": adapter(tmp_path, "sql")})
    resolver = hub.resolver(cache_dir)
    first = resolver.resolve(BASE_MODEL, f"{REPO_ID}/sql")
    hub.relay.reset_counters()
    assert resolver.resolve(BASE_MODEL, f"{REPO_ID}/sql") == first
    assert hub.requests() == [("HEAD", f"/{REPO_ID}/resolve/main/sql/adapter_config.json")]


def test_cached_commit_pin_costs_no_request(hub: Hub, tmp_path: Path, cache_dir: Path) -> None:
    commit = hub.server.push(REPO_ID, {"sql": adapter(tmp_path, "sql")})
    name = f"{REPO_ID}/sql@{commit}"
    first = hub.resolver(cache_dir).resolve(BASE_MODEL, name)
    hub.relay.reset_counters()
    assert hub.resolver(cache_dir).resolve(BASE_MODEL, name) == first  # a new server process
    assert hub.requests() == []


def test_looking_up_a_cached_version_takes_no_lease(
    hub: Hub, tmp_path: Path, cache_dir: Path
) -> None:
    hub.server.push(REPO_ID, {"sql": adapter(tmp_path, "sql")})
    hub.resolver(cache_dir).resolve(BASE_MODEL, f"{REPO_ID}/sql")
    lister = hub.resolver(cache_dir)  # as `vllm-lora ls` or `doctor` would
    found = lister.store.locate(f"{REPO_ID}/sql")
    assert found is not None and found.cached_snapshot is not None
    assert lister.cache.held(found.cached_snapshot) is None


def test_branch_tag_and_commit_pins_each_serve_their_own_content(
    hub: Hub, tmp_path: Path, cache_dir: Path
) -> None:
    v1, v2, v3 = (adapter(tmp_path, f"v{seed}", seed) for seed in (1, 2, 3))
    first = hub.server.push(REPO_ID, {"sql": v1})
    hub.server.tag(REPO_ID, "v1.0", first)
    hub.server.push(REPO_ID, {"sql": v2})
    hub.server.push(REPO_ID, {"sql": v3}, branch="feature/next")
    resolver = hub.resolver(cache_dir)
    expected = {"": v2, "@v1.0": v1, f"@{first}": v1, "@feature/next": v3, "@main": v2}
    for suffix, source in expected.items():
        resolved = resolver.resolve(BASE_MODEL, f"{REPO_ID}/sql{suffix}")
        assert resolved is not None, suffix
        assert files_of(resolved.path) == files_of(source), suffix


def test_every_spelling_of_one_commit_shares_one_snapshot(
    hub: Hub, tmp_path: Path, cache_dir: Path
) -> None:
    commit = hub.server.push(REPO_ID, {"sql": adapter(tmp_path, "sql")})
    hub.server.tag(REPO_ID, "v1", commit)
    resolver = hub.resolver(cache_dir)
    spellings = ["", "@main", "@v1", f"@{commit}"]
    resolved = [resolver.resolve(BASE_MODEL, f"{REPO_ID}/sql{suffix}") for suffix in spellings]
    (path,) = {adapter.path for adapter in resolved if adapter is not None}
    assert None not in resolved
    assert len(weights_gets(hub)) == 1
    assert len(snapshot_dirs(cache_dir)) == 1
    for suffix in spellings:  # each name vLLM's built-in resolver may be asked finds it
        assert (cache_dir / f"{REPO_ID}/sql{suffix}").resolve() == path.resolve()


def test_a_pinned_name_never_moves_the_link_of_the_unpinned_one(
    hub: Hub, tmp_path: Path, cache_dir: Path
) -> None:
    first = hub.server.push(REPO_ID, {"sql": adapter(tmp_path, "v1", 1)})
    hub.server.tag(REPO_ID, "v1", first)
    assert hub.resolver(cache_dir).resolve(BASE_MODEL, f"{REPO_ID}/sql") is not None
    hub.server.push(REPO_ID, {"sql": adapter(tmp_path, "v2", 2)})
    latest = hub.resolver(cache_dir).resolve(BASE_MODEL, f"{REPO_ID}/sql")  # another process
    pinned = hub.resolver(cache_dir).resolve(BASE_MODEL, f"{REPO_ID}/sql@v1")  # and another
    assert latest is not None and pinned is not None
    assert pinned.snapshot.manifest.version == first != latest.snapshot.manifest.version
    assert (cache_dir / REPO_ID / "sql").resolve() == latest.path.resolve()
    assert (cache_dir / f"{REPO_ID}/sql@v1").resolve() == pinned.path.resolve()


def test_an_adapter_pushed_after_the_first_resolve_is_found(
    hub: Hub, tmp_path: Path, cache_dir: Path
) -> None:
    hub.server.push(REPO_ID, {"sql": adapter(tmp_path, "sql")})
    resolver = hub.resolver(cache_dir, VLLM_LORA_RESOLVER_NEGATIVE_TTL="0.3")
    assert resolver.resolve(BASE_MODEL, f"{REPO_ID}/sql") is not None
    assert resolver.resolve(BASE_MODEL, f"{REPO_ID}/chat") is None
    hub.server.push(REPO_ID, {"chat": adapter(tmp_path, "chat", 1), "qa": adapter(tmp_path, "qa")})
    assert resolver.resolve(BASE_MODEL, f"{REPO_ID}/qa") is not None
    assert resolver.resolve(BASE_MODEL, f"{REPO_ID}/chat") is None  # the miss is remembered
    time.sleep(0.35)
    assert resolver.resolve(BASE_MODEL, f"{REPO_ID}/chat") is not None


def test_absent_folder_revision_or_config_is_not_found(
    hub: Hub, tmp_path: Path, cache_dir: Path
) -> None:
    weights_only = adapter(tmp_path, "weights")
    (weights_only / "adapter_config.json").unlink()
    hub.server.push(REPO_ID, {"sql": adapter(tmp_path, "sql"), "weights": weights_only})
    resolver = hub.resolver(cache_dir)
    for name in ("absent", "sql@no-such-branch", "weights", f"sql@{'0' * 40}"):
        assert resolver.resolve(BASE_MODEL, f"{REPO_ID}/{name}") is None, name


def test_adapter_without_weights_is_refused_with_the_reason(
    hub: Hub, tmp_path: Path, cache_dir: Path
) -> None:
    config = (adapter(tmp_path, "sql") / "adapter_config.json").read_bytes()
    hub.server.push(REPO_ID, {"sql/adapter_config.json": config})
    with pytest.raises(InvalidAdapterError, match="has no weights file"):
        hub.resolver(cache_dir).resolve(BASE_MODEL, f"{REPO_ID}/sql")


def test_corrupted_bytes_are_refused_for_lfs_and_git_files(
    hub: Hub, tmp_path: Path, cache_dir: Path
) -> None:
    source = adapter(tmp_path, "sql")
    hub.server.push(REPO_ID, {"sql": source})
    for file_name in ("adapter_model.safetensors", "adapter_config.json"):
        blob = hub.server.blob_of(REPO_ID, f"sql/{file_name}")
        original = blob.read_bytes()
        blob.write_bytes(bytes([original[0] ^ 1]) + original[1:])  # same size, one bit off
        with pytest.raises(TransientStoreError, match="does not match what the"):
            hub.resolver(cache_dir).resolve(BASE_MODEL, f"{REPO_ID}/sql")
        blob.write_bytes(original)
    assert snapshot_dirs(cache_dir) == []


# -- names ------------------------------------------------------------------------------------


def test_names_outside_the_listed_repos_are_refused_without_a_request(
    hub: Hub, tmp_path: Path, cache_dir: Path
) -> None:
    hub.server.push("org/other", {"": adapter(tmp_path, "other")})
    resolver = hub.resolver(cache_dir)
    for name in (
        "org/other",
        "org/adapters2/x",
        "org/adapter",
        "org",
        "adapters",
        "x/org/adapters",
    ):
        assert resolver.resolve(BASE_MODEL, name) is None, name
    assert hub.requests() == []


def test_names_of_other_stores_are_missing_here_and_only_hostile_names_rejected(
    hub: Hub, cache_dir: Path
) -> None:
    resolver = hub.resolver(cache_dir)
    before = {outcome: resolutions(outcome) for outcome in ("missing", "rejected")}
    others = ["sql-expert", "team-a/sql", "org/other/sql", f"{REPO_ID}2/x@v1", "sql-expert@v1"]
    hostile = [f"{REPO_ID}/../x", f"{REPO_ID}@..", "sql@a@b", "../x"]
    for name in others + hostile:
        assert resolver.resolve(BASE_MODEL, name) is None, name
    assert resolutions("missing") - before["missing"] == len(others)
    assert resolutions("rejected") - before["rejected"] == len(hostile)
    assert hub.requests() == []


def test_hostile_names_are_refused_without_a_request(hub: Hub, cache_dir: Path) -> None:
    resolver = hub.resolver(cache_dir)
    hostile = [
        f"{REPO_ID}/../other",
        f"{REPO_ID}/a/../../b",
        f"{REPO_ID}@..",
        f"{REPO_ID}@main/../../x",
        f"{REPO_ID}@",
        f"{REPO_ID}@a@b",
        f"{REPO_ID}@%2e%2e",
        f"{REPO_ID}@refs/pr/1/a/b",
        f"{REPO_ID}@{'v' * 200}",
        f"{REPO_ID}/a\\b",
        f"{REPO_ID}/",
        f"/{REPO_ID}",
        f"{REPO_ID}/x\x00",
        f"{REPO_ID}@main\n",
        "",
    ]
    for name in hostile:
        assert resolver.resolve(BASE_MODEL, name) is None, name
    assert hub.requests() == []


def test_repo_list_must_hold_hub_repo_ids() -> None:
    assert parse_repo_list(["org/a", "org/a-longer", "org/a"]) == ("org/a-longer", "org/a")
    for bad in ("org/repo/sub", "../x", "org/", "https://huggingface.co/org/x"):
        with pytest.raises(ConfigurationError, match="VLLM_LORA_RESOLVER_HF_REPO_LIST"):
            parse_repo_list([bad])


def test_plugin_builds_a_resolver_only_when_repos_are_listed(cache_dir: Path) -> None:
    environ = {"VLLM_LORA_RESOLVER_CACHE_DIR": str(cache_dir)}
    assert build_resolver(HF.plugin, Settings.from_environ(environ, argv=[])) is None
    environ["VLLM_LORA_RESOLVER_HF_REPO_LIST"] = "org/a, org/b"
    resolver = build_resolver(HF.plugin, Settings.from_environ(environ, argv=[]))
    assert resolver is not None and isinstance(resolver.store, HfHubStore)
    assert set(resolver.store.repos) == {"org/a", "org/b"}


@pytest.mark.vllm
def test_vllm_loads_the_plugin_and_serves_an_adapter_from_the_hub(
    hub: Hub, tmp_path: Path, cache_dir: Path
) -> None:
    pytest.importorskip("vllm")
    hub.server.push(REPO_ID, {"sql": adapter(tmp_path, "sql")})
    environment = {
        **os.environ,
        "VLLM_PLUGINS": "lora_hf_resolver",
        "VLLM_LORA_RESOLVER_CACHE_DIR": str(cache_dir),
        "VLLM_LORA_RESOLVER_HF_REPO_LIST": REPO_ID,
    }
    worker = REPO / "tests" / "workers" / "vllm_plugins.py"
    completed = subprocess.run(
        [sys.executable, str(worker), BASE_MODEL, f"{REPO_ID}/sql"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["order"] == ["lora_hf_resolver"]
    answer = result["answers"][f"{REPO_ID}/sql"]
    assert answer["resolver"] == "lora_hf_resolver"
    assert answer["vllm_accepts"] is True


# -- access -----------------------------------------------------------------------------------


def assert_only_its_token_opens(
    hub: Hub, cache_dir: Path, monkeypatch: pytest.MonkeyPatch, refusal: str
) -> None:
    """With another account's token, ``sql`` of `REPO_ID` is refused (``refusal``) by a message
    without that token; with `TOKEN`, the one the repo was shared with, it resolves."""
    monkeypatch.setenv("HF_TOKEN", OTHER_TOKEN)
    with pytest.raises(StoreUnavailableError, match=refusal) as wrong:
        hub.resolver(cache_dir).resolve(BASE_MODEL, f"{REPO_ID}/sql")
    assert OTHER_TOKEN not in str(wrong.value)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert hub.resolver(cache_dir).resolve(BASE_MODEL, f"{REPO_ID}/sql") is not None


def test_private_repo_is_read_with_its_token_only(
    hub: Hub, tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.server.push(REPO_ID, {"sql": adapter(tmp_path, "sql")})
    hub.server.set_private(REPO_ID, TOKEN)
    with pytest.raises(StoreUnavailableError, match="private") as anonymous:
        hub.resolver(cache_dir).resolve(BASE_MODEL, f"{REPO_ID}/sql")
    assert "no HF_TOKEN" in str(anonymous.value)
    assert_only_its_token_opens(hub, cache_dir, monkeypatch, "private")


def test_gated_repo_without_access_is_explained(
    hub: Hub, tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.server.push(REPO_ID, {"sql": adapter(tmp_path, "sql")})
    hub.server.set_gated(REPO_ID, TOKEN)
    assert_only_its_token_opens(hub, cache_dir, monkeypatch, "gated repo")


def test_token_never_appears_in_logs_errors_or_metrics(
    hub: Hub,
    tmp_path: Path,
    cache_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    for library in ("vllm", "huggingface_hub"):  # both stop propagation once configured
        monkeypatch.setattr(logging.getLogger(library), "propagate", True)
        caplog.set_level(logging.DEBUG, logger=library)
    caplog.set_level(logging.DEBUG)
    hub.server.push(REPO_ID, {"sql": adapter(tmp_path, "sql")})
    hub.server.push("org/gated", {"": adapter(tmp_path, "gated")})
    hub.server.set_private(REPO_ID, TOKEN)
    hub.server.set_gated("org/gated", OTHER_TOKEN)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub.relay.add_fault(Fault("status", method="GET", path_contains="adapter_model", times=1))
    resolver = hub.resolver(cache_dir, repos=f"{REPO_ID},org/gated")
    assert resolver.resolve(BASE_MODEL, f"{REPO_ID}/sql") is not None  # after one retry
    with pytest.raises(StoreUnavailableError) as refused:
        hub.resolver(cache_dir, repos="org/gated").resolve(BASE_MODEL, "org/gated")
    exposed = [caplog.text, str(refused.value), prometheus_client.generate_latest().decode()]
    assert all(TOKEN not in text for text in exposed)
    assert "retry 1/" in caplog.text  # the logs were captured


def test_an_inaccessible_repo_does_not_block_the_others(
    hub: Hub, tmp_path: Path, cache_dir: Path
) -> None:
    hub.server.push(REPO_ID, {"sql": adapter(tmp_path, "sql")})
    hub.server.push("org/private", {"": adapter(tmp_path, "private")})
    hub.server.set_private("org/private", TOKEN)
    resolver = hub.resolver(cache_dir, repos=f"{REPO_ID},org/private")
    with pytest.raises(StoreUnavailableError):
        resolver.resolve(BASE_MODEL, "org/private")
    assert resolver.resolve(BASE_MODEL, f"{REPO_ID}/sql") is not None


# -- faults -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["POST"])  # HEAD: tests/test_store_contract.py
def test_503_on_the_api_is_retried(hub: Hub, tmp_path: Path, cache_dir: Path, method: str) -> None:
    hub.server.push(REPO_ID, {"sql": adapter(tmp_path, "sql")})
    hub.relay.add_fault(Fault("status", method=method, times=1))
    assert hub.resolver(cache_dir).resolve(BASE_MODEL, f"{REPO_ID}/sql") is not None
    assert len(hub.requests(method)) == 2


def test_unreachable_hub_serves_each_spelling_the_snapshot_it_last_resolved_to(
    hub: Hub, tmp_path: Path, cache_dir: Path
) -> None:
    first = hub.server.push(REPO_ID, {"sql": adapter(tmp_path, "v1", 1)})
    hub.server.tag(REPO_ID, "v1", first)
    hub.resolver(cache_dir).resolve(BASE_MODEL, f"{REPO_ID}/sql")
    pinned = hub.resolver(cache_dir).resolve(BASE_MODEL, f"{REPO_ID}/sql@v1")  # a cache hit
    hub.server.push(REPO_ID, {"sql": adapter(tmp_path, "v2", 2)})
    latest = hub.resolver(cache_dir).resolve(BASE_MODEL, f"{REPO_ID}/sql")
    hub.relay.add_fault(Fault("status", times=10_000))
    for name, expected in ((f"{REPO_ID}/sql@v1", pinned), (f"{REPO_ID}/sql", latest)):
        served = hub.resolver(cache_dir).resolve(BASE_MODEL, name)  # a new server process
        assert served is not None and expected is not None
        assert served.path == expected.path, name


# -- load -------------------------------------------------------------------------------------


def test_two_hubs_never_share_snapshots(
    hub: Hub, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    resolver = hub.resolver(cache_dir)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    other = hub.resolver(cache_dir)
    assert isinstance(other.store, HfHubStore)
    assert other.store.endpoint == "http://127.0.0.1:9"
    assert resolver.source != other.source
