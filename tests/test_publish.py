"""Publishing adapter versions to S3 (SeaweedFS) and GCS (fake-gcs-server) with ``vllm-lora
publish``: atomic moves of NAME, NAME@VERSION pins, rollback, and what is refused; the check of a
store's conditional writes, on every store the tests run and on one that ignores them."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from azure_fixtures import AzureContainer
from conftest import BASE_MODEL, CLI, REPO, files_of, vllm_lora
from gcs_fixtures import GcsBucket
from s3_fixtures import Bucket, make_bucket
from workers.resolve_loop import files_digest

from devtools.models import write_lora_adapter
from devtools.relay import Fault
from vllm_lora_resolvers.adapter import CONFIG_FILE
from vllm_lora_resolvers.backends.bucket import PROBE_FILE, BucketStore, ConditionalWrites
from vllm_lora_resolvers.backends.published import POINTER_FILE
from vllm_lora_resolvers.cli.publish import Publisher, content_version
from vllm_lora_resolvers.edge import VllmResolver
from vllm_lora_resolvers.errors import InvalidAdapterError

Store = Bucket | GcsBucket


@pytest.fixture(params=["s3", "gcs"])
def store(request: pytest.FixtureRequest) -> Store:
    """An empty bucket on SeaweedFS or fake-gcs-server, adapters under ``adapters/``."""
    fixture = "bucket" if request.param == "s3" else "gcs_bucket"
    found: Store = request.getfixturevalue(fixture)
    return found


def backend(store: Store) -> str:
    return "s3" if isinstance(store, Bucket) else "gcs"


def adapter(folder: Path, seed: int, **options: object) -> Path:
    return write_lora_adapter(folder, base_model=BASE_MODEL, seed=seed, **options)  # type: ignore[arg-type]


def publisher(store: Store, tmp_path: Path, name: str = "sql") -> Publisher:
    """A publisher of adapter ``name``, with its own scratch cache."""
    return Publisher(store.resolver(tmp_path / "publisher-cache"), name)


def publish(store: Store, tmp_path: Path, folder: Path, version: str | None = None) -> str:
    """Publish ``folder`` as adapter ``sql``; its version."""
    return publisher(store, tmp_path).publish(folder, version).version


def put_object(store: Store, key: str, content: bytes) -> None:
    """Write ``key`` straight to the server (not through the relay)."""
    if isinstance(store, Bucket):
        store.endpoint.client().put_object(Bucket=store.name, Key=key, Body=content)
    else:
        store.client.bucket(store.name).blob(key).upload_from_string(content)


def stored_keys(store: Store | AzureContainer) -> dict[str, str]:
    """Every key of the bucket and its ETag or generation, read straight from the server."""
    if isinstance(store, AzureContainer):
        return {blob.name: blob.etag for blob in store.client.list_blobs()}
    if isinstance(store, Bucket):
        listing = store.endpoint.client().list_objects_v2(Bucket=store.name)
        return {item["Key"]: item["ETag"] for item in listing.get("Contents", [])}
    blobs = store.client.bucket(store.name).list_blobs()
    return {blob.name: str(blob.generation) for blob in blobs}


def test_publish_makes_the_name_resolve_to_the_version_it_uploaded(
    store: Store, tmp_path: Path, cache_dir: Path
) -> None:
    plain = adapter(tmp_path / "plain", seed=0)
    store.upload("sql", plain)  # the plain layout, as it was before publishing
    resolved = store.resolver(cache_dir).resolve(BASE_MODEL, "sql")
    assert resolved is not None and files_of(resolved.path) == files_of(plain)

    v1 = adapter(tmp_path / "v1", seed=1)
    result = vllm_lora("publish", str(v1), f"{store.uri}/sql")
    assert result.returncode == 0, result.stderr
    version = content_version((v1 / CONFIG_FILE, v1 / "adapter_model.safetensors"))
    assert f"published sql: version {version}\n" in result.stdout
    assert f"version folder: {store.uri}/sql/_versions/{version}/" in result.stdout
    assert f"pointer: {store.uri}/sql/{POINTER_FILE}" in result.stdout
    assert f"pinned name: sql@{version}" in result.stdout

    resolved = store.resolver(cache_dir).resolve(BASE_MODEL, "sql")  # the pointer wins
    assert resolved is not None and files_of(resolved.path) == files_of(v1)
    listing = vllm_lora("ls", store.uri)
    assert listing.returncode == 0, listing.stderr
    assert re.search(rf"^sql +{version} ", listing.stdout, re.MULTILINE), listing.stdout
    pinned = vllm_lora("validate", f"{store.uri}/sql@{version}", "--base-model", BASE_MODEL)
    assert pinned.returncode == 0, pinned.stdout
    assert f"{store.uri}/sql/_versions/{version}/" in pinned.stdout
    assert set(stored_keys(store)) == {
        *(f"adapters/sql/{path.name}" for path in plain.iterdir()),
        f"adapters/sql/{POINTER_FILE}",
        *(f"adapters/sql/_versions/{version}/{path.name}" for path in v1.iterdir()),
        f"adapters/sql/{PROBE_FILE}",
    }


def test_a_second_version_moves_the_name_while_the_pin_stays_on_the_first(
    store: Store, tmp_path: Path, cache_dir: Path
) -> None:
    v1, v2 = adapter(tmp_path / "v1", seed=1), adapter(tmp_path / "v2", seed=2)
    first = publish(store, tmp_path, v1)
    resolver = store.resolver(cache_dir)
    before = resolver.resolve(BASE_MODEL, "sql")
    second = publish(store, tmp_path, v2)
    assert second != first
    now, pinned, pinned_now = (
        resolver.resolve(BASE_MODEL, name) for name in ("sql", f"sql@{first}", f"sql@{second}")
    )
    assert before is not None and now is not None and pinned is not None and pinned_now is not None
    assert files_of(before.path) == files_of(pinned.path) == files_of(v1)
    assert files_of(now.path) == files_of(pinned_now.path) == files_of(v2)
    # One version is one snapshot, whichever name reached it.
    assert pinned.snapshot.key == before.snapshot.key
    assert pinned_now.snapshot.key == now.snapshot.key
    assert pinned_now.path == now.path


def test_steady_state_lookups_of_a_published_adapter_are_one_request_each(
    store: Store, tmp_path: Path, cache_dir: Path
) -> None:
    version = publish(store, tmp_path, adapter(tmp_path / "v1", seed=1))
    resolver = store.resolver(cache_dir)
    for name in ("sql", f"sql@{version}"):
        first = resolver.resolve(BASE_MODEL, name)
        store.relay.reset_counters()
        for _ in range(10):
            assert resolver.resolve(BASE_MODEL, name) == first
        assert len(store.requests()) == 10, store.requests()  # one listing each

    publish(store, tmp_path, adapter(tmp_path / "v2", seed=2))
    store.relay.reset_counters()
    assert resolver.resolve(BASE_MODEL, "sql") is not None
    assert len([path for _, path in store.requests() if POINTER_FILE in path]) == 1  # read once
    store.relay.reset_counters()
    assert resolver.resolve(BASE_MODEL, "sql") is not None
    assert len(store.requests()) == 1


def loop_worker(store: Store, cache_dir: Path, stop_file: Path) -> subprocess.Popen[str]:
    """A process resolving ``sql`` from ``store`` again and again until ``stop_file`` appears."""
    command = [sys.executable, str(REPO / "tests" / "workers" / "resolve_loop.py"), backend(store)]
    return subprocess.Popen(
        [*command, store.uri, str(cache_dir), "sql", str(stop_file)],
        stdout=subprocess.PIPE,
        text=True,
    )


def test_eight_processes_resolving_while_versions_are_published_get_whole_versions_only(
    store: Store, tmp_path: Path, cache_dir: Path
) -> None:
    sources = [adapter(tmp_path / f"v{seed}", seed=seed) for seed in range(1, 5)]
    published = {files_digest(source) for source in sources}
    publish(store, tmp_path, sources[0])
    stop_file = tmp_path / "stop"
    workers = [loop_worker(store, cache_dir, stop_file) for _ in range(8)]
    try:
        for worker in workers:  # each has resolved the first version once
            assert worker.stdout is not None and worker.stdout.readline()
        mover = publisher(store, tmp_path)
        for source in sources[1:]:
            mover.publish(source)
            time.sleep(0.3)
        mover.roll_back()
        time.sleep(0.3)
    finally:
        stop_file.touch()
    outputs = [worker.communicate(timeout=60)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0] * 8
    handed_out = [json.loads(line) for output in outputs for line in output.splitlines()]
    digests = [line["digest"] for line in handed_out if "digest" in line]
    assert set(digests) <= published  # every snapshot is exactly one published version
    assert len(set(digests)) >= 3  # and the names did move while they were resolved
    assert sum(line["resolutions"] for line in handed_out if "digest" not in line) > 8 * 5


def test_rollback_moves_the_name_back_and_a_second_one_further_back(
    store: Store, tmp_path: Path, cache_dir: Path
) -> None:
    v1, v2 = adapter(tmp_path / "v1", seed=1), adapter(tmp_path / "v2", seed=2)
    first, second = publish(store, tmp_path, v1), publish(store, tmp_path, v2)
    result = vllm_lora("publish", "--rollback", f"{store.uri}/sql")
    assert result.returncode == 0, result.stderr
    assert f"rolled back sql: version {first} (was {second})\n" in result.stdout
    resolved = store.resolver(cache_dir).resolve(BASE_MODEL, "sql")  # a new server
    assert resolved is not None and files_of(resolved.path) == files_of(v1)

    again = vllm_lora("publish", "--rollback", f"{store.uri}/sql")
    assert again.returncode == 1
    assert "'sql' has no previous version; roll back with --to VERSION" in again.stderr
    forward = vllm_lora("publish", "--rollback", "--to", second, f"{store.uri}/sql")
    assert forward.returncode == 0, forward.stderr
    resolved = store.resolver(tmp_path / "another-cache").resolve(BASE_MODEL, "sql")
    assert resolved is not None and files_of(resolved.path) == files_of(v2)


def test_rollback_to_a_version_that_does_not_exist_is_refused(store: Store, tmp_path: Path) -> None:
    publish(store, tmp_path, adapter(tmp_path / "v1", seed=1))
    before = stored_keys(store)
    result = vllm_lora("publish", "--rollback", "--to", "nope", f"{store.uri}/sql")
    assert result.returncode == 1
    assert f"version 'nope' of 'sql' does not exist: {store.uri}/sql/_versions/nope/" in (
        result.stderr
    )
    nothing = vllm_lora("publish", "--rollback", f"{store.uri}/never-published")
    assert nothing.returncode == 1
    assert "nothing was published as 'never-published'" in nothing.stderr
    assert stored_keys(store) == before


def test_a_version_is_never_overwritten_and_publishing_it_again_uploads_nothing(
    store: Store, tmp_path: Path, cache_dir: Path
) -> None:
    v1, v2 = adapter(tmp_path / "v1", seed=1), adapter(tmp_path / "v2", seed=2)
    assert publish(store, tmp_path, v1, "release") == "release"
    before = stored_keys(store)
    other = vllm_lora("publish", "--version", "release", str(v2), f"{store.uri}/sql")
    assert other.returncode == 1
    assert "versions are never overwritten; publish with another --version" in other.stderr
    assert stored_keys(store) == before

    store.relay.reset_counters()
    same = vllm_lora("publish", "--version", "release", str(v1), f"{store.uri}/sql")
    assert same.returncode == 0, same.stderr
    assert "sql is at version release already: nothing to move" in same.stdout
    assert [method for method, _ in store.requests()].count("GET") == len(store.requests())
    assert stored_keys(store) == before
    resolved = store.resolver(cache_dir).resolve(BASE_MODEL, "sql@release")
    assert resolved is not None and files_of(resolved.path) == files_of(v1)


def test_an_invalid_folder_is_refused_before_anything_is_uploaded(
    store: Store, tmp_path: Path
) -> None:
    folder = adapter(tmp_path / "big", seed=1, rank=64)
    result = vllm_lora("publish", str(folder), f"{store.uri}/sql")
    assert result.returncode == 1
    assert "rank 64 is above this server's limit of 16" in result.stderr
    assert "is not a valid adapter; nothing was uploaded" in result.stderr
    assert store.requests() == []
    assert stored_keys(store) == {}


def test_a_malformed_pointer_is_an_invalid_adapter_and_a_publish_replaces_it(
    store: Store, tmp_path: Path, cache_dir: Path
) -> None:
    publish(store, tmp_path, adapter(tmp_path / "v1", seed=1))
    pointer_key = f"adapters/sql/{POINTER_FILE}"
    for content, reason in [
        (b"{not json", "Invalid JSON"),
        (json.dumps({"format": 2}).encode(), "format: Input should be 1"),
        (
            json.dumps(
                {"format": 1, "version": "../x", "files": [], "history": [], "updated_at": 0}
            ).encode(),
            "version: Value error, not a version name",
        ),
    ]:
        put_object(store, pointer_key, content)
        with pytest.raises(InvalidAdapterError) as raised:
            store.resolver(cache_dir).resolve(BASE_MODEL, "sql")
        message = str(raised.value)
        assert f"{store.uri}/sql/{POINTER_FILE} is not a valid adapter pointer" in message
        assert reason in message
        assert "vllm-lora publish" in message
        with pytest.raises(InvalidAdapterError) as answered:  # what an API client reads
            asyncio.run(VllmResolver(store.resolver(cache_dir)).resolve_lora(BASE_MODEL, "sql"))
        assert "adapter 'sql': <the store> is not a valid adapter pointer" in str(answered.value)
        assert store.uri.split("://")[1].split("/")[0] not in str(answered.value)  # no bucket

    v2 = adapter(tmp_path / "v2", seed=2)
    result = vllm_lora("publish", str(v2), f"{store.uri}/sql")
    assert result.returncode == 0, result.stderr
    assert "is not a valid adapter pointer" in result.stderr  # said, then replaced
    resolved = store.resolver(cache_dir).resolve(BASE_MODEL, "sql")
    assert resolved is not None and files_of(resolved.path) == files_of(v2)


def test_hostile_versions_in_pinned_names_never_reach_the_store(
    store: Store, tmp_path: Path, cache_dir: Path
) -> None:
    publish(store, tmp_path, adapter(tmp_path / "v1", seed=1))
    resolver = store.resolver(cache_dir)
    store.relay.reset_counters()
    hostile = ["sql@..", "sql@a/b", "sql@", "sql@_versions", "sql@.", "sql@v1@v2", "sql@a\0b"]
    hostile += ["sql/_versions/v1", "sql@" + "v" * 129, "sql@%2e%2e", "sql@a/../b"]
    for name in hostile:
        assert resolver.resolve(BASE_MODEL, name) is None, name
    assert store.requests() == []


def test_of_two_publishers_racing_the_one_that_moves_the_pointer_second_is_refused(
    store: Store, tmp_path: Path, cache_dir: Path
) -> None:
    v1, v2, v3 = (adapter(tmp_path / f"v{seed}", seed=seed) for seed in (1, 2, 3))
    first = publish(store, tmp_path, v1)
    racer = publisher(store, tmp_path)
    held_back = 5.0
    if isinstance(store, Bucket):
        pointer_write = Fault("delay", method="PUT", path_contains=POINTER_FILE, seconds=held_back)
    else:  # GCS names the object in the upload's body; the pointer write names its generation
        generation = stored_keys(store)[f"adapters/sql/{POINTER_FILE}"]
        pointer_write = Fault(
            "delay",
            method="POST",
            match=lambda _, path: path.endswith(f"ifGenerationMatch={generation}"),
            seconds=held_back,
        )
    store.relay.reset_counters()
    store.relay.add_fault(pointer_write)
    slow = subprocess.Popen(
        [str(CLI), "publish", str(v2), f"{store.uri}/sql"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not any(pointer_write.matches(*request) for request in store.requests()):
        assert time.monotonic() < deadline and slow.poll() is None, slow.communicate()
        time.sleep(0.05)
    started = time.monotonic()
    third = racer.publish(v3).version  # while the slow one's pointer write is held back
    assert time.monotonic() - started < held_back, "too slow to overtake the held-back write"
    stdout, stderr = slow.communicate(timeout=60)
    assert slow.returncode == 1, stdout
    assert f"{store.uri}/sql/{POINTER_FILE} changed meanwhile (another publisher?)" in stderr
    resolved = store.resolver(cache_dir).resolve(BASE_MODEL, "sql")
    assert resolved is not None and files_of(resolved.path) == files_of(v3)
    current = racer.roll_back()
    assert (current.version, current.previous) == (first, third)  # v2 never became current


def test_ls_explains_the_versions_of_a_publish_that_stopped_before_its_pointer(
    store: Store, tmp_path: Path
) -> None:
    store.upload("half/_versions/v1", adapter(tmp_path / "v1", seed=1))
    listing = vllm_lora("ls", store.uri)
    assert re.search(r"^half/_versions .*unfinished `vllm-lora publish`", listing.stdout, re.M), (
        listing.stdout
    )


# -- stores that ignore conditional writes --------------------------------------------------


@pytest.fixture(params=["seaweedfs", "moto", "gcs", "azure"])
def honouring_store(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Store | AzureContainer]:
    """An empty bucket of each store of the tests, all of which honour conditional writes."""
    if request.param == "moto":
        yield from make_bucket(request.getfixturevalue("moto"), monkeypatch)
    else:
        fixture = {"seaweedfs": "bucket", "gcs": "gcs_bucket", "azure": "azure_container"}
        yield request.getfixturevalue(fixture[request.param])


def writes(store: Store | AzureContainer) -> list[tuple[str, str]]:
    """The write requests the store received (S3's and Azure's PUTs, GCS's POSTs)."""
    return [request for request in store.requests() if request[0] in ("PUT", "POST")]


def bucket_store(store: Store | AzureContainer, tmp_path: Path) -> BucketStore:
    """A new store object of ``store``'s bucket (nothing checked yet)."""
    opened = store.resolver(tmp_path / "cache").store
    assert isinstance(opened, BucketStore)
    return opened


def test_the_check_finds_each_store_of_the_tests_honours_conditional_writes_with_one_object(
    honouring_store: Store | AzureContainer, tmp_path: Path
) -> None:
    store = bucket_store(honouring_store, tmp_path)
    honouring_store.relay.reset_counters()
    found = store.conditional_writes("sql")
    assert found == ConditionalWrites(refuses_overwriting=True, refuses_stale_replacing=True)
    assert found.honoured and found.ignored() == ""
    assert len(writes(honouring_store)) == 4  # created, then three conditional writes
    assert store.conditional_writes("sql") is found  # once per store object
    assert len(writes(honouring_store)) == 4

    honouring_store.relay.reset_counters()
    assert bucket_store(honouring_store, tmp_path).conditional_writes("sql").honoured
    assert len(writes(honouring_store)) == 3  # the probe object is there already
    assert list(stored_keys(honouring_store)) == [f"adapters/sql/{PROBE_FILE}"]


def test_the_check_finds_a_store_that_ignores_conditional_writes(
    unconditional_bucket: Bucket, tmp_path: Path
) -> None:
    found = bucket_store(unconditional_bucket, tmp_path).conditional_writes()
    assert found == ConditionalWrites(refuses_overwriting=False, refuses_stale_replacing=False)
    assert not found.honoured
    assert found.ignored() == (
        "a create-only write over an existing object and a write conditional on an ETag or "
        "generation it no longer had"
    )
    assert list(stored_keys(unconditional_bucket)) == [f"adapters/{PROBE_FILE}"]


def test_publish_refuses_a_store_that_ignores_conditional_writes_unless_allowed(
    unconditional_bucket: Bucket, tmp_path: Path, cache_dir: Path
) -> None:
    v1, v2 = adapter(tmp_path / "v1", seed=1), adapter(tmp_path / "v2", seed=2)
    uri = f"{unconditional_bucket.uri}/sql"
    ignored = (
        f"the store of {uri}/ ignores conditional writes: it carried out a create-only write over "
        "an existing object and a write conditional on an ETag or generation it no longer had, "
        "which it should have refused; a publish or rollback of 'sql' running at the same time "
        "as this one would not be detected, and could be undone without notice"
    )
    refused = vllm_lora("publish", "--version", "v1", str(v1), uri)
    assert refused.returncode == 1, refused.stderr
    assert f"{ignored}. Nothing was published. If only one publisher" in refused.stderr
    assert list(stored_keys(unconditional_bucket)) == [f"adapters/sql/{PROBE_FILE}"]

    allowed = vllm_lora("publish", "--allow-unconditional-store", "--version", "v1", str(v1), uri)
    assert allowed.returncode == 0, allowed.stderr
    assert f"warning: {ignored} (--allow-unconditional-store)" in allowed.stderr
    resolved = unconditional_bucket.resolver(cache_dir).resolve(BASE_MODEL, "sql")
    assert resolved is not None and files_of(resolved.path) == files_of(v1)

    # What still holds there: a version is never overwritten by a later publish (the listing).
    before = stored_keys(unconditional_bucket)
    other = vllm_lora("publish", "--allow-unconditional-store", "--version", "v1", str(v2), uri)
    assert other.returncode == 1
    assert "versions are never overwritten; publish with another --version" in other.stderr
    assert stored_keys(unconditional_bucket) == before
    assert vllm_lora("publish", "--allow-unconditional-store", str(v2), uri).returncode == 0
    rollback = vllm_lora("publish", "--rollback", uri)  # moves the pointer: refused likewise
    assert rollback.returncode == 1 and "ignores conditional writes" in rollback.stderr
