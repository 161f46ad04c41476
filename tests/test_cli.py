"""The ``vllm-lora`` command, run as installed (a subprocess) against loopback stores and caches."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import BASE_MODEL, CLI, snapshot_dirs, start_worker, vllm_lora, worker_result
from gcs_fixtures import GcsBucket
from hf_fixtures import REPO_ID, Hub, hub_fixture  # noqa: F401 - the fixture
from s3_fixtures import Bucket

from devtools.models import write_broken_safetensors, write_lora_adapter
from devtools.relay import Fault
from vllm_lora_resolvers.backends.bucket import PROBE_FILE
from vllm_lora_resolvers.backends.filesystem import FilesystemStore
from vllm_lora_resolvers.cache import NodeCache, snapshot_key
from vllm_lora_resolvers.cli.system import filesystem_type, flock_holders, is_network_filesystem
from vllm_lora_resolvers.config import Settings
from vllm_lora_resolvers.errors import InvalidAdapterError
from vllm_lora_resolvers.resolver import Resolver

SECRET = "s3cr3t-never-printed"
HF_SECRET = "hf_n3ver-printed"


def adapter(folder: Path, **options: object) -> Path:
    """A tiny adapter for ``BASE_MODEL`` (``options`` as `write_lora_adapter` takes them)."""
    return write_lora_adapter(folder, base_model=BASE_MODEL, **options)  # type: ignore[arg-type]


def failed_checks(result: subprocess.CompletedProcess[str]) -> dict[str, dict[str, str]]:
    """The failed checks of a ``validate --json`` result, by check."""
    report = json.loads(result.stdout)
    return {check["check"]: check for check in report["checks"] if check["status"] == "fail"}


@pytest.fixture
def held(adapters_dir: Path, cache_dir: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process serving adapter ``held`` from ``cache_dir``, holding its lease."""
    adapter(adapters_dir / "held", seed=1)
    worker = start_worker(str(adapters_dir), str(cache_dir), "held", hold=True)
    worker_result(worker)
    yield worker
    worker.kill()
    worker.wait()


def cache_a(adapters_dir: Path, cache_dir: Path, name: str) -> Path:
    """Resolve ``name`` into ``cache_dir`` in a process that then exits (no lease left)."""
    worker = start_worker(str(adapters_dir), str(cache_dir), name)
    path = Path(worker_result(worker)["path"])
    worker.wait()
    return path


# -- validate -----------------------------------------------------------------------------


def test_validate_accepts_a_valid_folder_and_names_the_base_model_it_used(tmp_path: Path) -> None:
    result = vllm_lora("validate", str(adapter(tmp_path / "sql")))
    assert result.returncode == 0, result.stderr
    assert "PASS weights" in result.stdout
    assert f"base model: {BASE_MODEL} (the adapter's own base_model_name_or_path" in result.stdout
    assert result.stdout.rstrip().endswith("valid")


@pytest.mark.parametrize(
    ("options", "extra_arguments", "check", "problem"),
    [
        ({"rank": 32}, [], "compatibility", "rank 32 is above this server's limit of 16"),
        ({"extra_config": {"use_dora": True}}, [], "compatibility", "DoRA"),
        ({}, ["--base-model", "/models/other"], "compatibility", "base_model_name_or_path"),
        ({"broken": "truncated"}, [], "weights", "is malformed"),
    ],
    ids=["rank", "dora", "wrong-base-model", "broken-safetensors"],
)
def test_validate_refuses_an_invalid_folder_with_the_problem_and_its_fix(
    tmp_path: Path,
    options: dict[str, object],
    extra_arguments: list[str],
    check: str,
    problem: str,
) -> None:
    broken = options.pop("broken", None)
    folder = adapter(tmp_path / "bad", **options)
    if broken:
        write_broken_safetensors(folder / "adapter_model.safetensors", broken)  # type: ignore[arg-type]
    result = vllm_lora("validate", str(folder), "--json", *extra_arguments)
    assert result.returncode == 1, result.stderr
    failed = failed_checks(result)
    assert list(failed) == [check]
    assert problem in failed[check]["problem"]
    assert failed[check]["fix"]


def test_validate_lists_independent_failures_together(tmp_path: Path) -> None:
    folder = adapter(tmp_path / "bad", extra_config={"use_dora": True})
    write_broken_safetensors(folder / "adapter_model.safetensors", "bad_header")
    result = vllm_lora("validate", str(folder))
    assert result.returncode == 1
    assert "FAIL compatibility" in result.stdout
    assert "FAIL weights" in result.stdout
    assert result.stdout.count("fix: ") == 2
    assert "invalid: 2 problems" in result.stdout


