"""Signed adapters (``VLLM_LORA_RESOLVER_TRUST``): what is served and what is refused, with real
signatures made in the test by model-signing (its library and its command line) over adapters
in a directory store (the pipeline is the same for every store: tests/test_signing_stores.py runs
the main cases on each), and what the setting accepts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import BASE_MODEL, files_of, sha256_of, snapshot_dirs
from signing_support import (  # noqa: F401 - keys_fixture: the fixture
    SIGNATURE,
    KeyPair,
    authority,
    issue,
    key_pair,
    keys_fixture,
    sign_with_certificate,
    sign_with_key,
    sign_with_key_cli,
)

from devtools.models import write_lora_adapter
from vllm_lora_resolvers import metrics
from vllm_lora_resolvers.backends.filesystem import FilesystemStore
from vllm_lora_resolvers.cache import NodeCache
from vllm_lora_resolvers.config import ConfigurationError, Settings, TrustedSigner, parse_trust
from vllm_lora_resolvers.errors import SignatureError
from vllm_lora_resolvers.resolver import Resolver
from vllm_lora_resolvers.signing import load_trust

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture
def resolver_with(adapters_dir: Path, cache_dir: Path) -> Callable[..., Resolver]:
    """A resolver of ``adapters_dir`` over ``cache_dir``, as a new server process with
    ``VLLM_LORA_RESOLVER_TRUST=trust`` (``None``: unset) would build it."""

    def make(trust: str | None) -> Resolver:
        environ = {"VLLM_LORA_RESOLVER_CACHE_DIR": str(cache_dir)}
        if trust is not None:
            environ["VLLM_LORA_RESOLVER_TRUST"] = trust
        settings = Settings.from_environ(environ, argv=[])
        return Resolver(FilesystemStore(adapters_dir, settings, NodeCache(cache_dir)))

    return make


def signed_adapter(adapters_dir: Path, name: str, keys: KeyPair, **options: object) -> Path:
    folder = write_lora_adapter(adapters_dir / name, base_model=BASE_MODEL, **options)  # type: ignore[arg-type]
    sign_with_key(folder, keys)
    return folder


def untrusted(count_before: float) -> float:
    return float(metrics.RESOLUTIONS.labels("fs", "untrusted")._value.get()) - count_before


def untrusted_count() -> float:
    return float(metrics.RESOLUTIONS.labels("fs", "untrusted")._value.get())


def refusal(resolver: Resolver, name: str) -> str:
    before = untrusted_count()
    with pytest.raises(SignatureError) as refused:
        resolver.resolve(BASE_MODEL, name)
    assert untrusted(before) == 1  # counted apart from other refusals
    return str(refused.value)


# -- served --------------------------------------------------------------------------------------


def test_an_adapter_signed_by_model_signings_own_command_line_is_served(
    adapters_dir: Path, cache_dir: Path, keys: KeyPair, resolver_with: Callable[..., Resolver]
) -> None:
    folder = write_lora_adapter(adapters_dir / "sql-expert", base_model=BASE_MODEL)
    (folder / "README.md").write_text("trained on SQL\n")  # signed too, never served
    sign_with_key_cli(folder, keys)
    resolved = resolver_with(keys.trust).resolve(BASE_MODEL, "sql-expert")
    assert resolved is not None
    assert set(files_of(resolved.path)) == {"adapter_config.json", WEIGHTS, SIGNATURE}
    assert files_of(resolved.path)[WEIGHTS] == sha256_of(folder / WEIGHTS)
    manifest = json.loads((resolved.snapshot.path / "manifest.json").read_text())
    assert manifest["trust"] == load_trust(resolver_with(keys.trust).settings).fingerprint  # type: ignore[union-attr]
    assert manifest["version"].endswith("+signed")


def test_an_adapter_signed_with_a_certificate_of_a_trusted_ca_is_served(
    adapters_dir: Path, tmp_path: Path, resolver_with: Callable[..., Resolver]
) -> None:
    ca = authority(tmp_path / "ca")
    folder = write_lora_adapter(adapters_dir / "sql-expert", base_model=BASE_MODEL)
    sign_with_certificate(folder, issue(ca, tmp_path / "pipeline"))
    assert resolver_with(ca.trust).resolve(BASE_MODEL, "sql-expert") is not None


def test_any_trusted_signer_will_do(
    adapters_dir: Path, tmp_path: Path, keys: KeyPair, resolver_with: Callable[..., Resolver]
) -> None:
    other = key_pair(tmp_path / "other", "other")
    signed_adapter(adapters_dir, "sql-expert", keys)
    assert resolver_with(f"{other.trust},{keys.trust}").resolve(BASE_MODEL, "sql-expert")


def test_without_trust_nothing_is_checked_and_no_signature_is_fetched(
    adapters_dir: Path, keys: KeyPair, resolver_with: Callable[..., Resolver]
) -> None:
    write_lora_adapter(adapters_dir / "plain", base_model=BASE_MODEL)
    signed_adapter(adapters_dir, "signed", keys)
    resolver = resolver_with(None)
    assert resolver.trust is None
    for name in ("plain", "signed"):
        resolved = resolver.resolve(BASE_MODEL, name)
        assert resolved is not None
        assert SIGNATURE not in files_of(resolved.path)
        assert resolved.snapshot.manifest.trust is None


# -- refused -------------------------------------------------------------------------------------


def test_an_unsigned_adapter_is_refused_with_the_reason(
    adapters_dir: Path, cache_dir: Path, keys: KeyPair, resolver_with: Callable[..., Resolver]
) -> None:
    write_lora_adapter(adapters_dir / "plain", base_model=BASE_MODEL)
    message = refusal(resolver_with(keys.trust), "plain")
    assert "adapter 'plain' is not signed" in message
    assert "VLLM_LORA_RESOLVER_TRUST" in message
    assert snapshot_dirs(cache_dir) == []


def test_a_byte_changed_after_signing_is_refused_before_publishing(
    adapters_dir: Path, cache_dir: Path, keys: KeyPair, resolver_with: Callable[..., Resolver]
) -> None:
    folder = signed_adapter(adapters_dir, "sql-expert", keys)
    weights = bytearray((folder / WEIGHTS).read_bytes())
    weights[-1] ^= 1  # one bit of one tensor: still a well-formed adapter
    (folder / WEIGHTS).write_bytes(bytes(weights))
    message = refusal(resolver_with(keys.trust), "sql-expert")
    assert f"{WEIGHTS} changed after it was signed" in message
    assert snapshot_dirs(cache_dir) == []


def test_a_config_changed_after_signing_is_refused_before_the_weights_are_read(
    adapters_dir: Path, keys: KeyPair, resolver_with: Callable[..., Resolver]
) -> None:
    folder = signed_adapter(adapters_dir, "sql-expert", keys)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["lora_alpha"] = 64  # scales the update 4 times: a different adapter
    (folder / "adapter_config.json").write_text(json.dumps(config))
    assert "adapter_config.json changed after it was signed" in refusal(
        resolver_with(keys.trust), "sql-expert"
    )


def test_a_weights_file_added_after_signing_is_refused(
    adapters_dir: Path, tmp_path: Path, keys: KeyPair, resolver_with: Callable[..., Resolver]
) -> None:
    # Signed with .bin weights; a .safetensors added later is what vLLM would load.
    folder = signed_adapter(adapters_dir, "sql-expert", keys, weights_format="bin")
    other = write_lora_adapter(tmp_path / "other", base_model=BASE_MODEL, seed=9)
    shutil.copy(other / WEIGHTS, folder / WEIGHTS)
    message = refusal(resolver_with(keys.trust), "sql-expert")
    assert f"{WEIGHTS} is not covered by its signature" in message


def test_a_signed_weights_file_removed_so_that_another_signed_one_loads_is_refused(
    adapters_dir: Path, tmp_path: Path, keys: KeyPair, resolver_with: Callable[..., Resolver]
) -> None:
    folder = write_lora_adapter(adapters_dir / "sql-expert", base_model=BASE_MODEL)
    bin_weights = write_lora_adapter(
        tmp_path / "bin", base_model=BASE_MODEL, seed=5, weights_format="bin"
    )
    shutil.copy(bin_weights / "adapter_model.bin", folder / "adapter_model.bin")
    sign_with_key(folder, keys)  # signed with both; vLLM loads the .safetensors
    (folder / WEIGHTS).unlink()
    message = refusal(resolver_with(keys.trust), "sql-expert")
    assert f"it was signed with {WEIGHTS}, which vLLM would load" in message


def test_a_signature_by_an_untrusted_key_is_refused(
    adapters_dir: Path, tmp_path: Path, keys: KeyPair, resolver_with: Callable[..., Resolver]
) -> None:
    signed_adapter(adapters_dir, "sql-expert", key_pair(tmp_path / "mallory", "mallory"))
    message = refusal(resolver_with(keys.trust), "sql-expert")
    assert "not signed by a signer this server trusts" in message


def test_a_damaged_signature_is_refused(
    adapters_dir: Path, keys: KeyPair, resolver_with: Callable[..., Resolver]
) -> None:
    folder = signed_adapter(adapters_dir, "sql-expert", keys)
    bundle = json.loads((folder / SIGNATURE).read_text())
    signature = bundle["dsseEnvelope"]["signatures"][0]
    signature["sig"] = signature["sig"][:-8] + ("A" * 8 if signature["sig"][-8] != "A" else "B" * 8)
    (folder / SIGNATURE).write_text(json.dumps(bundle))
    assert "not signed by a signer this server trusts" in refusal(
        resolver_with(keys.trust), "sql-expert"
    )
    (folder / SIGNATURE).write_text("not json")
    assert f"{SIGNATURE} is not a signature" in refusal(resolver_with(keys.trust), "sql-expert")


def test_an_expired_signing_certificate_is_refused(
    adapters_dir: Path, tmp_path: Path, resolver_with: Callable[..., Resolver]
) -> None:
    ca = authority(tmp_path / "ca")
    folder = write_lora_adapter(adapters_dir / "sql-expert", base_model=BASE_MODEL)
    sign_with_certificate(folder, issue(ca, tmp_path / "pipeline", expired=True))
    message = refusal(resolver_with(ca.trust), "sql-expert")
    assert "its signing certificate (CN=release-pipeline,O=Test Org) expired on" in message


def test_a_certificate_of_another_ca_is_refused(
    adapters_dir: Path, tmp_path: Path, resolver_with: Callable[..., Resolver]
) -> None:
    ours, theirs = authority(tmp_path / "ours"), authority(tmp_path / "theirs", "Other CA")
    folder = write_lora_adapter(adapters_dir / "sql-expert", base_model=BASE_MODEL)
    sign_with_certificate(folder, issue(theirs, tmp_path / "pipeline"))
    assert "not signed by a signer this server trusts" in refusal(
        resolver_with(ours.trust), "sql-expert"
    )


def test_a_signed_adapter_copied_under_another_name_is_refused(
    adapters_dir: Path, keys: KeyPair, resolver_with: Callable[..., Resolver]
) -> None:
    folder = signed_adapter(adapters_dir, "sql-expert", keys)
    shutil.copytree(folder, adapters_dir / "support-bot")  # the replay: same files, same sig
    resolver = resolver_with(keys.trust)
    assert resolver.resolve(BASE_MODEL, "sql-expert") is not None
    message = refusal(resolver, "support-bot")
    assert "it was signed as 'sql-expert', not 'support-bot'" in message


# -- snapshots checked under another trust --------------------------------------------------------


def test_a_snapshot_fetched_unchecked_is_never_what_a_checking_server_serves(
    adapters_dir: Path, cache_dir: Path, keys: KeyPair, resolver_with: Callable[..., Resolver]
) -> None:
    signed_adapter(adapters_dir, "sql-expert", keys)
    unchecked = resolver_with(None).resolve(BASE_MODEL, "sql-expert")
    checked = resolver_with(keys.trust).resolve(BASE_MODEL, "sql-expert")
    assert unchecked is not None and checked is not None
    assert checked.snapshot.key != unchecked.snapshot.key  # with its signature, apart
    assert SIGNATURE in files_of(checked.path)


def test_a_snapshot_checked_under_another_trust_is_checked_again_from_its_bytes(
    adapters_dir: Path, cache_dir: Path, tmp_path: Path, keys: KeyPair,
    resolver_with: Callable[..., Resolver],
) -> None:  # fmt: skip
    signed_adapter(adapters_dir, "sql-expert", keys)
    other = key_pair(tmp_path / "other", "other")
    first = resolver_with(f"{keys.trust},{other.trust}").resolve(BASE_MODEL, "sql-expert")
    assert first is not None
    # Damage the cached weights (as root could): a server trusting the same signers takes the
    # snapshot on the manifest's word; one under another trust checks it again and refuses it.
    weights = first.path / WEIGHTS
    weights.chmod(0o644)
    damaged = bytearray(weights.read_bytes())
    damaged[-1] ^= 1
    weights.write_bytes(bytes(damaged))
    assert resolver_with(f"{keys.trust},{other.trust}").resolve(BASE_MODEL, "sql-expert")
    assert f"{WEIGHTS} changed after it was signed" in refusal(
        resolver_with(keys.trust), "sql-expert"
    )
    assert "not signed by a signer this server trusts" in refusal(
        resolver_with(other.trust), "sql-expert"
    )


def test_a_refused_version_is_answered_from_memory(
    adapters_dir: Path, tmp_path: Path, keys: KeyPair, resolver_with: Callable[..., Resolver]
) -> None:
    signed_adapter(adapters_dir, "sql-expert", key_pair(tmp_path / "mallory", "mallory"))
    resolver = resolver_with(keys.trust)
    first = refusal(resolver, "sql-expert")
    assert refusal(resolver, "sql-expert") == first  # still counted untrusted


def test_sync_sees_a_new_unsigned_version_refused(
    adapters_dir: Path, keys: KeyPair, resolver_with: Callable[..., Resolver]
) -> None:
    signed_adapter(adapters_dir, "sql-expert", keys)
    resolver = resolver_with(keys.trust)
    assert resolver.current(BASE_MODEL, "sql-expert") is not None
    write_lora_adapter(adapters_dir / "sql-expert", base_model=BASE_MODEL, seed=4)
    (adapters_dir / "sql-expert" / SIGNATURE).unlink()
    with pytest.raises(SignatureError, match="is not signed"):
        resolver.current(BASE_MODEL, "sql-expert")


# -- the setting ---------------------------------------------------------------------------------


def test_trust_forms() -> None:
    assert parse_trust("") == ()
    assert parse_trust("key:/k.pub, certificate:/ca.pem") == (
        TrustedSigner("key", Path("/k.pub")),
        TrustedSigner("certificate", Path("/ca.pem")),
    )
    keyless = parse_trust(
        "sigstore:identity=https://github.com/acme/train/.github/workflows/release.yml@refs/heads/"
        "main;issuer=https://token.actions.githubusercontent.com;trust_config=/etc/sigstore/tc.json"
    )
    assert keyless == (
        TrustedSigner(
            "sigstore",
            Path("/etc/sigstore/tc.json"),
            identity="https://github.com/acme/train/.github/workflows/release.yml@refs/heads/main",
            issuer="https://token.actions.githubusercontent.com",
        ),
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("/k.pub", "is not key:PATH, certificate:PATH or sigstore:"),
        ("gpg:/k.asc", "is not key:PATH"),
        ("key:", "is not key:PATH"),
        ("sigstore:identity=a@b.c;issuer=https://x", "lacks trust_config"),
        ("sigstore:identity=a@b.c;issuer=https://x;trust_config=/t;root=/r", "has unknown root"),
    ],
)
def test_a_malformed_trust_entry_is_a_configuration_error(value: str, expected: str) -> None:
    with pytest.raises(ConfigurationError, match="VLLM_LORA_RESOLVER_TRUST") as error:
        Settings.from_environ({"VLLM_LORA_RESOLVER_TRUST": value}, argv=[])
    assert expected in str(error.value)


def test_a_trusted_file_that_is_not_what_its_form_says_is_a_configuration_error(
    tmp_path: Path, cache_dir: Path, keys: KeyPair
) -> None:
    def trust(value: str) -> None:
        load_trust(Settings.from_environ({"VLLM_LORA_RESOLVER_TRUST": value}, argv=[]))

    with pytest.raises(ConfigurationError, match="must be a PEM elliptic-curve public key"):
        trust(f"key:{tmp_path / 'missing.pub'}")
    with pytest.raises(ConfigurationError, match="must be a PEM elliptic-curve public key"):
        trust(f"key:{keys.private}")  # the private half, by mistake
    with pytest.raises(ConfigurationError, match="certificates of the CA"):
        trust(f"certificate:{keys.public}")
    with pytest.raises(ConfigurationError, match="Sigstore client trust configuration"):
        trust(f"sigstore:identity=a@b.c;issuer=https://x;trust_config={tmp_path / 'none.json'}")


def offline_trust_config(path: Path) -> Path:
    """A Sigstore client trust configuration made of the public-good instance's trust root and
    signing configuration that sigstore-python ships (no network)."""
    import sigstore

    store = Path(sigstore.__file__).parent / "_store" / "https%3A%2F%2Ftuf-repo-cdn.sigstore.dev"
    path.write_text(
        json.dumps(
            {
                "mediaType": "application/vnd.dev.sigstore.clienttrustconfig.v0.1+json",
                "trustedRoot": json.loads((store / "trusted_root.json").read_text()),
                "signingConfig": json.loads((store / "signing_config.v0.2.json").read_text()),
            }
        )
    )
    return path


def test_keyless_trust_loads_offline_from_a_mounted_root_and_refuses_other_signatures(
    adapters_dir: Path, tmp_path: Path, keys: KeyPair, resolver_with: Callable[..., Resolver]
) -> None:
    # A real keyless signature needs an OIDC identity and Sigstore's services: not here. What is
    # tested: the form, an offline start from the mounted root, and the refusal of a key's.
    root = offline_trust_config(tmp_path / "trust_config.json")
    trust = f"sigstore:identity=release@example.com;issuer=https://accounts.example.com;trust_config={root}"
    signed_adapter(adapters_dir, "sql-expert", keys)
    assert "not signed by a signer this server trusts" in refusal(
        resolver_with(trust), "sql-expert"
    )


def test_without_trust_model_signing_is_never_imported(adapters_dir: Path, cache_dir: Path) -> None:
    write_lora_adapter(adapters_dir / "plain", base_model=BASE_MODEL)
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from vllm_lora_resolvers.configured import build_resolver\n"
        "from vllm_lora_resolvers.config import Settings\n"
        "resolver = build_resolver('lora_fs_resolver', Settings.from_environ(argv=[]))\n"
        "assert resolver.resolve(sys.argv[1], 'plain') is not None\n"
        "signing = ('model_signing', 'sigstore', 'OpenSSL')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in signing))\n"
    )
    environment = {
        "VLLM_LORA_RESOLVER_CACHE_DIR": str(cache_dir),
        "VLLM_LORA_RESOLVER_FS_DIR": str(adapters_dir),
    }
    completed = subprocess.run(
        [sys.executable, "-c", code, BASE_MODEL],
        env={**os.environ, **environment},
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.strip() == "[]"
