"""Signing with a key pair as a release pipeline does, with model-signing itself: a new P-256
key pair, and an adapter folder signed in place (``model.sig``). For the tests and benchmarks;
every key is generated for one run and thrown away with its folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from model_signing import hashing, signing

SIGNATURE = "model.sig"


@dataclass(frozen=True)
class KeyPair:
    private: Path
    public: Path

    @property
    def trust(self) -> str:
        """The ``VLLM_LORA_RESOLVER_TRUST`` entry that trusts it."""
        return f"key:{self.public}"


def key_pair(directory: Path, name: str = "release") -> KeyPair:
    """A new P-256 key pair in ``directory`` (``NAME.pem``, ``NAME.pub``)."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    private, public = directory / f"{name}.pem", directory / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return KeyPair(private, public)


def signing_config() -> signing.Config:
    """model-signing's signer as its command line sets it up: the library's default hashing,
    the signature file (inside the folder) excluded."""
    return signing.Config().set_hashing_config(
        hashing.Config().set_ignored_paths(paths=[SIGNATURE])
    )


def sign_with_key(folder: Path, keys: KeyPair) -> Path:
    """Sign ``folder`` in place with model-signing's library, as a release pipeline does."""
    signing_config().use_elliptic_key_signer(private_key=keys.private).sign(
        folder, folder / SIGNATURE
    )
    return folder / SIGNATURE