def test_validate_json_is_a_stable_machine_readable_result(tmp_path: Path) -> None:
    result = vllm_lora("validate", str(adapter(tmp_path / "sql")), "--json", "--max-rank", "8")
    assert result.returncode == 0
    report = json.loads(result.stdout)
    assert report == {
        "adapter": "sql",
        "location": str(tmp_path / "sql"),
        "valid": True,
        "base_model": BASE_MODEL,
        "base_model_source": "adapter_config.json",
        "max_rank": 8,
        "rank": 8,
        "checks": [
            *(
                {"check": name, "status": "pass", "problem": None, "fix": None}
                for name in ("name", "config", "compatibility", "weights")
            ),
            # Who signed it: no one, and no VLLM_LORA_RESOLVER_TRUST to check it against.
            {"check": "signature", "status": "skip", "problem": None, "fix": None},
        ],
    }


def test_validate_refuses_a_folder_name_clients_cannot_ask_for(tmp_path: Path) -> None:
    result = vllm_lora("validate", str(adapter(tmp_path / "-sql")), "--json")
    assert result.returncode == 1
    assert list(failed_checks(result)) == ["name"]


@pytest.mark.parametrize("linked", ["adapter_config.json", "adapter_model.safetensors"])
def test_validate_refuses_a_file_linked_from_outside_the_folder_as_the_resolver_does(
    tmp_path: Path, cache_dir: Path, linked: str
) -> None:
    folder = adapter(tmp_path / "adapters" / "sql")
    outside = tmp_path / "outside"
    outside.mkdir()
    (folder / linked).rename(outside / linked)
    (folder / linked).symlink_to(outside / linked)
    settings = Settings.from_environ({"VLLM_LORA_RESOLVER_CACHE_DIR": str(cache_dir)}, argv=[])
    resolver = Resolver(FilesystemStore(tmp_path / "adapters", settings, NodeCache(cache_dir)))
    with pytest.raises(InvalidAdapterError, match="outside the adapter folder"):
        resolver.resolve(BASE_MODEL, "sql")
    result = vllm_lora("validate", str(folder), "--json")
    assert result.returncode == 1, result.stdout + result.stderr
    assert list(failed_checks(result)) == ["files"]
    assert f"{linked} is a link to a file outside" in failed_checks(result)["files"]["problem"]


def test_validate_fetches_an_s3_adapter_and_checks_it(bucket: Bucket, tmp_path: Path) -> None:
    bucket.upload("sql", adapter(tmp_path / "sql"))
    bucket.upload("big", adapter(tmp_path / "big", rank=32))
    valid = vllm_lora("validate", f"{bucket.uri}/sql", "--base-model", BASE_MODEL)
    assert valid.returncode == 0, valid.stdout + valid.stderr
    assert f"{bucket.uri}/sql/" in valid.stdout
    invalid = vllm_lora("validate", f"{bucket.uri}/big", "--json")
    assert invalid.returncode == 1
    assert "rank 32" in failed_checks(invalid)["compatibility"]["problem"]
    absent = vllm_lora("validate", f"{bucket.uri}/absent", "--json")
    assert absent.returncode == 1
    assert "no adapter_config.json" in failed_checks(absent)["config"]["problem"]


def test_validate_cannot_check_an_unreadable_store(bucket: Bucket) -> None:
    result = vllm_lora("validate", f"s3://no-such-bucket-{bucket.name}/sql")
    assert result.returncode == 2
    assert "NoSuchBucket" in result.stderr


def test_validate_names_an_adapter_in_a_nested_folder_as_clients_ask_for_it(
    bucket: Bucket, tmp_path: Path
) -> None:
    bucket.upload("team-a/sql", adapter(tmp_path / "sql"))
    uri = f"{bucket.uri}/team-a/sql"
    configured = vllm_lora("validate", uri, "--json", VLLM_LORA_RESOLVER_S3_URI=bucket.uri)
    assert configured.returncode == 0, configured.stdout + configured.stderr
    report = json.loads(configured.stdout)
    assert report["adapter"] == "team-a/sql"
    assert report["checks"][0] == {"check": "name", "status": "pass", "problem": None, "fix": None}
    guessed = vllm_lora("validate", uri)
    assert guessed.returncode == 0, guessed.stdout + guessed.stderr
    assert f"WARN name: 'sql', taking {bucket.uri}/team-a as the store" in guessed.stdout
    assert "(the URI is not below VLLM_LORA_RESOLVER_S3_URI)" in guessed.stdout
    assert "fix: set VLLM_LORA_RESOLVER_S3_URI to the server's store" in guessed.stdout


# -- ls -----------------------------------------------------------------------------------


def listing_rows(output: str) -> dict[str, str]:
    """The rows of an ``ls`` table, by their first cell."""
    rows = {}
    for line in output.splitlines():
        cells = line.split()
        if cells and not line.startswith((" ", "─")):
            rows[cells[0]] = line
    return rows


