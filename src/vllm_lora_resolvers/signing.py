"""Signed adapters: a server that sets ``VLLM_LORA_RESOLVER_TRUST`` serves only what a signer it
trusts signed, checked on the downloaded bytes before a snapshot is published.

The signature is OpenSSF model signing's (the ``model-signing`` library, the ``[signing]`` extra):
``model.sig`` in the adapter folder, a Sigstore bundle over an in-toto statement that lists every
file of the folder signed with its digest (SHA-256 by default), and the folder's name. What this
module holds a signature to:

- the bytes of each file served (``adapter_config.json`` and the weights file vLLM loads): each
  must be listed with its digest; a file served that is not listed is refused, and so is a weights
  file other than the one vLLM would load from the folder as signed (a signed ``.safetensors``
  deleted so that a signed ``.bin`` is loaded instead). Files of the folder that are not served
  (a README) are not read;
- the adapter's name: the folder name recorded when signing must be the last segment of the name
  the adapter is served as (``team/sql-expert``: ``sql-expert``), so a signed adapter copied under
  another name is refused;
- not its version: the format has none, so any version ever signed for a name can be served as
  that name again (a rollback: anyone who can write to the store can make one).

model-signing 1.1's one public verification call checks a signature and hashes a whole folder
together; a snapshot holds only the files served, so this module takes the two steps apart with
the library's own verifiers and bundle readers (internals: hence ``model-signing>=1.1.1,<1.2``).

``model_signing`` is imported only when a function here needs it: a process without
``VLLM_LORA_RESOLVER_TRUST`` never imports it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vllm_lora_resolvers.adapter import (
    CONFIG_FILE,
    MAX_SIGNATURE_BYTES,
    SIGNATURE_FILE,
    WEIGHTS_FILES,
    weights_file,
)
from vllm_lora_resolvers.config import (
    TRUST,
    ConfigurationError,
    Settings,
    TrustedSigner,
    install_hint,
)
from vllm_lora_resolvers.errors import SignatureError

logger = logging.getLogger("vllm.lora_resolvers.signing")

#: The hashing method whose digests the transfer computes as it verifies a download.
TRANSFER_DIGEST = "sha256"


@dataclass(frozen=True)
class CheckedSignature:
    """A signature a trusted signer made: who, as which name, over which digests."""

    #: Who signed, as this server's trust names them (a key file, a certificate's subject, a
    #: Sigstore identity).
    signer: str
    #: The name of the folder signed.
    model_name: str
    #: Each file (or file shard) signed -> its hex digest.
    resources: Mapping[str, str]
    #: model-signing's serialization: ``method`` (``files``, ``shards``), ``hash_type``, ...
    serialization: Mapping[str, Any]

    def files(self) -> set[str]:
        """The files signed."""
        return {_file_of(identifier, self.serialization) for identifier in self.resources}

    @property
    def digest_algorithm(self) -> str | None:
        """``sha256`` when each file is signed whole by its SHA-256 (the library's default),
        which the transfer computes as it verifies a download: then nothing is hashed again."""
        whole = self.serialization.get("method") == "files"
        return (
            TRANSFER_DIGEST if whole and self.serialization.get("hash_type") == "sha256" else None
        )

    def check_covers(self, adapter: str, config: str, weights: str) -> None:
        """Refuse, before anything else is downloaded, files to serve that are not signed, and a
        weights file other than the one vLLM would load from the folder as signed."""
        signed = self.files()
        for name in (config, weights):
            if name not in signed:
                raise SignatureError(
                    f"adapter {adapter!r}: {name} is not covered by its signature (added after "
                    "signing?); sign the adapter's folder again"
                )
        loaded = next(name for name in WEIGHTS_FILES if name in signed)
        if loaded != weights:
            raise SignatureError(
                f"adapter {adapter!r}: it was signed with {loaded}, which vLLM would load, and "
                f"the store no longer has it: {weights} is not what was signed to be served"
            )

    def check_file(
        self, adapter: str, folder: Path, name: str, digests: Mapping[str, str] | None = None
    ) -> None:
        """Refuse file ``name`` of ``folder`` unless its bytes are what was signed; ``digests``
        are the ones the download computed (algorithm -> hex), used when the signature's are."""
        signed = {
            identifier: digest
            for identifier, digest in self.resources.items()
            if _file_of(identifier, self.serialization) == name
        }
        if not signed:
            raise SignatureError(f"adapter {adapter!r}: {name} is not covered by its signature")
        known = (digests or {}).get(self.digest_algorithm or "")
        ours = {name: known} if known else self._digests(adapter, folder, name)
        if ours != signed:
            raise SignatureError(
                f"adapter {adapter!r}: {name} changed after it was signed (its digest is not "
                "the signed one); publish the signed files again"
            )

    def _digests(self, adapter: str, folder: Path, name: str) -> dict[str, str]:
        """``name``'s digests as the signature's serialization computes them."""
        if self.digest_algorithm is not None:
            with (folder / name).open("rb") as stream:
                return {name: hashlib.file_digest(stream, TRANSFER_DIGEST).hexdigest()}
        from model_signing import hashing

        method, algorithm = self.serialization.get("method"), self.serialization.get("hash_type")
        try:
            config = hashing.Config()
            if method == "files":
                config.use_file_serialization(hashing_algorithm=algorithm)
            elif method == "shards":
                config.use_shard_serialization(
                    hashing_algorithm=algorithm, shard_size=int(self.serialization["shard_size"])
                )
            else:
                raise ValueError(f"unknown serialization {method!r}")
            manifest = config.hash(folder, files_to_hash=[folder / name])
        except (ValueError, KeyError, TypeError) as error:
            raise SignatureError(
                f"adapter {adapter!r}: its signature hashes files in a way this server cannot "
                f"check ({error})"
            ) from None
        return {item.identifier: item.digest.digest_hex for item in manifest.resource_descriptors()}


def _file_of(identifier: str, serialization: Mapping[str, Any]) -> str:
    """The file of a signed resource: itself, or ``PATH`` of a shard ``PATH:START:END``."""
    if serialization.get("method") == "shards":
        return identifier.rsplit(":", 2)[0]
    return identifier


class _ExpiredError(Exception):
    """A signing certificate that chains up to a trusted CA but is not valid now."""


@dataclass(frozen=True)
class _Verifier:
    """One trusted signer, ready to check signatures (model-signing's verifier for it)."""

    entry: TrustedSigner
    #: A ``model_signing.verifying.Config`` with the signer's verifier.
    config: Any
    #: One check at a time: the certificate verifier sets its shared X.509 store's time to each
    #: signature's certificate before checking the chain.
    guard: threading.Lock = field(default_factory=threading.Lock)

    def verify(self, path: Path) -> tuple[Any, str]:
        """The manifest ``path`` signs and who signed it; raises unless this signer made it."""
        from model_signing._signing import sign_sigstore, sign_sigstore_pb

        reader = sign_sigstore if self.entry.kind == "sigstore" else sign_sigstore_pb
        signature = reader.Signature.read(path)
        with self.guard:
            manifest = self.config._verifier.verify(signature)
        if self.entry.kind == "key":
            return manifest, f"key {self.entry.path}"
        if self.entry.kind == "sigstore":
            return manifest, f"{self.entry.identity} (issuer {self.entry.issuer})"
        return manifest, _current_certificate(signature.bundle.verification_material)


def _current_certificate(material: Any) -> str:
    """The subject of a certificate signature's signing certificate, once every certificate of
    its chain is valid now: with no trusted timestamp saying when it signed, an expired
    certificate is not taken on its word that it signed before it expired."""
    from cryptography import x509

    now = datetime.now(UTC)
    chain = [
        x509.load_der_x509_certificate(c.raw_bytes)
        for c in material.x509_certificate_chain.certificates
    ]
    for certificate in chain:
        if certificate.not_valid_after_utc < now:
            raise _ExpiredError(
                f"its signing certificate ({certificate.subject.rfc4514_string()}) expired on "
                f"{certificate.not_valid_after_utc:%Y-%m-%d}; sign it again with a current one"
            )
        if certificate.not_valid_before_utc > now:
            raise _ExpiredError(
                f"its signing certificate ({certificate.subject.rfc4514_string()}) is not valid "
                f"before {certificate.not_valid_before_utc:%Y-%m-%d}"
            )
    return f"certificate {chain[0].subject.rfc4514_string()}"


class Trust:
    """The signers of ``VLLM_LORA_RESOLVER_TRUST``, ready to check adapters' signatures.

    ``fingerprint`` changes with the setting and with the content of every file it names; a
    snapshot records the one it was checked under (`SnapshotManifest.trust`), and a server under
    another checks it again.
    """

    def __init__(self, verifiers: Sequence[_Verifier], fingerprint: str) -> None:
        self.verifiers = tuple(verifiers)
        self.fingerprint = fingerprint

    def check(self, adapter: str, signature: Path, served_as: str) -> CheckedSignature:
        """The signature ``signature`` of adapter ``adapter`` (served as ``served_as``, the name
        without a version pin), if a trusted signer made it for that name; `SignatureError` if
        not."""
        _read_bundle(adapter, signature)  # a file that is no signature at all is said so
        failures, expired = [], None
        for verifier in self.verifiers:
            try:
                manifest, signer = verifier.verify(signature)
            except _ExpiredError as error:
                expired = expired or str(error)
                failures.append(f"{verifier.entry}: {error}")
            except Exception as error:  # the library raises many kinds, all "no"
                failures.append(f"{verifier.entry}: {type(error).__name__}: {str(error)[:200]}")
            else:
                return _name_bound(adapter, manifest, signer, served_as)
        logger.info("signature of %r refused by every trusted signer: %s", adapter, failures)
        raise SignatureError(
            f"adapter {adapter!r}: "
            + (expired or f"it is not signed by a signer this server trusts ({TRUST.name})")
        )

    def check_folder(self, adapter: str, folder: Path, served_as: str) -> CheckedSignature:
        """Check the files vLLM would load from ``folder`` (a snapshot, a local adapter folder)
        against its ``model.sig``, hashing them."""
        if not (folder / SIGNATURE_FILE).is_file():
            raise unsigned(adapter)
        checked = self.check(adapter, folder / SIGNATURE_FILE, served_as)
        weights = weights_file(folder)
        if weights is None:
            raise SignatureError(f"adapter {adapter!r} has no weights file")
        checked.check_covers(adapter, CONFIG_FILE, weights.name)
        for name in (CONFIG_FILE, weights.name):
            checked.check_file(adapter, folder, name)
        return checked


def _name_bound(adapter: str, manifest: Any, signer: str, served_as: str) -> CheckedSignature:
    """The checked signature, if it was made for the name the adapter is served as."""
    expected = served_as.rsplit("/", 1)[-1]
    if manifest.model_name != expected:
        raise SignatureError(
            f"adapter {adapter!r}: it was signed as {str(manifest.model_name)[:100]!r}, not "
            f"{expected!r}: a signed adapter copied to another name is refused; sign the "
            f"adapter's own folder, named {expected!r}"
        )
    return CheckedSignature(
        signer=signer,
        model_name=manifest.model_name,
        resources={
            item.identifier: item.digest.digest_hex for item in manifest.resource_descriptors()
        },
        serialization=dict(manifest.serialization_type),
    )


def unsigned(adapter: str) -> SignatureError:
    """The refusal of an adapter that has no signature."""
    return SignatureError(
        f"adapter {adapter!r} is not signed (no {SIGNATURE_FILE} beside its files) and this "
        f"server serves only signed adapters ({TRUST.name}); sign it (vllm-lora publish "
        "--sign-key, or model_signing sign) and publish it again"
    )


def load_trust(settings: Settings) -> Trust | None:
    """The trust of ``settings`` (``None``: no signature is checked), loaded once per process.

    Raises `ConfigurationError` when ``model-signing`` is not installed, or when a file the
    setting names cannot be read or is not what its form says.
    """
    return _load(settings.trust) if settings.trust else None


@functools.cache
def _load(entries: tuple[TrustedSigner, ...]) -> Trust:
    try:
        from model_signing import verifying
    except ImportError as error:
        raise ConfigurationError(
            f"{TRUST.name} is set but model-signing is not installed ({error}); "
            + install_hint("signing")
        ) from None
    fingerprint = hashlib.sha256()
    verifiers = []
    for entry in entries:
        try:
            content = entry.path.read_bytes()
            config = verifying.Config()
            if entry.kind == "key":
                config.use_elliptic_key_verifier(public_key=entry.path)
            elif entry.kind == "certificate":
                config.use_certificate_verifier(certificate_chain=[entry.path])
            else:
                config.use_sigstore_verifier(
                    identity=entry.identity, oidc_issuer=entry.issuer, trust_config=entry.path
                )
        except Exception as error:  # unreadable, or no key/certificate/root
            raise ConfigurationError(
                f"{TRUST.name}: {entry} cannot be used: {type(error).__name__}: "
                f"{str(error)[:300]}; {_expected(entry)}"
            ) from None
        fingerprint.update(f"{entry}\0{hashlib.sha256(content).hexdigest()}\n".encode())
        verifiers.append(_Verifier(entry, config))
    return Trust(verifiers, fingerprint.hexdigest()[:32])


def _expected(entry: TrustedSigner) -> str:
    if entry.kind == "key":
        return "PATH must be a PEM elliptic-curve public key (P-256, P-384 or P-521)"
    if entry.kind == "certificate":
        return "PATH must hold the PEM certificates of the CA that issues signing certificates"
    return (
        "trust_config must be a Sigstore client trust configuration (JSON) mounted on the "
        "server: see docs/security.md"
    )


def _read_bundle(adapter: str, path: Path) -> dict[str, Any]:
    """``model.sig`` as JSON, or `SignatureError` if it is too large or no Sigstore bundle."""
    try:
        if path.stat().st_size > MAX_SIGNATURE_BYTES:
            raise ValueError(f"over {MAX_SIGNATURE_BYTES} bytes")
        bundle = json.loads(path.read_bytes())
        if not isinstance(bundle, dict) or "verificationMaterial" not in bundle:
            raise ValueError("not a Sigstore bundle")
    except (OSError, ValueError) as error:
        raise SignatureError(
            f"adapter {adapter!r}: {SIGNATURE_FILE} is not a signature ({str(error)[:100]}); "
            "sign the adapter with model-signing"
        ) from None
    return bundle


def describe(adapter: str, path: Path) -> str:
    """Who ``model.sig`` says signed it, and as which name, read without checking it (for
    ``vllm-lora validate`` when ``VLLM_LORA_RESOLVER_TRUST`` is unset)."""
    bundle = _read_bundle(adapter, path)
    material = bundle["verificationMaterial"]
    try:
        envelope = bundle["dsseEnvelope"]["payload"]
        name = json.loads(base64.b64decode(envelope))["subject"][0]["name"]
    except (KeyError, IndexError, TypeError, ValueError, binascii.Error):
        name = "?"
    if "publicKey" in material:
        who = f"a key (SHA-256 hint {str(material['publicKey'].get('hint'))[:16]}...)"
    else:
        chain = material.get("x509CertificateChain", {}).get("certificates") or [
            material.get("certificate", {})
        ]
        who = _certificate_subject(chain[0].get("rawBytes", ""))
    return f"{who}, as {str(name)[:100]!r}"


def _certificate_subject(raw: str) -> str:
    """A certificate's subject (a Sigstore certificate's e-mail or URI), from base64 DER."""
    try:
        from cryptography import x509

        certificate = x509.load_der_x509_certificate(base64.b64decode(raw))
    except ImportError:
        return f"a certificate ({install_hint('signing')} to read it)"
    except ValueError:
        return "an unreadable certificate"
    with contextlib.suppress(x509.ExtensionNotFound):
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        identities = [str(value) for value in names.value.get_values_for_type(x509.RFC822Name)]
        identities += names.value.get_values_for_type(x509.UniformResourceIdentifier)
        if not certificate.subject and identities:
            return f"Sigstore certificate {identities[0]}"
    return f"certificate {certificate.subject.rfc4514_string()}"


@dataclass(frozen=True)
class Signer:
    """How ``vllm-lora publish`` signs: a private key (with its certificate and the chain up to
    the CA, for a certificate signature), or Sigstore keyless (the CI job's OIDC identity)."""

    private_key: Path | None = None
    certificate: Path | None = None
    chain: tuple[Path, ...] = ()
    sigstore: bool = False
    sigstore_trust_config: Path | None = None


def sign_files(files: Iterable[Path], name: str, signer: Signer, scratch: Path) -> Path:
    """Sign ``files`` as model-signing signs a folder named ``name`` (the last segment of the
    adapter's name) holding exactly them: SHA-256 of each file, ``model.sig`` excluded. Returns
    the signature, written in ``scratch``; `ConfigurationError` without the extra."""
    try:
        from model_signing import hashing, signing
    except ImportError as error:
        raise ConfigurationError(
            f"signing needs model-signing ({error}); {install_hint('signing')}"
        ) from None
    folder = scratch / name
    folder.mkdir(parents=True)
    for path in files:
        try:
            os.link(path, folder / path.name)
        except OSError:  # another filesystem, or links not allowed: a copy signs the same bytes
            shutil.copyfile(path, folder / path.name)
    config = signing.Config().set_hashing_config(
        hashing.Config().set_ignored_paths(paths=[SIGNATURE_FILE])
    )
    if signer.sigstore:
        config.use_sigstore_signer(
            use_ambient_credentials=True, trust_config=signer.sigstore_trust_config
        )
    elif signer.certificate is not None:
        assert signer.private_key is not None
        config.use_certificate_signer(
            private_key=signer.private_key,
            signing_certificate=signer.certificate,
            certificate_chain=signer.chain,
        )
    else:
        assert signer.private_key is not None
        config.use_elliptic_key_signer(private_key=signer.private_key)
    config.sign(folder, folder / SIGNATURE_FILE)
    return folder / SIGNATURE_FILE
