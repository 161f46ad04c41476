"""Signatures on the command line: ``vllm-lora publish --sign-key`` (and with a certificate) to an
S3 bucket (SeaweedFS), what ``validate`` shows and checks, ``pull`` under
``VLLM_LORA_RESOLVER_TRUST``, and the replays of a signed version (another name: refused; another
version of the same name: served, as a rollback is)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import BASE_MODEL, files_of, sha256_of, vllm_lora
from model_signing import verifying
from s3_fixtures import Bucket
from signing_support import (  # noqa: F401 - keys_fixture: the fixture
    SIGNATURE,
    KeyPair,
    authority,
    issue,
    key_pair,
    keys_fixture,
    sign_with_certificate,
    sign_with_key,
)

from devtools.models import write_lora_adapter
from vllm_lora_resolvers.backends.published import POINTER_FILE
from vllm_lora_resolvers.errors import SignatureError

WEIGHTS = "adapter_model.safetensors"


def adapter(folder: Path, seed: int = 0) -> Path:
    return write_lora_adapter(folder, base_model=BASE_MODEL, seed=seed)


def checks(result: subprocess.CompletedProcess[str]) -> dict[str, dict[str, str | None]]:
    report = json.loads(result.stdout)
    return {check["check"]: check for check in report["checks"]}


def publish(
    bucket: Bucket, folder: Path, *options: str, **variables: str
) -> subprocess.CompletedProcess[str]:
    """``vllm-lora publish FOLDER`` as adapter ``sql`` of ``bucket``, with ``options``."""
    return vllm_lora("publish", str(folder), f"{bucket.uri}/sql", *options, **variables)


def download_version(bucket: Bucket, version: str, folder: Path) -> Path:
    """The files of version ``version`` of ``sql`` (its signature too), as they are in the
    bucket, copied into the new ``folder``."""
    client = bucket.endpoint.client()
    folder.mkdir(parents=True)
    for name in ("adapter_config.json", WEIGHTS, SIGNATURE):
        key = f"adapters/sql/_versions/{version}/{name}"
        (folder / name).write_bytes(client.get_object(Bucket=bucket.name, Key=key)["Body"].read())
    return folder


def published_version(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr + result.stdout
    return result.stdout.split("version ", 1)[1].split()[0]


# -- validate ------------------------------------------------------------------------------------


def test_validate_shows_who_signed_and_checks_it_against_the_trust(
    tmp_path: Path, keys: KeyPair
) -> None:
    folder = adapter(tmp_path / "sql-expert")
    unsigned = vllm_lora("validate", str(folder))
    assert unsigned.returncode == 0, unsigned.stdout
    assert "SKIP signature: unsigned (no model.sig); VLLM_LORA_RESOLVER_TRUST is unset" in (
        unsigned.stdout
    )
    refused = vllm_lora("validate", str(folder), "--json", VLLM_LORA_RESOLVER_TRUST=keys.trust)
    assert refused.returncode == 1
    assert "is not signed" in str(checks(refused)["signature"]["problem"])

    sign_with_key(folder, keys)
    shown = vllm_lora("validate", str(folder))
    assert shown.returncode == 0, shown.stdout
    assert "signed by a key (SHA-256 hint " in shown.stdout
    assert "as 'sql-expert'; not checked: VLLM_LORA_RESOLVER_TRUST is unset" in shown.stdout
    checked = vllm_lora("validate", str(folder), VLLM_LORA_RESOLVER_TRUST=keys.trust)
    assert checked.returncode == 0, checked.stdout
    assert f"PASS signature: signed by key {keys.public}, as 'sql-expert'" in checked.stdout
    other = key_pair(tmp_path / "other", "other")
    untrusted = vllm_lora("validate", str(folder), VLLM_LORA_RESOLVER_TRUST=other.trust)
    assert untrusted.returncode == 1
    assert "not signed by a signer this server trusts" in untrusted.stdout


def test_validate_names_the_signing_certificate(tmp_path: Path) -> None:
    ca = authority(tmp_path / "ca")
    folder = adapter(tmp_path / "sql-expert")
    sign_with_certificate(folder, issue(ca, tmp_path / "pipeline"))
    shown = vllm_lora("validate", str(folder))
    assert "signed by certificate CN=release-pipeline,O=Test Org, as 'sql-expert'" in shown.stdout
    checked = vllm_lora("validate", str(folder), VLLM_LORA_RESOLVER_TRUST=ca.trust)
    assert checked.returncode == 0, checked.stdout
    assert "PASS signature: signed by certificate CN=release-pipeline,O=Test Org" in checked.stdout


def test_validate_of_a_uri_fetches_the_signature_and_checks_it(
    bucket: Bucket, tmp_path: Path, keys: KeyPair
) -> None:
    folder = adapter(tmp_path / "sql")
    sign_with_key(folder, keys)
    bucket.upload("sql", folder)
    shown = vllm_lora("validate", f"{bucket.uri}/sql", "--base-model", BASE_MODEL)
    assert shown.returncode == 0, shown.stdout
    assert "signed by a key (SHA-256 hint" in shown.stdout
    other = key_pair(tmp_path / "other", "other")
    refused = vllm_lora(
        "validate", f"{bucket.uri}/sql", "--json", VLLM_LORA_RESOLVER_TRUST=other.trust
    )
    assert refused.returncode == 1
    assert "not signed by a signer this server trusts" in str(
        checks(refused)["signature"]["problem"]
    )


# -- publish -------------------------------------------------------------------------------------


def test_publish_signs_the_version_and_every_name_of_it_verifies(
    bucket: Bucket, tmp_path: Path, cache_dir: Path, keys: KeyPair
) -> None:
    v1, v2 = adapter(tmp_path / "out-1", seed=1), adapter(tmp_path / "out-2", seed=2)
    first = published_version(publish(bucket, v1, "--sign-key", str(keys.private)))
    published = publish(bucket, v2, "--sign-key", str(keys.private))
    second = published_version(published)
    assert "uploaded: adapter_config.json, adapter_model.safetensors, model.sig" in published.stdout
    assert "signed by: a key (SHA-256 hint" in published.stdout
    assert "as 'sql'" in published.stdout  # the name's, not the folder's ("out-2")

    pointer = json.loads(
        bucket.endpoint.client()
        .get_object(Bucket=bucket.name, Key=f"adapters/sql/{POINTER_FILE}")["Body"]
        .read()
    )
    assert SIGNATURE in [file["path"] for file in pointer["files"]]

    resolver = bucket.resolver(cache_dir, VLLM_LORA_RESOLVER_TRUST=keys.trust)
    now, pinned = (resolver.resolve(BASE_MODEL, name) for name in ("sql", f"sql@{first}"))
    assert now is not None and pinned is not None
    assert files_of(now.path)[WEIGHTS] == sha256_of(v2 / WEIGHTS)
    assert files_of(pinned.path)[WEIGHTS] == sha256_of(v1 / WEIGHTS)

    # model-signing's own verifier accepts the version folder as it is in the bucket.
    folder = download_version(bucket, second, tmp_path / "downloaded" / "sql")
    verifying.Config().use_elliptic_key_verifier(public_key=keys.public).verify(
        folder, folder / SIGNATURE
    )

    # Rolled back, the name resolves to the first version, signed as it was.
    assert vllm_lora("publish", "--rollback", f"{bucket.uri}/sql").returncode == 0
    rolled = bucket.resolver(tmp_path / "fresh", VLLM_LORA_RESOLVER_TRUST=keys.trust).resolve(
        BASE_MODEL, "sql"
    )
    assert rolled is not None and files_of(rolled.path)[WEIGHTS] == sha256_of(v1 / WEIGHTS)

    # Publishing the first version again with the same key uploads nothing new.
    again = publish(bucket, v1, "--sign-key", str(keys.private))
    assert again.returncode == 0, again.stderr
    assert "uploaded:" not in again.stdout


def test_publish_with_a_certificate(bucket: Bucket, tmp_path: Path, cache_dir: Path) -> None:
    ca = authority(tmp_path / "ca")
    signer = issue(ca, tmp_path / "pipeline")
    result = publish(
        bucket,
        adapter(tmp_path / "out"),
        "--sign-key",
        str(signer.key),
        "--sign-cert",
        str(signer.certificate),
        "--sign-chain",
        str(signer.chain),
    )
    published_version(result)
    assert "signed by: certificate CN=release-pipeline,O=Test Org, as 'sql'" in result.stdout
    resolver = bucket.resolver(cache_dir, VLLM_LORA_RESOLVER_TRUST=ca.trust)
    assert resolver.resolve(BASE_MODEL, "sql") is not None


def test_publish_refuses_a_signature_its_trust_would_refuse(
    bucket: Bucket, tmp_path: Path, keys: KeyPair
) -> None:
    other = key_pair(tmp_path / "other", "other")
    result = publish(
        bucket,
        adapter(tmp_path / "out"),
        "--sign-key",
        str(other.private),
        VLLM_LORA_RESOLVER_TRUST=keys.trust,
    )
    assert result.returncode == 1
    assert "servers with this VLLM_LORA_RESOLVER_TRUST would refuse the signature" in result.stderr
    listing = bucket.endpoint.client().list_objects_v2(Bucket=bucket.name)
    assert listing.get("Contents", []) == []


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        (["--sign-cert", "CERT"], "--sign-cert needs --sign-key"),
        (["--sign-sigstore", "--sign-key", "KEY"], "--sign-sigstore signs keyless"),
        (["--sigstore-trust-config", "CERT"], "--sigstore-trust-config goes with --sign-sigstore"),
    ],
)
def test_publish_signing_options_that_clash_are_usage_errors(
    tmp_path: Path, keys: KeyPair, options: list[str], problem: str
) -> None:
    files = {"KEY": str(keys.private), "CERT": str(keys.public)}
    arguments = [files.get(option, option) for option in options]
    result = vllm_lora("publish", str(tmp_path), "s3://bucket/adapters/sql", *arguments)
    assert result.returncode == 2
    assert problem in result.stderr


# -- replays -------------------------------------------------------------------------------------


def test_a_signed_version_copied_to_another_name_is_refused(
    bucket: Bucket, tmp_path: Path, cache_dir: Path, keys: KeyPair
) -> None:
    version = published_version(
        publish(bucket, adapter(tmp_path / "out"), "--sign-key", str(keys.private))
    )
    # Someone with write access copies the signed version folder to another adapter's.
    bucket.upload("support-bot", download_version(bucket, version, tmp_path / "copy"))
    resolver = bucket.resolver(cache_dir, VLLM_LORA_RESOLVER_TRUST=keys.trust)
    with pytest.raises(SignatureError, match="it was signed as 'sql', not 'support-bot'"):
        resolver.resolve(BASE_MODEL, "support-bot")


def test_a_signed_version_published_again_as_another_version_of_its_name_is_served(
    bucket: Bucket, tmp_path: Path, cache_dir: Path, keys: KeyPair
) -> None:
    # Versions are not bound: an old signed version brought back under a new version name is
    # served, as a rollback is (docs/security.md says so).
    old = adapter(tmp_path / "release" / "sql", seed=1)
    sign_with_key(old, keys)
    for version in ("v1", "v3"):
        result = publish(bucket, old, "--version", version)
        assert result.returncode == 0, result.stderr
    resolver = bucket.resolver(cache_dir, VLLM_LORA_RESOLVER_TRUST=keys.trust)
    resolved = resolver.resolve(BASE_MODEL, "sql")
    assert resolved is not None and resolved.snapshot.manifest.version.startswith("v3:")


# -- pull ----------------------------------------------------------------------------------------


def test_pull_refuses_what_the_server_would_refuse(
    tmp_path: Path, cache_dir: Path, keys: KeyPair
) -> None:
    adapters = tmp_path / "adapters"
    sign_with_key(adapter(adapters / "signed"), keys)
    adapter(adapters / "plain")
    result = vllm_lora(
        "pull",
        "signed",
        "plain",
        "--base-model",
        BASE_MODEL,
        VLLM_LORA_RESOLVER_CACHE_DIR=str(cache_dir),
        VLLM_LORA_RESOLVER_FS_DIR=str(adapters),
        VLLM_LORA_RESOLVER_TRUST=keys.trust,
    )
    assert result.returncode == 1
    assert "1 of 2 adapters in the cache" in result.stdout
    assert "plain: adapter 'plain' is not signed" in result.stderr
