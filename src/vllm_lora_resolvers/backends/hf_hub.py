"""Adapters from Hugging Face Hub model repos (``VLLM_LORA_RESOLVER_HF_REPO_LIST``).

Adapter ``NAME`` is ``org/repo`` (an adapter at the repo root) or ``org/repo/sub/folder`` (one in a
folder), optionally pinned with ``@REVISION``: a branch, a tag or a 40-hex commit
(``org/adapters/sql@v2``). Only repos in the list are served; any other name is refused before
any request. The version is the commit the revision resolves to, so a push to a branch is seen on
the next resolve and a commit pin never changes.

Requests per resolve: none for a commit pin already in the node cache. Otherwise one ``HEAD`` of
the adapter's ``adapter_config.json`` (the Hub answers with the commit; a miss ends there, so does
a cache hit), then one ``paths-info`` of the adapter's own files at that commit (sizes, LFS
sha256), then one ``GET`` per file (ranged ``GET``s in parallel for large ones). The repo is never
listed, so a resolve costs the same in a repo of one adapter or of thousands, and an adapter
pushed later is found as soon as its miss is forgotten. Endpoint and token are huggingface_hub's
own: ``HF_ENDPOINT``, ``HF_TOKEN`` or the stored login, ``HF_HUB_OFFLINE``; time limits are the
pipeline's (`TransferConfig`; not ``HF_HUB_ETAG_TIMEOUT`` or ``HF_HUB_DOWNLOAD_TIMEOUT``), so that a
Hub that does not answer costs a request seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import httpx2
from huggingface_hub import (
    HfApi,
    constants,
    get_session,
    get_token,
    hf_hub_url,
    hf_raise_for_status,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]  # lazy export

from vllm_lora_resolvers.adapter import CONFIG_FILE, WEIGHTS_FILES
from vllm_lora_resolvers.backends.base import Store
from vllm_lora_resolvers.backends.endpoints import public_endpoint
from vllm_lora_resolvers.cache import NodeCache
from vllm_lora_resolvers.config import HF_REPO_LIST, ConfigurationError, Settings
from vllm_lora_resolvers.errors import (
    IntegrityError,
    StoreRefusedError,
    StoreUnavailableError,
    TransientStoreError,
)
from vllm_lora_resolvers.names import is_safe_name
from vllm_lora_resolvers.remote import RemoteAdapter, RemoteFile
from vllm_lora_resolvers.transfer import (
    DEFAULT_TRANSFER,
    TransferConfig,
    check_stored_size,
    stored_size,
)

_CHUNK = 1 << 20
_LIBRARY = "vllm-lora-resolvers"
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?")
_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class HubAdapter:
    """Where an adapter name points: a repo, a folder in it (``""``: the root), a revision."""

    repo_id: str
    folder: str
    revision: str

    def path(self, file_name: str) -> str:
        """The path of ``file_name`` of the adapter, in the repo."""
        return f"{self.folder}/{file_name}" if self.folder else file_name


def parse_repo_list(repos: Iterable[str]) -> tuple[str, ...]:
    """Check ``org/repo`` entries; longest first, so the most specific repo matches a name."""
    checked = tuple(repos)
    for repo in checked:
        if not _REPO_ID.fullmatch(repo) or ".." in repo:
            raise ConfigurationError(
                f"{HF_REPO_LIST.name}: {repo!r} is not a Hub repo id such as 'org/repo'"
            )
    return tuple(sorted(set(checked), key=len, reverse=True))


class HfHubStore(Store):
    """Adapters in listed Hub model repos: ``org/repo[/folder][@revision]``."""

    backend: ClassVar[str] = "hf"

    def __init__(
        self,
        repos: Iterable[str],
        settings: Settings,
        cache: NodeCache,
        transfer: TransferConfig = DEFAULT_TRANSFER,
    ) -> None:
        self.repos = parse_repo_list(repos)
        # huggingface_hub reads HF_ENDPOINT once, at import; a resolver built later honours a
        # value set since (as in tests that start a local Hub).
        endpoint = os.environ.get("HF_ENDPOINT", "").strip() or constants.ENDPOINT
        self.endpoint = endpoint.rstrip("/")
        self.api = HfApi(endpoint=self.endpoint, library_name=_LIBRARY)
        # huggingface_hub's shared client (its TLS set-up: ~40 ms here) is built now, at start-up,
        # rather than by the first request for an adapter.
        get_session()
        #: The endpoint as locations and messages show it (no credentials).
        self.public_endpoint = public_endpoint(self.endpoint)
        # The cache key's source: two Hubs (or mirrors) never share a snapshot.
        source = "hf://" + self.public_endpoint.split("://", 1)[-1]
        super().__init__(source, settings, cache, transfer)

    def parse_name(self, name: str) -> HubAdapter | None:
        """The repo, folder and revision ``name`` points to; ``None`` if it is not one of ours."""
        if not is_safe_name(name):
            return None
        path, pinned, revision = name.partition("@")
        for repo in self.repos:
            if path == repo or path.startswith(f"{repo}/"):
                folder = path[len(repo) + 1 :]
                return HubAdapter(repo, folder, revision if pinned else constants.DEFAULT_REVISION)
        return None

    def accepts_name(self, name: str) -> bool:
        """Names in listed repos only (no request); any other is another store's."""
        return self.parse_name(name) is not None

    def snapshot_name(self, name: str) -> str:
        """``org/repo[/folder]``, without the ``@revision``: the version is the commit, so every
        spelling of one commit (``sql``, ``sql@main``, ``sql@v1``, ``sql@COMMIT``) shares one
        snapshot, fetched once."""
        return name.partition("@")[0]

    def locate(self, name: str) -> RemoteAdapter | None:
        """``HEAD`` the config for the commit, then ``paths-info`` of the adapter's files.

        A commit pin skips the ``HEAD``; a snapshot of that commit already cached skips the rest.
        """
        target = self.parse_name(name)
        if target is None:
            return None
        try:
            with hub_errors(f"looking up {name!r}", target.repo_id):
                commit = target.revision
                if not _COMMIT.fullmatch(commit):
                    commit = self._commit_of(target)
                location = f"{self.public_endpoint}/{target.repo_id}/tree/{commit}/{target.folder}"
                location = location.rstrip("/")
                key = self.snapshot_key_for(name, commit)
                if self.cache.contains(key):
                    return RemoteAdapter(name, commit, location, (), cached_snapshot=key)
                files = self._adapter_files_at(target, commit)
        except _NotOnHubError:
            return None
        if not files or files[0].path != CONFIG_FILE:
            return None
        return RemoteAdapter(name, commit, location, files)

    def list_names(self, folder: str = "") -> Iterator[str]:
        """Every adapter of the listed repos at their default revision: each folder holding an
        ``adapter_config.json``. One (paginated) recursive tree listing per repo; none for a
        ``folder``, whose adapters that listing named already.

        >>> list(store.list_names())  # doctest: +SKIP
        ['acme/adapters/chat', 'acme/adapters/sql']
        """
        if folder:
            return
        for repo in sorted(self.repos):
            with hub_errors(f"listing {repo}", repo):
                paths = self.api.list_repo_files(repo)
            for path in sorted(paths):
                folder, _, file_name = path.rpartition("/")
                if file_name == CONFIG_FILE:
                    yield f"{repo}/{folder}" if folder else repo

    def _commit_of(self, target: HubAdapter) -> str:
        """The commit ``target.revision`` is at, from a ``HEAD`` of the adapter's config."""
        url = hf_hub_url(
            target.repo_id,
            target.path(CONFIG_FILE),
            revision=target.revision,
            endpoint=self.endpoint,
        )
        metadata = self.api.get_hf_file_metadata(url=url, timeout=self.transfer.lookup_timeout[1])
        commit = metadata.commit_hash
        if commit is None or not _COMMIT.fullmatch(commit):
            raise StoreUnavailableError(
                f"{self.public_endpoint} did not name the commit of "
                f"{target.repo_id}@{target.revision}; is HF_ENDPOINT a Hugging Face Hub?"
            )
        return commit

    def _adapter_files_at(self, target: HubAdapter, commit: str) -> tuple[RemoteFile, ...]:
        """The config and the first weights file (vLLM's order) at ``commit``, and ``model.sig``
        when signatures are checked: one request."""
        # HfApi.get_paths_info takes no timeout: a stalled Hub would hold a resolver thread.
        response = get_session().post(
            f"{self.endpoint}/api/models/{target.repo_id}/paths-info/{commit}",
            data={"paths": [target.path(name) for name in self.file_names], "expand": False},
            headers=build_hf_headers(library_name=_LIBRARY),
            timeout=self.transfer.lookup_timeout[1],
        )
        hf_raise_for_status(response)
        listed = {entry["path"]: entry for entry in response.json() if entry["type"] == "file"}
        files = {}
        for file_name in self.file_names:
            entry = listed.get(target.path(file_name))
            if entry is None:
                continue
            lfs = entry.get("lfs")
            checksums = {"sha256": str(lfs["oid"])} if lfs else {}
            files[file_name] = RemoteFile(
                file_name, int(entry["size"]), checksums, str(entry["oid"])
            )
        return tuple(_first_weights_only(files))

    def download(
        self, adapter: RemoteAdapter, file: RemoteFile, destination: Path
    ) -> Mapping[str, str]:
        """Ranged ``GET``s of the file at the adapter's commit, in parallel for a large one.

        An LFS file is verified against the sha256 the Hub declared (``locate`` put it in the
        file's checksums); any other file against its git blob id, here.
        """
        target = self.parse_name(adapter.name)
        assert target is not None  # locate found it
        url = hf_hub_url(
            target.repo_id, target.path(file.path), revision=adapter.version, endpoint=self.endpoint
        )
        doing = f"downloading {file.path} of {adapter.name!r}"

        def fetch_range(start: int, end: int, write: Callable[[bytes], None]) -> None:
            with hub_errors(f"{doing} (bytes {start}-{end})", target.repo_id):
                _fetch_range(url, file, start, end, write, timeout=self.transfer.transfer_timeout)

        self.download_ranges(destination, file.size, fetch_range)
        if not file.checksums and file.etag and git_blob_id(destination) != file.etag:
            raise IntegrityError(f"{file.path}: git blob id does not match what the Hub declared")
        return {}


