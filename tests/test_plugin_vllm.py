"""The plugins as vLLM loads them: entry points, VLLM_PLUGINS order, registry, loader."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import BASE_MODEL, REPO, start_worker, worker_result
from gcs_fixtures import GcsBucket
from hf_fixtures import REPO_ID, Hub, hub_fixture  # noqa: F401 - the fixture
from s3_fixtures import Bucket
from signing_support import KeyPair, key_pair, sign_with_key

from devtools.models import write_lora_adapter
from devtools.relay import Fault
from devtools.stores import upload_folder

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

OURS = "lora_fs_resolver"
VLLM_FILESYSTEM = "Filesystem Resolver"


class NewServers:
    """Processes that load our plugins as a new vLLM server does and resolve names through its
    registry (tests/workers/vllm_plugins.py), forked from one that imported vLLM once."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.runs = itertools.count()
        self.parent = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "workers" / "vllm_plugins.py"), "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def run(self, environment: dict[str, str], *names: str) -> tuple[int, str, str]:
        """A new server's exit code, stdout and stderr, with ``environment`` on top of ours."""
        assert self.parent.stdin is not None and self.parent.stdout is not None
        run = next(self.runs)
        stdout, stderr = self.work / f"{run}.stdout", self.work / f"{run}.stderr"
        request = {
            "env": {**os.environ, **environment},
            "args": [BASE_MODEL, *names],
            "stdout": str(stdout),
            "stderr": str(stderr),
        }
        self.parent.stdin.write(json.dumps(request) + "\n")
        self.parent.stdin.flush()
        line = self.parent.stdout.readline()
        assert line, f"the forking process died (exit {self.parent.wait()})"
        return json.loads(line)["exit"], stdout.read_text(), stderr.read_text()

    def load_and_resolve(self, environment: dict[str, str], *names: str) -> dict[str, Any]:
        """What a new server resolves ``names`` to; its output (vLLM's log included) is under
        ``log``."""
        code, stdout, stderr = self.run(environment, *names)
        assert code == 0, stderr[-3000:]
        result: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
        result["log"] = stdout + stderr
        return result

    def close(self) -> None:
        """End the forking process."""
        assert self.parent.stdin is not None
        self.parent.stdin.close()
        self.parent.wait(timeout=30)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NewServers]:
    forking = NewServers(tmp_path_factory.mktemp("new-servers"))
    yield forking
    forking.close()


@pytest.fixture
def two_sources(tmp_path: Path) -> dict[str, str]:
    """One name in our source folder and, at the version an earlier server of the same folder
    fetched, as a snapshot in vLLM's cache directory; and another store's snapshot there."""
    adapters, cache, elsewhere = tmp_path / "adapters", tmp_path / "cache", tmp_path / "elsewhere"
    write_lora_adapter(adapters / "both", base_model=BASE_MODEL, seed=3)
    write_lora_adapter(elsewhere / "foreign", base_model=BASE_MODEL, seed=4)
    for source, name in ((adapters, "both"), (elsewhere, "foreign")):
        earlier_server = start_worker(str(source), str(cache), name)
        worker_result(earlier_server)
        earlier_server.wait()
    write_lora_adapter(adapters / "both", base_model=BASE_MODEL, seed=1)  # the folder moves on
    write_lora_adapter(adapters / "ours-only", base_model=BASE_MODEL, seed=2)
    return {"VLLM_LORA_RESOLVER_CACHE_DIR": str(cache), "VLLM_LORA_RESOLVER_FS_DIR": str(adapters)}


def test_ours_listed_first_is_tried_first(servers: NewServers, two_sources: dict[str, str]) -> None:
    environment = {**two_sources, "VLLM_PLUGINS": f"{OURS},lora_filesystem_resolver"}
    result = servers.load_and_resolve(environment, "both", "ours-only")
    assert result["order"] == [OURS, VLLM_FILESYSTEM]
    both = result["answers"]["both"]
    assert both["resolver"] == OURS
    assert "/.vllm-lora/snapshots/" in both["path"]
    assert both["vllm_accepts"] is True
    assert result["answers"]["ours-only"]["resolver"] == OURS


def test_vllm_builtin_listed_first_is_tried_first(
    servers: NewServers, two_sources: dict[str, str]
) -> None:
    environment = {**two_sources, "VLLM_PLUGINS": f"lora_filesystem_resolver,{OURS}"}
    result = servers.load_and_resolve(environment, "both", "ours-only")
    assert result["order"] == [VLLM_FILESYSTEM, OURS]
    both = result["answers"]["both"]
    assert both["resolver"] == VLLM_FILESYSTEM
    snapshot = Path(two_sources["VLLM_LORA_RESOLVER_CACHE_DIR"], "both").resolve()
    assert Path(both["path"]).resolve() == snapshot  # the snapshot itself, not the name's link
    assert both["vllm_accepts"] is True
    assert result["answers"]["ours-only"]["resolver"] == OURS  # the next one is tried on None


