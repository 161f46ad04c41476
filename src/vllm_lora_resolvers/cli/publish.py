"""``vllm-lora publish DIR URI``: publish an adapter version to a bucket atomically;
``--rollback`` moves the adapter back to an earlier version.

The files go into a version folder of their own, which is never rewritten; the adapter's pointer,
written last and only if nobody else moved it meanwhile, makes that version the one ``NAME``
resolves to (the layout: `vllm_lora_resolvers.backends.published`). Before its first write it
checks that the store refuses writes whose condition does not hold
(`BucketStore.conditional_writes`), and refuses a store that ignores them unless told otherwise.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import filecmp
import functools
import hashlib
import json
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import click
from rich.console import Console

from vllm_lora_resolvers import signing
from vllm_lora_resolvers.adapter import (
    ADAPTER_FILES,
    CONFIG_FILE,
    SIGNATURE_FILE,
    WEIGHTS_FILES,
    adapter_from_listing,
    weights_file,
)
from vllm_lora_resolvers.backends.bucket import BucketStore
from vllm_lora_resolvers.backends.published import (
    MAX_HISTORY,
    MAX_POINTER_BYTES,
    POINTER_FORMAT,
    Pointer,
    PublishedFile,
    is_version,
    parse_pointer,
    split_pin,
    version_folder,
)
from vllm_lora_resolvers.cache import NodeCache
from vllm_lora_resolvers.cli.lint import LintPolicy
from vllm_lora_resolvers.cli.output import cannot_check, console, line, max_rank_option, printable
from vllm_lora_resolvers.cli.stores import (
    open_store,
    scratch_cache,
    split_adapter_uri,
)
from vllm_lora_resolvers.cli.validate import print_report, validate_folder
from vllm_lora_resolvers.config import TRUST, Settings
from vllm_lora_resolvers.errors import InvalidAdapterError, SignatureError
from vllm_lora_resolvers.remote import RemoteAdapter, RemoteFile
from vllm_lora_resolvers.resolver import Resolver
from vllm_lora_resolvers.retry import call_with_retries
from vllm_lora_resolvers.stores import BUCKET_SCHEMES

_T = TypeVar("_T")
_VERSION_HELP = "[A-Za-z0-9][A-Za-z0-9._-]*, at most 128 characters"
#: An S3 ETag that is the MD5 of the object (single-part uploads without KMS or customer keys).
_MD5_ETAG = re.compile(r'^"?([0-9a-f]{32})"?$')


class RefusedError(click.ClickException):
    """Publishing was refused (exit code 1): an invalid folder, a version that exists with other
    files or does not exist, a pointer someone else moved meanwhile, a store that ignores
    conditional writes."""

    def __init__(self, message: str) -> None:
        super().__init__(printable(message))


@dataclass(frozen=True)
class PointerMove:
    """What ``publish`` did: the version ``NAME`` now resolves to and the one it did before."""

    name: str
    version: str
    previous: str | None
    version_location: str
    pointer_location: str
    uploaded: tuple[str, ...] = ()
    #: ``False``: the pointer already named ``version``, so it was left as it was.
    moved: bool = True
    #: Who signed the version (`signing.describe`), ``None`` if it is not signed.
    signed_by: str | None = None


@dataclass(frozen=True)
class _Current:
    """The pointer as read (``None``: absent or malformed) and its ETag or generation
    (``None``: no pointer object at all)."""

    pointer: Pointer | None
    etag: str | None


#: A key, a certificate or a trust configuration, given as a file that exists.
_EXISTING_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


@click.command()
@click.argument("arguments", nargs=-1, metavar="[DIR] URI")
@click.option("--version", help=f"The version's name ({_VERSION_HELP}); default: a hash.")
@click.option("--rollback", is_flag=True, help="Move URI back to its previous version.")
@click.option("--to", "to_version", metavar="VERSION", help="With --rollback: this version.")
@click.option("--base-model", help="The server's --model; default: the adapter's own base model.")
@max_rank_option
@click.option(
    "--allow-unconditional-store",
    is_flag=True,
    help="Publish to a store that ignores conditional writes (publishers must take turns).",
)
@click.option(
    "--sign-key",
    type=_EXISTING_FILE,
    help="Sign the version with this PEM elliptic-curve private key (unencrypted).",
)
@click.option(
    "--sign-cert",
    type=_EXISTING_FILE,
    help="With --sign-key: its signing certificate (PEM), for a certificate signature.",
)
@click.option(
    "--sign-chain",
    type=_EXISTING_FILE,
    multiple=True,
    help="With --sign-cert: the certificates up to the CA (PEM), carried in the signature.",
)
@click.option(
    "--sign-sigstore",
    is_flag=True,
    help="Sign keyless with Sigstore, as the CI job's OIDC identity (needs Sigstore's services).",
)
@click.option(
    "--sigstore-trust-config",
    type=_EXISTING_FILE,
    help="With --sign-sigstore: a private Sigstore deployment's client trust configuration.",
)
def publish(
    arguments: tuple[str, ...],
    *,
    version: str | None,
    rollback: bool,
    to_version: str | None,
    base_model: str | None,
    max_rank: int | None,
    allow_unconditional_store: bool,
    sign_key: Path | None,
    sign_cert: Path | None,
    sign_chain: tuple[Path, ...],
    sign_sigstore: bool,
    sigstore_trust_config: Path | None,
) -> None:
    """Publish the adapter folder DIR as a new version of URI, atomically: clients asking for NAME
    get the old version or the new one, never a mix of both.

    URI is SCHEME://BUCKET/PREFIX/NAME, SCHEME a bucket store's (s3://, gs://, ...). DIR is
    checked as `vllm-lora validate DIR` checks it, and refused unless valid. Its files are
    uploaded to NAME/_versions/VERSION/ (VERSION: the first 12 hex digits of a SHA-256 of the
    files, or --version), which is never overwritten: publishing the same files again uploads
    nothing, other files under an existing VERSION are refused. Then NAME/adapter_current.json
    is pointed at VERSION, unless someone else moved it meanwhile. NAME@VERSION always resolves
    to VERSION.

    Before its first write it checks, with the object NAME/_vllm-lora-conditional-write-probe,
    that the store refuses writes whose condition does not hold; a store that ignores them
    cannot tell it of a publisher racing it, and is refused unless --allow-unconditional-store.

    --sign-key KEY (with --sign-cert CERT [--sign-chain CA...] for a certificate signature, or
    --sign-sigstore for keyless) signs the files uploaded, as model-signing signs a folder named
    as NAME's last segment, and uploads the signature (model.sig) with them: NAME, NAME@VERSION
    and rollbacks to VERSION all carry it. Without, a model.sig in DIR is uploaded as it is.
    Under VLLM_LORA_RESOLVER_TRUST, a signature servers would refuse is not published.

    --rollback URI points NAME back at the version before (or --to VERSION). Exit 0 when done,
    1 when refused, 2 when it cannot be done (usage, configuration, an unreadable store).
    """
    if len(arguments) != (1 if rollback else 2):
        raise click.UsageError("expected DIR URI, or --rollback URI")
    signer = _signer(sign_key, sign_cert, sign_chain, sign_sigstore, sigstore_trust_config)
    if signer is not None and rollback:
        raise click.UsageError("a rollback uploads nothing to sign: the version keeps its own")
    if to_version is not None and not rollback:
        raise click.UsageError("--to goes with --rollback")
    if version is not None and rollback:
        raise click.UsageError("--version names a version to publish; roll back with --to")
    for option, value in (("--version", version), ("--to", to_version)):
        if value is not None and not is_version(value):
            raise click.BadParameter(f"{value!r} is not {_VERSION_HELP}", param_hint=option)
    with cannot_check(), _refusals():
        # The version folders' signatures are listed (and carried by the pointer) in any case.
        settings = dataclasses.replace(Settings.from_environ(argv=[]), read_signatures=True)
        with scratch_cache(arguments[-1]) as (cache, _):
            publisher = _publisher(arguments[-1], settings, cache, allow_unconditional_store)
            if rollback:
                move = publisher.roll_back(to_version)
            else:
                folder = Path(arguments[0])
                lint_policy = LintPolicy(
                    base_model, max_rank or settings.max_rank, settings.base_model_aliases
                )
                report = validate_folder(
                    folder, lint_policy, settings, name=publisher.name, signature=signer is None
                )
                if not report.valid:
                    print_report(console(stderr=True), report)
                    raise RefusedError(f"{folder} is not a valid adapter; nothing was uploaded")
                move = publisher.publish(folder, version, signer)
    _print_move(console(), move, "rolled back" if rollback else "published")


def _signer(
    key: Path | None,
    certificate: Path | None,
    chain: tuple[Path, ...],
    sigstore: bool,
    trust_config: Path | None,
) -> signing.Signer | None:
    """How the options say to sign (``None``: not at all); `click.UsageError` if they clash."""
    if sigstore and (key or certificate or chain):
        raise click.UsageError("--sign-sigstore signs keyless: no --sign-key, --sign-cert or chain")
    if trust_config is not None and not sigstore:
        raise click.UsageError("--sigstore-trust-config goes with --sign-sigstore")
    if certificate is not None and key is None:
        raise click.UsageError("--sign-cert needs --sign-key, the certificate's private key")
    if chain and certificate is None:
        raise click.UsageError("--sign-chain goes with --sign-cert")
    if sigstore:
        return signing.Signer(sigstore=True, sigstore_trust_config=trust_config)
    if key is None:
        return None
    return signing.Signer(private_key=key, certificate=certificate, chain=chain)


@contextmanager
def _refusals() -> Iterator[None]:
    """Report what the store's lookups refuse (a malformed folder) as `RefusedError`."""
    try:
        yield
    except InvalidAdapterError as error:
        raise RefusedError(str(error)) from None