def not_an_adapter(folder: Path) -> Path:
    """A folder of notes: no adapter_config.json, nothing ``ls`` should call an adapter."""
    folder.mkdir()
    (folder / "README.md").write_text("not an adapter")
    return folder


def verdict(row: str) -> str:
    """The VALID cell of an ``ls`` row."""
    found = re.search(r"\s(yes|no)(\s|$)", row)
    assert found is not None, row
    return found.group(1)


def test_ls_lists_a_bucket_with_each_adapter_valid_or_why_not(
    bucket: Bucket, tmp_path: Path
) -> None:
    bucket.upload("sql", adapter(tmp_path / "sql"))
    bucket.upload("dora", adapter(tmp_path / "dora", extra_config={"use_dora": True}))
    bucket.upload("other-base", write_lora_adapter(tmp_path / "ob", base_model="/models/other"))
    bucket.upload("notes", not_an_adapter(tmp_path / "notes"))
    result = vllm_lora("ls", bucket.uri, "--base-model", BASE_MODEL)
    assert result.returncode == 0, result.stderr
    assert "weights not downloaded" in result.stdout
    rows = listing_rows(result.stdout)
    assert verdict(rows["sql"]) == "yes"
    assert "KiB" in rows["sql"]
    assert verdict(rows["dora"]) == "no" and "DoRA" in rows["dora"]
    assert verdict(rows["other-base"]) == "no" and "/models/other" in rows["other-base"]
    assert "no adapter_config.json" in rows["notes"]
    assert "4 folders, 1 valid" in result.stdout
    downloads = [path for method, path in bucket.requests("GET") if "list-type" not in path]
    assert all(path.endswith("/adapter_config.json") for path in downloads)


def test_ls_lists_the_adapters_in_nested_folders_by_the_names_clients_ask_for(
    bucket: Bucket, tmp_path: Path
) -> None:
    bucket.upload("sql", adapter(tmp_path / "sql"))
    bucket.upload("team-a/sql", adapter(tmp_path / "team-sql"))
    bucket.upload("team-a/big", adapter(tmp_path / "big", rank=32))
    bucket.upload("team-a/deep/er/chat", adapter(tmp_path / "chat"))
    bucket.upload("team-a/notes", not_an_adapter(tmp_path / "notes"))
    result = vllm_lora("ls", bucket.uri, "--base-model", BASE_MODEL)
    assert result.returncode == 0, result.stderr
    rows = listing_rows(result.stdout)
    assert "team-a" not in rows  # a folder of adapters: its adapters are listed instead
    assert verdict(rows["team-a/sql"]) == verdict(rows["team-a/deep/er/chat"]) == "yes"
    assert verdict(rows["team-a/big"]) == "no" and "rank 32" in rows["team-a/big"]
    assert "no adapter_config.json" in rows["team-a/notes"]
    assert "5 folders, 3 valid" in result.stdout


def test_ls_lists_a_gcs_bucket_and_validate_reads_it(gcs_bucket: GcsBucket, tmp_path: Path) -> None:
    gcs_bucket.upload("sql", adapter(tmp_path / "sql"))
    gcs_bucket.upload("big", adapter(tmp_path / "big", rank=64))
    gcs_bucket.upload("team/sql", adapter(tmp_path / "team-sql"))
    listed = vllm_lora("ls", gcs_bucket.uri)
    assert listed.returncode == 0, listed.stderr
    rows = listing_rows(listed.stdout)
    assert verdict(rows["sql"]) == verdict(rows["team/sql"]) == "yes"
    assert "team" not in rows
    assert verdict(rows["big"]) == "no" and "rank 64" in rows["big"]
    assert vllm_lora("validate", f"{gcs_bucket.uri}/sql").returncode == 0


def test_ls_lists_the_adapter_folders_of_a_hub_repo_and_validate_reads_one(
    hub: Hub, tmp_path: Path
) -> None:
    hub.server.push(
        REPO_ID,
        {
            "sql": adapter(tmp_path / "sql"),
            "team/big": adapter(tmp_path / "big", rank=32),
            "README.md": b"adapters",
        },
    )
    no_login = {"HF_TOKEN_PATH": str(tmp_path / "no-stored-token")}
    listed = vllm_lora("ls", f"hf://{REPO_ID}", **no_login)
    assert listed.returncode == 0, listed.stderr
    rows = listing_rows(listed.stdout)
    assert verdict(rows[f"{REPO_ID}/sql"]) == "yes"
    assert verdict(rows[f"{REPO_ID}/team/big"]) == "no"
    assert "2 folders" in listed.stdout
    checked = vllm_lora("validate", f"hf://{REPO_ID}/sql@main", "--json", **no_login)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert json.loads(checked.stdout)["adapter"] == f"{REPO_ID}/sql@main"