def test_another_stores_snapshot_in_the_cache_is_never_handed_to_vllm(
    servers: NewServers,
    two_sources: dict[str, str],
) -> None:
    # "foreign" was fetched by a pod of another store on this node; its link is in the cache.
    assert Path(two_sources["VLLM_LORA_RESOLVER_CACHE_DIR"], "foreign").is_symlink()
    for plugins in (f"lora_filesystem_resolver,{OURS}", f"{OURS},lora_filesystem_resolver"):
        result = servers.load_and_resolve({**two_sources, "VLLM_PLUGINS": plugins}, "foreign")
        assert result["answers"]["foreign"]["resolver"] is None


def test_vllm_builtin_is_handed_nothing_but_snapshots_of_our_cache(
    servers: NewServers, bucket: Bucket, tmp_path: Path
) -> None:
    cache, outside = tmp_path / "cache", tmp_path / "outside"
    write_lora_adapter(outside / "evil", base_model=BASE_MODEL)
    write_lora_adapter(cache / "placed", base_model=BASE_MODEL)  # a real folder in the root
    (cache / "evil").symlink_to(outside / "evil")
    environment = {
        "VLLM_PLUGINS": "lora_s3_resolver,lora_filesystem_resolver",
        "VLLM_LORA_RESOLVER_S3_URI": bucket.uri,
        "VLLM_LORA_RESOLVER_CACHE_DIR": str(cache),
    }
    result = servers.load_and_resolve(environment, "evil", "placed")
    assert result["order"] == ["lora_s3_resolver", VLLM_FILESYSTEM]
    assert [result["answers"][name]["resolver"] for name in ("evil", "placed")] == [None, None]
    for name in ("evil", "placed"):
        assert f"lora_filesystem_resolver will not serve {name!r}" in result["log"]
    assert "VLLM_LORA_RESOLVER_FS_DIR" in result["log"]


def test_without_vllm_plugins_the_documented_default_order_holds(
    servers: NewServers,
    two_sources: dict[str, str],
) -> None:
    result = servers.load_and_resolve(two_sources, "both")
    assert result["order"][:2] == [OURS, VLLM_FILESYSTEM]


def test_plugin_not_listed_registers_nothing(
    servers: NewServers, two_sources: dict[str, str]
) -> None:
    result = servers.load_and_resolve(
        {**two_sources, "VLLM_PLUGINS": "lora_filesystem_resolver"}, "both"
    )
    assert result["order"] == [VLLM_FILESYSTEM]


def test_unconfigured_resolver_registers_nothing(servers: NewServers) -> None:
    result = servers.load_and_resolve({"VLLM_PLUGINS": OURS})
    assert result["order"] == []


def test_invalid_adapter_reaches_the_client_as_a_value_error(
    servers: NewServers, tmp_path: Path
) -> None:
    adapters = tmp_path / "adapters"
    write_lora_adapter(adapters / "too-big", base_model=BASE_MODEL, rank=64)
    environment = {
        "VLLM_LORA_RESOLVER_CACHE_DIR": str(tmp_path / "cache"),
        "VLLM_LORA_RESOLVER_FS_DIR": str(adapters),
        "VLLM_PLUGINS": OURS,
    }
    answer = servers.load_and_resolve(environment, "too-big")["answers"]["too-big"]
    assert "rank 64 is above this server's limit of 16" in answer["error"]


def test_bin_weights_are_accepted_by_vllms_loader(servers: NewServers, tmp_path: Path) -> None:
    adapters = tmp_path / "adapters"
    write_lora_adapter(adapters / "bin", base_model=BASE_MODEL, weights_format="bin")
    environment = {
        "VLLM_LORA_RESOLVER_CACHE_DIR": str(tmp_path / "cache"),
        "VLLM_LORA_RESOLVER_FS_DIR": str(adapters),
        "VLLM_PLUGINS": OURS,
    }
    answer = servers.load_and_resolve(environment, "bin")["answers"]["bin"]
    assert answer["vllm_accepts"] is True