def _publisher(
    uri: str, settings: Settings, cache: NodeCache, allow_unconditional_store: bool
) -> Publisher:
    """The publisher of adapter URI ``uri``, by the store's resolver over ``cache``."""
    if not uri.startswith(BUCKET_SCHEMES):
        schemes = ", ".join(BUCKET_SCHEMES)
        raise click.BadParameter(f"{uri!r} is not SCHEME://BUCKET/PREFIX/NAME ({schemes})")
    adapter = split_adapter_uri(uri, settings)
    name, pinned = split_pin(adapter.name)
    resolver = open_store(adapter.store, settings, cache)
    if pinned is not None or not resolver.store.accepts_name(name):
        raise click.BadParameter(
            f"{adapter.name!r} is not a name clients can ask for (NAME@VERSION names a version: "
            "publish to NAME with --version VERSION)"
        )
    return Publisher(resolver, name, allow_unconditional_store=allow_unconditional_store)


class Publisher:
    """Publishes versions of adapter ``name`` to the store of ``resolver`` (a bucket) and moves
    its pointer; to a store that ignores conditional writes only if
    ``allow_unconditional_store``."""

    def __init__(
        self, resolver: Resolver, name: str, *, allow_unconditional_store: bool = False
    ) -> None:
        assert isinstance(resolver.store, BucketStore)  # declared so (tests/test_stores.py)
        self.resolver = resolver
        self.store = resolver.store
        self.name = name
        self.pointer_key = self.store.pointer_key(name)
        self.allow_unconditional_store = allow_unconditional_store
        self._may_write = False

    def version_key(self, version: str) -> str:
        """The key prefix of the folder of version ``version``."""
        return version_folder(self.store.folder_prefix(self.name), version)

    def publish(
        self, folder: Path, version: str | None = None, signer: signing.Signer | None = None
    ) -> PointerMove:
        """Upload the adapter in ``folder`` (checked already) as version ``version`` (default: a
        hash of its files), signed by ``signer`` if given (else with ``folder``'s own signature,
        if it has one), and point the name at it; `RefusedError` if that version exists with
        other files or someone else moved the pointer meanwhile."""
        weights = weights_file(folder)
        assert weights is not None  # the folder was checked
        adapter_files = (folder / CONFIG_FILE, weights)
        version = version or content_version(adapter_files)
        with tempfile.TemporaryDirectory(prefix="vllm-lora-") as scratch:
            signature = (
                folder / SIGNATURE_FILE
                if signer is None
                else self._sign(adapter_files, signer, Path(scratch))
            )
            files = (*adapter_files, signature) if signature.is_file() else adapter_files
            return self._upload_and_point(version, files)

    def _sign(self, files: Sequence[Path], signer: signing.Signer, scratch: Path) -> Path:
        """Sign ``files`` for this adapter's name; `RefusedError` if this environment's
        ``VLLM_LORA_RESOLVER_TRUST`` would refuse the signature."""
        signature = signing.sign_files(files, self.name.rsplit("/", 1)[-1], signer, scratch)
        trust = signing.load_trust(self.resolver.settings)
        if trust is not None:
            try:
                trust.check_folder(self.name, signature.parent, self.name)
            except SignatureError as error:
                raise RefusedError(
                    f"servers with this {TRUST.name} would refuse the signature made ({error}); "
                    "nothing was uploaded"
                ) from None
        return signature

    def _upload_and_point(self, version: str, files: Sequence[Path]) -> PointerMove:
        """Upload ``files`` to version folder ``version`` (those not there already) and point
        the name at it."""
        target = self.version_key(version)
        current = self._read_current()
        existing = self.store.list_adapter_files(self.name, target)
        self._refuse_other_files(target, files, existing)
        uploaded = []
        for path in files:
            if path.name in existing:
                continue
            self._check_conditional_writes()
            key = target + path.name
            upload = functools.partial(self.store.upload_object, key, path)
            if not self._retried(upload, f"upload of {key}"):
                raise RefusedError(
                    f"{self.store.location(key)} appeared while publishing "
                    "(another publisher?); run publish again to compare it with yours"
                )
            uploaded.append(path.name)
        listed = self.store.list_adapter_files(self.name, target)
        sizes = {path.name: path.stat().st_size for path in files}
        if any(path not in listed or listed[path].size != size for path, size in sizes.items()):
            raise RefusedError(
                f"{self.store.location(target)} does not list the files just uploaded; "
                "run publish again"
            )
        # The version's signature travels in the pointer, ours or one uploaded before.
        carried = (*sizes, SIGNATURE_FILE) if SIGNATURE_FILE not in sizes else tuple(sizes)
        published = tuple(PublishedFile.listed(listed[path]) for path in carried if path in listed)
        history = _pushed(current.pointer, version)
        return self._point(current, version, published, history, uploaded=tuple(uploaded))

    def roll_back(self, to_version: str | None = None) -> PointerMove:
        """Point the name at the version before the current one, or at ``to_version``.

        Rolling back drops the version rolled back from the history, so rolling back again goes
        further back; ``to_version``, if in the history, drops the versions after it likewise;
        any other version of ``_versions/`` is moved to as a publish would (the current one is
        remembered).
        """
        current = self._read_current()
        if current.etag is None:
            where = self.store.location(self.pointer_key)
            raise RefusedError(f"nothing was published as {self.name!r}: no {where}")
        history = () if current.pointer is None else current.pointer.history
        if to_version is None:
            if not history:
                raise RefusedError(
                    f"{self.name!r} has no previous version; roll back with --to VERSION"
                )
            to_version = history[0]
        if to_version in history:
            after = history[history.index(to_version) + 1 :]
        else:
            after = _pushed(current.pointer, to_version)
        target = self.version_key(to_version)
        location = self.store.location(target)
        listed = self.store.list_adapter_files(self.name, target)
        found = adapter_from_listing(self.name, location, listed, signature=True)
        if found is None or not {file.path for file in found.files} & set(WEIGHTS_FILES):
            raise RefusedError(
                f"version {to_version!r} of {self.name!r} does not exist: {location} holds no "
                "adapter"
            )
        files = tuple(PublishedFile.listed(file) for file in found.files)
        return self._point(current, to_version, files, after)

    def _point(
        self,
        current: _Current,
        version: str,
        files: tuple[PublishedFile, ...],
        history: tuple[str, ...],
        *,
        uploaded: tuple[str, ...] = (),
    ) -> PointerMove:
        """Point the name at ``version`` (made of ``files``, ``history`` before it) unless it
        is already, and only if the pointer is still as ``current`` read it."""
        before = current.pointer
        move = PointerMove(
            self.name,
            version,
            None if before is None else before.version,
            self.store.location(self.version_key(version)),
            self.store.location(self.pointer_key),
            uploaded,
            signed_by=self._signer_of(version, files),
        )
        if before is not None and before.version == version and before.files == files:
            return dataclasses.replace(move, previous=None, moved=False)
        pointer = Pointer(
            format=POINTER_FORMAT,
            version=version,
            files=files,
            history=history,
            updated_at=time.time(),
        )
        content = pointer.model_dump_json(indent=2).encode() + b"\n"
        self._check_conditional_writes()
        if not self._retried(
            lambda: self.store.write_object(self.pointer_key, content, replacing=current.etag),
            f"write of {self.pointer_key}",
        ):
            raise RefusedError(
                f"{move.pointer_location} changed meanwhile (another publisher?); it was not "
                f"moved to version {version!r}: run the command again"
            )
        return move

    def _signer_of(self, version: str, files: Sequence[PublishedFile]) -> str | None:
        """Who signed version ``version`` (made of ``files``), as its ``model.sig`` says."""
        signature = next((file for file in files if file.path == SIGNATURE_FILE), None)
        if signature is None:
            return None
        stored = signature.remote_file()
        location = self.store.location(self.version_key(version))
        remote = RemoteAdapter(self.name, "-", location, (stored,))
        with tempfile.TemporaryDirectory(prefix="vllm-lora-") as scratch:
            self.resolver.fetcher.fetch_to(remote, (stored,), Path(scratch))
            try:
                return signing.describe(self.name, Path(scratch, SIGNATURE_FILE))
            except SignatureError as error:
                return f"unreadable: {error}"

    def _check_conditional_writes(self) -> None:
        """Before the first write: `RefusedError` if the store ignores conditional writes, unless
        `allow_unconditional_store` (then a warning of what is not guaranteed)."""
        if self._may_write:
            return
        found = self._retried(
            lambda: self.store.conditional_writes(self.name),
            f"probe of {self.store.probe_key(self.name)}",
        )
        if not found.honoured:
            where = self.store.location(self.store.folder_prefix(self.name))
            ignored = (
                f"the store of {where} ignores conditional writes: it carried out "
                f"{found.ignored()}, which it should have refused; a publish or rollback of "
                f"{self.name!r} running at the same time as this one would not be detected, and "
                "could be undone without notice"
            )
            if not self.allow_unconditional_store:
                raise RefusedError(
                    f"{ignored}. Nothing was published. If only one publisher writes to it at a "
                    "time, publish with --allow-unconditional-store"
                )
            console(stderr=True).print(line(f"warning: {ignored} (--allow-unconditional-store)"))
        self._may_write = True

    def _retried(self, write: Callable[[], _T], describe: str) -> _T:
        """A write to the store (or the check before the first), retried on transient failures
        as the store's reads are (the clients' own retries are off); a retry after a write that
        landed finds it there."""
        return call_with_retries(write, self.store.transfer.transfer_retry, describe)

    def _read_current(self) -> _Current:
        """The name's pointer; a malformed one is reported, and replaced by the move."""
        stored = self.store.read_object(self.pointer_key, MAX_POINTER_BYTES)
        if stored is None:
            return _Current(None, None)
        where = self.store.location(self.pointer_key)
        try:
            return _Current(parse_pointer(self.name, where, stored.content), stored.etag)
        except InvalidAdapterError as error:
            console(stderr=True).print(line(f"warning: {error}; replacing it"))
            return _Current(None, stored.etag)

    def _refuse_other_files(
        self, target: str, files: Sequence[Path], existing: dict[str, RemoteFile]
    ) -> None:
        """`RefusedError` unless each adapter file already in the version folder ``target`` is
        the same as ours (a publish interrupted midway leaves the rest to upload)."""
        ours = {path.name: path for path in files}
        location = self.store.location(target)
        for stored_name, stored in existing.items():
            path = ours.get(stored_name)
            if path is None and stored_name in ADAPTER_FILES:
                raise RefusedError(
                    f"{location} holds {stored_name}, which {files[0].parent} has not: versions "
                    "are never overwritten; publish with another --version"
                )
            same = self._same_signature if stored_name == SIGNATURE_FILE else self._same_content
            if path is not None and not same(location, path, stored):
                raise RefusedError(
                    f"{location} holds another {stored_name}: versions are never overwritten; "
                    "publish with another --version"
                )

    def _same_signature(self, location: str, path: Path, stored: RemoteFile) -> bool:
        """Whether the signature ``stored`` signs what ``path`` signs, by the same signer: the
        same statement and verification material (a signature's own bytes differ each time it is
        made), so that publishing a version again with the same key uploads nothing."""
        remote = RemoteAdapter(self.name, "-", location, (stored,))
        with tempfile.TemporaryDirectory(prefix="vllm-lora-") as scratch:
            self.resolver.fetcher.fetch_to(remote, (stored,), Path(scratch))
            return _signed_content(Path(scratch, stored.path)) == _signed_content(path)

    def _same_content(self, location: str, path: Path, stored: RemoteFile) -> bool:
        """Whether ``stored`` (in folder ``location``) holds the bytes of ``path``: by the MD5
        the store lists, else by reading it back."""
        if stored.size != path.stat().st_size:
            return False
        etag_md5 = _MD5_ETAG.match(stored.etag)
        listed_md5 = stored.checksums.get("md5") or (etag_md5.group(1) if etag_md5 else None)
        if listed_md5 is not None and listed_md5 == _file_digest(path, "md5"):
            return True
        remote = RemoteAdapter(self.name, "-", location, (stored,))
        with tempfile.TemporaryDirectory(prefix="vllm-lora-") as scratch:
            self.resolver.fetcher.fetch_to(remote, (stored,), Path(scratch))
            return filecmp.cmp(path, Path(scratch, stored.path), shallow=False)