def test_ls_lists_a_local_directory(adapters_dir: Path) -> None:
    adapter(adapters_dir / "sql")
    adapter(adapters_dir / "big", rank=32)
    adapter(adapters_dir / "team" / "sql")
    (adapters_dir / "empty").mkdir()
    result = vllm_lora("ls", str(adapters_dir), "--max-rank", "64")
    rows = listing_rows(result.stdout)
    assert verdict(rows["sql"]) == verdict(rows["big"]) == verdict(rows["team/sql"]) == "yes"
    assert "team" not in rows
    assert "no adapter_config.json" in rows["empty"]


def test_ls_escapes_store_names_that_would_drive_the_terminal_or_forge_rows(
    bucket: Bucket, tmp_path: Path
) -> None:
    bucket.upload("sql", adapter(tmp_path / "sql"))
    client = bucket.endpoint.client()
    for name in ("evil\x1b[2J", "a\nforged-row"):
        key = f"adapters/{name}/adapter_config.json"
        client.put_object(Bucket=bucket.name, Key=key, Body=b"{}")
    result = vllm_lora("ls", bucket.uri)
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout
    assert not any(line.startswith("forged-row") for line in result.stdout.splitlines())
    rows = listing_rows(result.stdout)
    assert "not a name a client can ask for" in rows["evil\\x1b[2J"]
    assert "not a name a client can ask for" in rows["a\\nforged-row"]
    assert "3 folders, 1 valid" in result.stdout


# -- pull ---------------------------------------------------------------------------------


def test_pull_warms_the_cache_so_the_server_resolves_without_a_download(
    bucket: Bucket, tmp_path: Path, cache_dir: Path
) -> None:
    bucket.upload("sql", adapter(tmp_path / "sql"))
    names = tmp_path / "names.txt"
    names.write_text("# adapters this node serves\nsql\n\n")
    result = vllm_lora(
        "pull",
        "--from-file",
        str(names),
        "--base-model",
        BASE_MODEL,
        VLLM_LORA_RESOLVER_S3_URI=bucket.uri,
        VLLM_LORA_RESOLVER_CACHE_DIR=str(cache_dir),
        VLLM_PLUGINS="lora_s3_resolver,lora_filesystem_resolver",
    )
    assert result.returncode == 0, result.stderr
    assert "fetching sql from s3://" in result.stdout
    assert "pulled sql from s3://" in result.stdout
    assert "1 of 1 adapters in the cache" in result.stdout
    bucket.relay.reset_counters()
    resolved = bucket.resolver(cache_dir).resolve(BASE_MODEL, "sql")
    assert resolved is not None
    assert [method for method, _ in bucket.requests()] == ["GET"]  # one listing, no download
    assert "list-type=2" in bucket.requests()[0][1]


def test_pull_exits_1_and_names_each_failure_with_its_reason(
    bucket: Bucket, tmp_path: Path, cache_dir: Path
) -> None:
    bucket.upload("sql", adapter(tmp_path / "sql"))
    bucket.upload("big", adapter(tmp_path / "big", rank=32))
    result = vllm_lora(
        "pull",
        "sql",
        "big",
        "absent",
        "--base-model",
        BASE_MODEL,
        VLLM_LORA_RESOLVER_S3_URI=bucket.uri,
        VLLM_LORA_RESOLVER_CACHE_DIR=str(cache_dir),
    )
    assert result.returncode == 1
    assert "1 of 3 adapters in the cache" in result.stdout
    assert "2 failed:" in result.stderr
    assert "big: adapter 'big': rank 32 is above" in result.stderr
    assert "absent: not found in lora_s3_resolver (s3://" in result.stderr
    assert [path.name for path in (cache_dir / "sql").resolve().iterdir()] != []


def test_pull_draws_progress_bars_on_a_terminal(tmp_path: Path, cache_dir: Path) -> None:
    adapter(tmp_path / "adapters" / "sql")
    controller, terminal = os.openpty()
    environment = {
        **os.environ,
        "VLLM_LORA_RESOLVER_FS_DIR": str(tmp_path / "adapters"),
        "VLLM_LORA_RESOLVER_CACHE_DIR": str(cache_dir),
        "COLUMNS": "160",
    }
    process = subprocess.Popen(
        [str(CLI), "pull", "sql", "--base-model", BASE_MODEL],
        stdout=terminal,
        stderr=terminal,
        env=environment,
    )
    os.close(terminal)
    shown = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: the command closed its terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(controller)
    assert process.wait(timeout=60) == 0
    assert b"\x1b[" in shown  # styled for a terminal
    assert b"pulled sql" in shown
    assert b"KiB" in shown  # the bar's byte count


# -- start-up: a command imports what its path needs ----------------------------------------