def test_unusable_cache_dir_stops_startup_with_the_reason(
    servers: NewServers, tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    environment = {"VLLM_PLUGINS": OURS, "VLLM_LORA_RESOLVER_CACHE_DIR": str(blocker / "cache")}
    code, _, stderr = servers.run(environment)
    assert code != 0
    assert "VLLM_LORA_RESOLVER_CACHE_DIR" in stderr


def test_a_chain_with_one_store_black_holed_serves_the_others_in_seconds(
    servers: NewServers, bucket: Bucket, gcs_bucket: GcsBucket, hub: Hub, tmp_path: Path
) -> None:
    # Four stores in one server's chain; GCS accepts connections and never answers.
    bucket.upload("in-s3", write_lora_adapter(tmp_path / "s3", base_model=BASE_MODEL, seed=1))
    gcs_bucket.upload("in-gcs", write_lora_adapter(tmp_path / "gcs", base_model=BASE_MODEL))
    hub.server.push(REPO_ID, {"sql": write_lora_adapter(tmp_path / "hub", base_model=BASE_MODEL)})
    write_lora_adapter(tmp_path / "fs" / "in-fs", base_model=BASE_MODEL, seed=2)
    gcs_bucket.relay.add_fault(Fault("delay", seconds=3600, times=1_000_000))
    environment = {
        "VLLM_PLUGINS": "lora_s3_resolver,lora_gcs_resolver,lora_hf_resolver,lora_fs_resolver",
        "VLLM_LORA_RESOLVER_CACHE_DIR": str(tmp_path / "cache"),
        "VLLM_LORA_RESOLVER_S3_URI": bucket.uri,
        "VLLM_LORA_RESOLVER_GCS_URI": gcs_bucket.uri,
        "VLLM_LORA_RESOLVER_HF_REPO_LIST": REPO_ID,
        "VLLM_LORA_RESOLVER_FS_DIR": str(tmp_path / "fs"),
        "HF_HUB_OFFLINE": "0",
    }
    names = ("in-s3", f"{REPO_ID}/sql", "in-fs", "brand-new", "in-gcs")
    answers = servers.load_and_resolve(environment, *names)["answers"]
    assert answers["in-s3"]["resolver"] == "lora_s3_resolver"  # before the dead store
    assert answers[f"{REPO_ID}/sql"]["resolver"] == "lora_hf_resolver"  # past it
    assert answers["in-fs"]["resolver"] == "lora_fs_resolver"
    assert answers["brand-new"]["resolver"] is None  # 404, not another name's error
    assert answers["in-gcs"]["resolver"] is None  # the dead store's own adapter: not servable
    # The first request past the dead store waits for it once (about 3 s); later ones do not.
    assert max(answers[name]["seconds"] for name in names) < 10
    assert answers["in-fs"]["seconds"] < 1


def test_two_prefixes_of_one_bucket_on_one_node_cache_never_serve_each_others_adapters(
    servers: NewServers, bucket: Bucket, tmp_path: Path
) -> None:
    client = bucket.endpoint.client()
    upload_folder(client, bucket.name, "prod/sql-expert", write_lora_adapter(
        tmp_path / "sql-expert", base_model=BASE_MODEL
    ))  # fmt: skip
    cache = tmp_path / "cache"
    pod = {
        "VLLM_PLUGINS": "lora_s3_resolver,lora_filesystem_resolver",
        "VLLM_LORA_RESOLVER_CACHE_DIR": str(cache),
    }
    prod = servers.load_and_resolve(
        {**pod, "VLLM_LORA_RESOLVER_S3_URI": f"s3://{bucket.name}/prod"}, "sql-expert"
    )
    assert prod["answers"]["sql-expert"]["resolver"] == "lora_s3_resolver"
    assert (cache / "sql-expert").is_symlink()  # the node-wide name link the prod pod made

    staging = servers.load_and_resolve(
        {**pod, "VLLM_LORA_RESOLVER_S3_URI": f"s3://{bucket.name}/staging"}, "sql-expert"
    )
    assert staging["answers"]["sql-expert"]["resolver"] is None  # 404: not in staging


@pytest.mark.parametrize(
    ("why", "serve_stale", "expected"),
    [
        ("credentials revoked", "unreachable", "store refuses this server"),
        ("store unreachable", "never", "cannot be reached and cached copies are not served"),
    ],
)
def test_a_store_not_to_be_served_from_the_cache_is_served_by_no_resolver_of_the_server(
    servers: NewServers, bucket: Bucket, tmp_path: Path, why: str, serve_stale: str, expected: str
) -> None:
    # The README's order: our S3 resolver, then vLLM's filesystem resolver over our node cache.
    bucket.upload("sql", write_lora_adapter(tmp_path / "sql", base_model=BASE_MODEL))
    pod = {
        "VLLM_PLUGINS": "lora_s3_resolver,lora_filesystem_resolver",
        "VLLM_LORA_RESOLVER_S3_URI": bucket.uri,
        "VLLM_LORA_RESOLVER_CACHE_DIR": str(tmp_path / "cache"),
        "VLLM_LORA_RESOLVER_SERVE_STALE": serve_stale,
    }
    served = servers.load_and_resolve(pod, "sql")["answers"]["sql"]
    assert served["resolver"] == "lora_s3_resolver"
    assert (tmp_path / "cache" / "sql").is_symlink()  # what vLLM's resolver would find

    if why == "credentials revoked":
        pod["AWS_SECRET_ACCESS_KEY"] = "revoked-fake-secret"  # the real server refuses it
    else:
        bucket.relay.add_fault(Fault("status", status=503, times=1_000_000))
    answer = servers.load_and_resolve(pod, "sql")["answers"]["sql"]  # a restarted pod
    assert answer.get("path") is None, answer
    assert answer["resolver"] == VLLM_FILESYSTEM  # asked after ours said "next", and refused
    assert "adapter 'sql' is not served now" in answer["error"]
    assert expected in answer["error"]
    assert bucket.name not in answer["error"]

    bucket.relay.clear_faults()
    pod.pop("AWS_SECRET_ACCESS_KEY", None)
    again = servers.load_and_resolve(pod, "sql")["answers"]["sql"]
    assert again["resolver"] == "lora_s3_resolver"  # the store answers again: served again


# -- signed adapters (VLLM_LORA_RESOLVER_TRUST) ----------------------------------------------------


@pytest.fixture
def signed_and_plain(tmp_path: Path) -> tuple[KeyPair, dict[str, str]]:
    """A key pair, and a folder with an adapter it signed and one nobody signed."""
    keys = key_pair(tmp_path / "keys")
    adapters = tmp_path / "adapters"
    sign_with_key(write_lora_adapter(adapters / "signed", base_model=BASE_MODEL), keys)
    write_lora_adapter(adapters / "plain", base_model=BASE_MODEL, seed=1)
    return keys, {
        "VLLM_LORA_RESOLVER_CACHE_DIR": str(tmp_path / "cache"),
        "VLLM_LORA_RESOLVER_FS_DIR": str(adapters),
    }


def test_under_trust_vllm_gets_the_signed_adapter_and_a_400_with_the_reason_for_the_other(
    servers: NewServers, signed_and_plain: tuple[KeyPair, dict[str, str]]
) -> None:
    keys, pod = signed_and_plain
    environment = {**pod, "VLLM_PLUGINS": OURS, "VLLM_LORA_RESOLVER_TRUST": keys.trust}
    result = servers.load_and_resolve(environment, "signed", "plain")
    signed, plain = result["answers"]["signed"], result["answers"]["plain"]
    assert signed["resolver"] == OURS
    assert signed["vllm_accepts"] is True  # model.sig in the folder is no trouble to vLLM
    assert plain["type"] == "SignatureError"  # a ValueError: vLLM answers 400 with the message
    assert "adapter 'plain' is not signed" in plain["error"]
    assert result["signing"]


def test_vllms_filesystem_resolver_does_not_serve_a_snapshot_fetched_unchecked(
    servers: NewServers, signed_and_plain: tuple[KeyPair, dict[str, str]]
) -> None:
    keys, pod = signed_and_plain
    earlier = servers.load_and_resolve({**pod, "VLLM_PLUGINS": OURS}, "plain")  # no TRUST
    assert earlier["answers"]["plain"]["resolver"] == OURS
    assert Path(pod["VLLM_LORA_RESOLVER_CACHE_DIR"], "plain").is_symlink()
    environment = {
        **pod,
        "VLLM_PLUGINS": f"lora_filesystem_resolver,{OURS}",
        "VLLM_LORA_RESOLVER_TRUST": keys.trust,
    }
    answer = servers.load_and_resolve(environment, "plain")["answers"]["plain"]
    assert answer["resolver"] == VLLM_FILESYSTEM
    assert "adapter 'plain' is not signed" in answer["error"]


def test_without_trust_the_signing_library_is_never_imported(
    servers: NewServers, signed_and_plain: tuple[KeyPair, dict[str, str]]
) -> None:
    _, pod = signed_and_plain
    result = servers.load_and_resolve(
        {**pod, "VLLM_PLUGINS": f"{OURS},lora_filesystem_resolver"}, "signed", "plain"
    )
    assert result["answers"]["plain"]["resolver"] == OURS
    assert result["signing"] == []


def test_trust_without_the_signing_extra_stops_startup_with_the_install_line(
    servers: NewServers, signed_and_plain: tuple[KeyPair, dict[str, str]]
) -> None:
    keys, pod = signed_and_plain
    for plugins in (OURS, f"lora_filesystem_resolver,{OURS}"):
        environment = {
            **pod,
            "VLLM_PLUGINS": plugins,
            "VLLM_LORA_RESOLVER_TRUST": keys.trust,
            "TEST_HIDDEN_MODULES": "model_signing",
        }
        code, _, stderr = servers.run(environment, "signed")
        assert code != 0
        assert "VLLM_LORA_RESOLVER_TRUST is set but model-signing is not installed" in stderr
        assert "pip install 'model-signing" in stderr and "(the [signing] extra)" in stderr