def _signed_content(path: Path) -> tuple[object, ...]:
    """What a signature bundle signs and who by: the name and the files with their digests of
    its statement, and its verification material (the statement's other fields are written in
    an order that changes from one process to the next)."""
    try:
        bundle = json.loads(path.read_bytes())
        statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
        resources = sorted(
            json.dumps(item, sort_keys=True) for item in statement["predicate"]["resources"]
        )
        return statement["subject"], resources, bundle["verificationMaterial"]
    except (ValueError, KeyError, TypeError, binascii.Error):
        return (path.read_bytes(),)


def _pushed(pointer: Pointer | None, version: str) -> tuple[str, ...]:
    """The history once ``version`` replaces ``pointer``'s: its version, then its history."""
    earlier = () if pointer is None else (pointer.version, *pointer.history)
    return tuple(dict.fromkeys(v for v in earlier if v != version))[:MAX_HISTORY]


def content_version(files: Sequence[Path]) -> str:
    """The default version of an adapter: the first 12 hex digits of a SHA-256 of its files'
    names and bytes."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}\0{_file_digest(path, 'sha256')}\n".encode())
    return digest.hexdigest()[:12]


def _file_digest(path: Path, algorithm: str) -> str:
    with path.open("rb") as stream:
        return hashlib.file_digest(stream, algorithm).hexdigest()


def _print_move(out: Console, move: PointerMove, done: str) -> None:
    if move.moved:
        previous = f" (was {move.previous})" if move.previous else ""
        out.print(line(f"{done} {move.name}: version {move.version}{previous}"))
    else:
        out.print(line(f"{move.name} is at version {move.version} already: nothing to move"))
    if move.uploaded:
        out.print(line(f"  uploaded: {', '.join(move.uploaded)}"))
    out.print(line(f"  signed by: {move.signed_by}" if move.signed_by else "  unsigned"))
    out.print(line(f"  version folder: {move.version_location}"))
    out.print(line(f"  pointer: {move.pointer_location}"))
    out.print(line(f"  pinned name: {move.name}@{move.version}"))
