"""Signing material for the tests, made in the test: elliptic-curve key pairs, a CA and the
signing certificates it issues (current, expired, from another CA), and adapter folders signed
as a release pipeline signs them, with model-signing itself (its library or its command line).
Every key here is generated for one test and thrown away with its folder."""

from __future__ import annotations

import datetime
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from devtools.signing_keys import SIGNATURE, KeyPair, key_pair, sign_with_key, signing_config

__all__ = [
    "SIGNATURE",
    "Authority",
    "KeyPair",
    "SigningCertificate",
    "authority",
    "issue",
    "key_pair",
    "keys_fixture",
    "sign_with_certificate",
    "sign_with_key",
    "sign_with_key_cli",
]

_DAY = datetime.timedelta(days=1)


@pytest.fixture(name="keys")
def keys_fixture(tmp_path: Path) -> KeyPair:
    """A key pair made for this test (``release.pem`` and ``release.pub`` in ``keys/``)."""
    return key_pair(tmp_path / "keys")


@dataclass(frozen=True)
class Authority:
    """A CA: its key and certificate (the file a ``certificate:`` trust entry names)."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    path: Path

    @property
    def trust(self) -> str:
        return f"certificate:{self.path}"


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Test Org"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _certificate(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: Authority | None,
    start: datetime.datetime,
    end: datetime.datetime,
) -> x509.Certificate:
    """A certificate for ``key``, named ``name``, valid from ``start`` to ``end``: a CA's,
    self-signed (no ``issuer``), or a code-signing certificate that ``issuer`` signs."""
    is_ca = issuer is None
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name) if issuer is None else issuer.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not is_ca,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=is_ca,
                crl_sign=is_ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    if issuer is None:
        return builder.sign(key, hashes.SHA256())
    code_signing = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING])
    return builder.add_extension(code_signing, critical=False).sign(issuer.key, hashes.SHA256())


def authority(directory: Path, name: str = "Test Signing CA") -> Authority:
    """A new self-signed CA, valid from yesterday for a year."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    certificate = _certificate(name, key, None, now - _DAY, now + 365 * _DAY)
    path = directory / f"{name.replace(' ', '-')}.crt"
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return Authority(key, certificate, path)


@dataclass(frozen=True)
class SigningCertificate:
    key: Path
    certificate: Path
    chain: Path


def issue(
    ca: Authority, directory: Path, name: str = "release-pipeline", *, expired: bool = False
) -> SigningCertificate:
    """A code-signing certificate issued by ``ca`` for a new key: valid now, or valid for a day
    that ended yesterday (``expired``)."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    start, end = (now - 2 * _DAY, now - _DAY / 2) if expired else (now - _DAY / 2, now + 30 * _DAY)
    if expired:  # issued while the CA was valid: only the leaf's own dates are wrong now
        start = max(start, ca.certificate.not_valid_before_utc)
    certificate = _certificate(name, key, ca, start, end)
    key_path, certificate_path = directory / f"{name}.pem", directory / f"{name}.crt"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    certificate_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return SigningCertificate(key_path, certificate_path, ca.path)


def sign_with_key_cli(folder: Path, keys: KeyPair) -> Path:
    """Sign ``folder`` in place with model-signing's own command line (``model_signing sign
    key``), as a pipeline that never heard of this project does."""
    command = [
        str(Path(sys.executable).parent / "model_signing"),
        "sign",
        "key",
        str(folder),
        "--private_key",
        str(keys.private),
        "--signature",
        str(folder / SIGNATURE),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    assert completed.returncode == 0, completed.stderr[-2000:]
    return folder / SIGNATURE


def sign_with_certificate(folder: Path, signer: SigningCertificate) -> Path:
    """Sign ``folder`` in place with a signing certificate (model-signing's certificate
    signer), the CA's certificate carried in the bundle as its chain."""
    signing_config().use_certificate_signer(
        private_key=signer.key,
        signing_certificate=signer.certificate,
        certificate_chain=[signer.chain],
    ).sign(folder, folder / SIGNATURE)
    return folder / SIGNATURE