#: Store clients, and what only the server (vLLM, our edge and its event loop) and signed adapters
#: need: milliseconds to hundreds of them at every start of a one-shot command (``pull`` in an
#: init container).
STORE_CLIENTS = ("botocore", "boto3", "s3transfer", "google.cloud", "azure", "huggingface_hub")
SERVER_AND_SIGNING = (
    "vllm",
    "torch",
    "transformers",
    "vllm_lora_resolvers.plugin",
    "vllm_lora_resolvers.edge",
    "asyncio",
    "model_signing",
)


def modules_at_exit(tmp_path: Path, *arguments: str, **variables: str) -> set[str]:
    """The modules ``vllm-lora ARGUMENTS`` has imported by its exit (which must be 0)."""
    listing = tmp_path / "modules.txt"
    code = (
        "import atexit, sys\n"
        f"atexit.register(lambda: open({str(listing)!r}, 'w').write(' '.join(sys.modules)))\n"
        "from vllm_lora_resolvers.cli import main\n"
        "main()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, *arguments],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, **variables},
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return set(listing.read_text().split())


def loaded(modules: set[str], packages: tuple[str, ...]) -> list[str]:
    """Which of ``packages`` (or modules of theirs) ``modules`` holds."""
    return [p for p in packages if any(m == p or m.startswith(f"{p}.") for m in modules)]


def test_the_command_line_imports_no_command_until_one_runs(tmp_path: Path) -> None:
    modules = modules_at_exit(tmp_path, "--version")
    assert loaded(modules, ("click",)) == ["click"]
    commands_own = ("rich", "pydantic", "prometheus_client")
    assert loaded(modules, (*STORE_CLIENTS, *SERVER_AND_SIGNING, *commands_own)) == []


def test_pull_from_s3_imports_botocore_and_no_other_client_nor_path(
    bucket: Bucket, tmp_path: Path, cache_dir: Path
) -> None:
    bucket.upload("sql", adapter(tmp_path / "sql"))
    modules = modules_at_exit(
        tmp_path,
        *("pull", "sql", "--base-model", BASE_MODEL),
        VLLM_LORA_RESOLVER_S3_URI=bucket.uri,
        VLLM_LORA_RESOLVER_CACHE_DIR=str(cache_dir),
    )
    assert loaded(modules, STORE_CLIENTS) == ["botocore"]
    assert loaded(modules, SERVER_AND_SIGNING) == []


def test_pull_from_a_folder_imports_no_store_client(tmp_path: Path, cache_dir: Path) -> None:
    adapter(tmp_path / "adapters" / "sql")
    modules = modules_at_exit(
        tmp_path,
        *("pull", "sql", "--base-model", BASE_MODEL),
        VLLM_LORA_RESOLVER_FS_DIR=str(tmp_path / "adapters"),
        VLLM_LORA_RESOLVER_CACHE_DIR=str(cache_dir),
    )
    assert loaded(modules, (*STORE_CLIENTS, *SERVER_AND_SIGNING)) == []


# -- cache ----------------------------------------------------------------------------------


def test_cache_ls_shows_snapshots_and_the_pids_leasing_them(
    held: subprocess.Popen[str], adapters_dir: Path, cache_dir: Path
) -> None:
    adapter(adapters_dir / "idle", seed=2)
    cache_a(adapters_dir, cache_dir, "idle")
    result = vllm_lora("cache", "--cache-dir", str(cache_dir), "ls")
    assert result.returncode == 0, result.stderr
    rows = listing_rows(result.stdout)
    assert f"PID {held.pid}" in rows["held"]
    assert "file://" in rows["held"]
    assert rows["idle"].rstrip().endswith("-")
    assert "2 snapshots" in result.stdout


def test_prune_evicts_down_to_the_size_but_never_a_leased_snapshot(
    held: subprocess.Popen[str], adapters_dir: Path, cache_dir: Path
) -> None:
    adapter(adapters_dir / "idle", seed=2)
    idle = cache_a(adapters_dir, cache_dir, "idle")
    result = vllm_lora(
        "cache", "prune", "--max-bytes", "0", VLLM_LORA_RESOLVER_CACHE_DIR=str(cache_dir)
    )
    assert result.returncode == 0, result.stderr
    assert "evicted idle" in result.stdout
    assert "every snapshot left is leased by a live process (held)" in result.stdout
    assert not idle.exists()
    assert len(snapshot_dirs(cache_dir)) == 1
    assert (cache_dir / "held").resolve().is_dir()


def test_prune_without_a_size_uses_the_configured_cap(adapters_dir: Path, cache_dir: Path) -> None:
    adapter(adapters_dir / "a", seed=1)
    cache_a(adapters_dir, cache_dir, "a")
    assert vllm_lora("cache", "--cache-dir", str(cache_dir), "prune").returncode == 2
    result = vllm_lora(
        "cache",
        "--cache-dir",
        str(cache_dir),
        "prune",
        VLLM_LORA_RESOLVER_CACHE_MAX_BYTES="1GiB",
    )
    assert result.returncode == 0
    assert "1 snapshot," in result.stdout
    assert len(snapshot_dirs(cache_dir)) == 1


def test_cache_verify_names_the_damaged_snapshot_and_file(
    adapters_dir: Path, cache_dir: Path
) -> None:
    adapter(adapters_dir / "sql")
    snapshot = cache_a(adapters_dir, cache_dir, "sql")
    intact = vllm_lora("cache", "--cache-dir", str(cache_dir), "verify")
    assert intact.returncode == 0
    assert "1 snapshot, 2 files intact" in intact.stdout
    weights = snapshot / "adapter_model.safetensors"
    weights.chmod(0o644)
    with weights.open("r+b") as stream:
        stream.seek(100)
        byte = stream.read(1)
        stream.seek(100)
        stream.write(bytes([byte[0] ^ 0xFF]))
    damaged = vllm_lora("cache", "--cache-dir", str(cache_dir), "verify")
    assert damaged.returncode == 1
    key = snapshot.parent.name
    assert f"snapshot {key} of 'sql': adapter_model.safetensors: CRC32C" in damaged.stdout
    assert "1 damaged file" in damaged.stdout


def test_cache_verify_reports_a_fifo_or_device_in_a_tampered_manifest_without_opening_it(
    adapters_dir: Path, cache_dir: Path
) -> None:
    adapter(adapters_dir / "sql")
    snapshot = cache_a(adapters_dir, cache_dir, "sql")
    snapshot.chmod(0o755)
    os.mkfifo(snapshot / "pipe")  # reading it would wait for a writer forever
    (snapshot / "zeros").symlink_to("/dev/zero")  # reading it would never end
    manifest_path = snapshot.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"] += [
        {"path": name, "size": 0, "crc32c": "00000000"} for name in ("pipe", "zeros")
    ]
    manifest_path.write_text(json.dumps(manifest))
    result = subprocess.run(
        [str(CLI), "cache", "--cache-dir", str(cache_dir), "verify"],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1, result.stderr
    assert "pipe: not a regular file" in result.stdout
    assert "zeros: not a regular file" in result.stdout
    assert "2 damaged files" in result.stdout


def test_validate_pull_and_cache_ls_escape_control_characters_they_print(
    tmp_path: Path, adapters_dir: Path, cache_dir: Path
) -> None:
    forged = "\x1b[2J\nPASS forged"
    config = {"base_model_name_or_path": f"/models/x{forged}"}
    validated = vllm_lora("validate", str(adapter(tmp_path / "sql", extra_config=config)))
    pulled = vllm_lora(
        "pull",
        f"evil{forged}",
        "--base-model",
        BASE_MODEL,
        VLLM_LORA_RESOLVER_FS_DIR=str(adapters_dir),
        VLLM_LORA_RESOLVER_CACHE_DIR=str(cache_dir),
    )
    adapter(adapters_dir / "sql")
    snapshot = cache_a(adapters_dir, cache_dir, "sql").parent
    manifest = json.loads((snapshot / "manifest.json").read_text())
    manifest.update(name=f"evil{forged}", source=f"file:///x{forged}")  # forged, key and all
    (snapshot / "manifest.json").write_text(json.dumps(manifest))
    key = snapshot_key(manifest["source"], manifest["name"], manifest["version"])
    snapshot.rename(snapshot.with_name(key))
    listed = vllm_lora("cache", "--cache-dir", str(cache_dir), "ls")
    assert (validated.returncode, pulled.returncode, listed.returncode) == (0, 1, 0)
    for run in (validated, pulled, listed):
        printed = run.stdout + run.stderr
        assert "\x1b" not in printed
        assert not any(line.startswith("PASS forged") for line in printed.splitlines())
        assert "\\x1b[2J\\nPASS forged" in printed


# -- doctor ---------------------------------------------------------------------------------


def test_doctor_reports_misconfigurations_with_fixes_and_never_a_secret(
    bucket: Bucket, cache_dir: Path
) -> None:
    result = vllm_lora(
        "doctor",
        VLLM_LORA_RESOLVER_S3_URI=bucket.uri,
        VLLM_LORA_RESOLVER_GCS_URI="gs://somewhere/adapters",
        VLLM_LORA_RESOLVER_CACHE_DIR=str(cache_dir),
        VLLM_PLUGINS="lora_filesystem_resolver,lora_s3_resolver",
        HF_TOKEN=HF_SECRET,
        GOOGLE_APPLICATION_CREDENTIALS=SECRET,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert SECRET not in output and HF_SECRET not in output
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in output
    assert "HF_TOKEN                                 set" in output
    assert "FAIL VLLM_ALLOW_RUNTIME_LORA_UPDATING is not true" in output
    assert "fix: export VLLM_ALLOW_RUNTIME_LORA_UPDATING=true" in output
    assert "WARN vLLM's lora_filesystem_resolver is tried before lora_s3_resolver" in output
    assert "FAIL VLLM_LORA_RESOLVER_GCS_URI is set but VLLM_PLUGINS does not list" in output
    assert "fix: VLLM_PLUGINS=lora_s3_resolver,lora_gcs_resolver,lora_filesystem_resolver" in output
    assert f"OK   lora_s3_resolver: {bucket.uri}" in output


def test_credentials_in_a_store_endpoint_are_never_printed_nor_cached(
    bucket: Bucket, tmp_path: Path, cache_dir: Path
) -> None:
    bucket.upload("sql", adapter(tmp_path / "sql"))
    configured = {
        "AWS_ENDPOINT_URL_S3": bucket.relay.url.replace("http://", f"http://user:{SECRET}@"),
        "AWS_ENDPOINT_URL": f"{bucket.relay.url}/?token={SECRET}",
        "VLLM_LORA_RESOLVER_S3_URI": bucket.uri,
        "VLLM_LORA_RESOLVER_CACHE_DIR": str(cache_dir),
    }
    pulled = vllm_lora("--verbose", "pull", "sql", "--base-model", BASE_MODEL, **configured)
    assert pulled.returncode == 0, pulled.stderr
    listed = vllm_lora("cache", "ls", **configured)
    diagnosed = vllm_lora("doctor", **configured)
    assert f"OK   lora_s3_resolver: {bucket.uri}@{bucket.relay.url} answered" in diagnosed.stdout
    for run in (pulled, listed, diagnosed):
        assert SECRET not in run.stdout + run.stderr
    manifests = (cache_dir / ".vllm-lora" / "snapshots").glob("*/manifest.json")
    assert all(SECRET not in manifest.read_text() for manifest in manifests)


def doctor_of(bucket: Bucket, cache_dir: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    """``vllm-lora doctor`` of a healthy server whose one store is ``bucket``."""
    return vllm_lora(
        "doctor",
        *arguments,
        VLLM_ALLOW_RUNTIME_LORA_UPDATING="true",
        VLLM_LORA_RESOLVER_S3_URI=bucket.uri,
        VLLM_LORA_RESOLVER_CACHE_DIR=str(cache_dir),
        VLLM_PLUGINS="lora_s3_resolver,lora_filesystem_resolver",
    )


def test_doctor_passes_a_healthy_setup_and_shows_the_try_order(
    bucket: Bucket, cache_dir: Path
) -> None:
    result = doctor_of(bucket, cache_dir)
    assert result.returncode == 0, result.stdout
    lines = result.stdout.splitlines()
    first = next(line for line in lines if line.startswith("  1."))
    second = next(line for line in lines if line.startswith("  2."))
    assert "lora_s3_resolver" in first and "lora_filesystem_resolver" in second
    assert "0 failed" in result.stdout


def test_doctor_checks_conditional_writes_only_when_asked_to_write(
    bucket: Bucket, cache_dir: Path
) -> None:
    read_only = doctor_of(bucket, cache_dir)
    assert read_only.returncode == 0, read_only.stdout
    assert "conditional writes" not in read_only.stdout
    assert bucket.requests() == bucket.requests("GET")  # a server's credentials only read

    bucket.relay.reset_counters()
    checked = doctor_of(bucket, cache_dir, "--check-writes")
    assert checked.returncode == 0, checked.stdout
    assert (
        f"OK   lora_s3_resolver: {bucket.uri}@{bucket.relay.url} refuses writes whose condition "
        "does not hold: `vllm-lora publish` detects a publisher racing it"
    ) in checked.stdout
    assert len(bucket.requests("PUT")) == 4
    listing = bucket.endpoint.client().list_objects_v2(Bucket=bucket.name)
    assert [item["Key"] for item in listing["Contents"]] == [f"adapters/{PROBE_FILE}"]

    bucket.relay.add_fault(Fault("status", method="PUT", status=403, code="AccessDenied"))
    refused = doctor_of(bucket, cache_dir, "--check-writes")
    assert refused.returncode == 0, refused.stdout  # a warning: read-only is as it should be
    assert (
        "WARN lora_s3_resolver: conditional writes not checked: writing "
        f"s3://{bucket.name}/adapters/{PROBE_FILE} failed: AccessDenied (HTTP 403)"
    ) in refused.stdout
    fix = "fix: run `vllm-lora doctor --check-writes` with the credentials `vllm-lora publish`"
    assert fix in refused.stdout


def test_doctor_fails_a_store_that_ignores_conditional_writes(
    unconditional_bucket: Bucket, cache_dir: Path
) -> None:
    result = doctor_of(unconditional_bucket, cache_dir, "--check-writes")
    assert result.returncode == 1
    assert (
        f"FAIL lora_s3_resolver: {unconditional_bucket.uri}@{unconditional_bucket.relay.url} "
        "ignores conditional writes: it carried out a create-only write over an existing object "
        "and a write conditional on an ETag or generation it no longer had; `vllm-lora publish` "
        "would not detect a publisher racing it, and refuses the store unless "
        "--allow-unconditional-store"
    ) in result.stdout
    fix = "fix: publish from one place at a time, with `vllm-lora publish --allow-unconditional"
    assert fix in result.stdout


def test_doctor_fails_when_a_store_cannot_be_read(bucket: Bucket, cache_dir: Path) -> None:
    result = vllm_lora(
        "doctor",
        VLLM_ALLOW_RUNTIME_LORA_UPDATING="1",
        VLLM_LORA_RESOLVER_S3_URI=f"s3://no-such-bucket-{bucket.name}",
        VLLM_LORA_RESOLVER_CACHE_DIR=str(cache_dir),
    )
    assert result.returncode == 1
    assert "FAIL lora_s3_resolver: listing s3://no-such-bucket" in result.stdout
    assert "NoSuchBucket" in result.stdout


def test_doctor_only_looks_at_a_missing_cache_and_says_vllm_would_not_start(
    tmp_path: Path, adapters_dir: Path
) -> None:
    missing = tmp_path / "missing-cache"
    result = vllm_lora(
        "doctor",
        VLLM_ALLOW_RUNTIME_LORA_UPDATING="true",
        VLLM_LORA_RESOLVER_FS_DIR=str(adapters_dir),
        VLLM_LORA_RESOLVER_CACHE_DIR=str(missing),
    )
    assert result.returncode == 1
    assert (
        f"FAIL the cache {missing} does not exist: vLLM's lora_filesystem_resolver" in result.stdout
    )
    assert f"fix: mkdir -p {missing}" in result.stdout
    assert "OK   lora_fs_resolver" in result.stdout
    assert not missing.exists()


def test_the_command_runs_without_vllm(tmp_path: Path) -> None:
    without_vllm = (
        "import sys; sys.modules['vllm'] = None; from vllm_lora_resolvers.cli import main; main()"
    )
    for arguments in (["validate", str(adapter(tmp_path / "sql"))], ["doctor"]):
        result = subprocess.run(
            [sys.executable, "-c", without_vllm, *arguments],
            check=False,
            capture_output=True,
            text=True,
            env={**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true"},
            timeout=60,
        )
        assert "Traceback" not in result.stderr, result.stderr
    assert "vLLM                                     not installed" in result.stdout


# -- what Linux tells ------------------------------------------------------------------------


def test_a_cache_on_a_network_mount_is_recognised(tmp_path: Path) -> None:
    share = tmp_path.resolve() / "a share"
    share.mkdir()
    escaped = str(share).replace(" ", "\\040")  # as /proc/mounts writes a space
    mounts = f"/dev/vda / ext4 rw 0 0\nserver:/export {escaped} nfs4 rw 0 0\n"
    assert filesystem_type(share / "not-yet" / "cache", mounts) == "nfs4"
    assert filesystem_type(tmp_path, mounts) == "ext4"
    assert is_network_filesystem("nfs4") and is_network_filesystem("fuse.gcsfuse")
    assert not is_network_filesystem("ext4")


def test_flock_holders_are_read_from_proc_locks() -> None:
    locks = (
        "1: FLOCK  ADVISORY  READ 41 fe:01:77 0 EOF\n"
        "1: -> FLOCK  ADVISORY  WRITE 43 fe:01:77 0 EOF\n"
        "2: FLOCK  ADVISORY  READ 42 fe:01:77 0 EOF\n"
        "3: POSIX  ADVISORY  WRITE 44 fe:01:78 0 EOF\n"
    )
    assert flock_holders(locks) == {(254, 1, 77): [41, 42]}


def test_the_exit_hook_is_registered_once_however_many_commands_a_process_runs() -> None:
    script = """
import atexit, gc
from click.testing import CliRunner
from vllm_lora_resolvers.cli import main

frozen = []
freeze = gc.freeze
gc.freeze = lambda: frozen.append(freeze())
atexit.register(lambda: print("frozen", len(frozen)))  # registered first: runs last
for _ in range(3):
    assert CliRunner().invoke(main, ["cache", "--help"]).exit_code == 0
"""
    ran = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert ran.stdout.splitlines()[-1] == "frozen 1"