def _first_weights_only(files: Mapping[str, RemoteFile]) -> list[RemoteFile]:
    """``files`` without the weights files after the first (vLLM's order): vLLM loads the first
    one present; the others do not matter."""
    weights = [name for name in WEIGHTS_FILES if name in files]
    return [file for name, file in files.items() if name not in weights[1:]]


def _fetch_range(
    url: str,
    file: RemoteFile,
    start: int,
    end: int,
    write: Callable[[bytes], None],
    *,
    timeout: tuple[float, float],
) -> None:
    """Stream bytes ``[start, end)`` of ``file`` (``GET url``) to ``write``, unless the Hub says
    the file is of another size than it declared.

    Redirects to a CDN are followed; httpx drops the ``Authorization`` header on another origin.
    """
    headers = build_hf_headers(library_name=_LIBRARY)
    headers["Range"] = f"bytes={start}-{end - 1}"
    connect, read = timeout
    limits = httpx2.Timeout(read, connect=connect)
    with get_session().stream("GET", url, headers=headers, timeout=limits) as response:
        hf_raise_for_status(response)
        if response.status_code != 206 and start != 0:  # a whole body is fine from byte 0 only
            status = response.status_code
            raise StoreUnavailableError(f"the Hub ignored a Range request (HTTP {status})")
        check_stored_size(file, stored_size(response.headers.get("Content-Range")))
        for chunk in response.iter_bytes(_CHUNK):
            write(chunk)


def git_blob_id(path: Path) -> str:
    """The git object id of the file's content, which the Hub gives for files not in LFS."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode(), usedforsecurity=False)
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class _NotOnHubError(StoreUnavailableError):
    """The revision or the file does not exist (``locate`` answers ``None``)."""


@contextmanager
def hub_errors(doing: str, repo_id: str) -> Iterator[None]:
    """Turn huggingface_hub and httpx errors into ours, with messages that never hold a token."""
    try:
        yield
    except (RevisionNotFoundError, EntryNotFoundError):
        raise _NotOnHubError(f"{doing} failed: not on the Hub") from None
    except GatedRepoError:
        raise StoreRefusedError(
            f"{doing} failed: {repo_id} is a gated repo and {_whose_token()} has not been "
            "granted access; request access on the Hub, or set HF_TOKEN to a token that has it"
        ) from None
    except RepositoryNotFoundError:
        raise StoreRefusedError(
            f"{doing} failed: repo {repo_id} does not exist or is private and {_whose_token()} "
            f"cannot read it; check {HF_REPO_LIST.name} and HF_TOKEN"
        ) from None
    except HfHubHTTPError as error:
        status = error.response.status_code
        message = f"{doing} failed: HTTP {status}"
        if status in (429, 408) or status >= 500:
            raise TransientStoreError(message) from None
        if status in (401, 403):
            raise StoreRefusedError(
                f"{message}: the Hub refused {_whose_token()}; check HF_TOKEN"
            ) from None
        raise StoreUnavailableError(message) from None
    except OfflineModeIsEnabled:
        raise StoreUnavailableError(f"{doing} failed: HF_HUB_OFFLINE is set") from None
    except httpx2.RequestError as error:
        raise TransientStoreError(f"{doing} failed: {type(error).__name__}") from None
    except (json.JSONDecodeError, KeyError) as error:
        raise TransientStoreError(
            f"{doing} failed: unexpected answer from the Hub ({type(error).__name__})"
        ) from None


def _whose_token() -> str:
    """Which credentials were sent, for error messages (never the token itself)."""
    return "the token in use" if get_token() else "an anonymous request (no HF_TOKEN)"
