"""A small Hugging Face Hub-compatible HTTP server on 127.0.0.1, for tests and benchmarks.

It answers what ``huggingface_hub`` 2.x asks a Hub for, the way the real Hub answers it
(``shared/STORAGE_TESTING.md``): revision info with ``sha`` and ``siblings``, tree listings paged
by ``Link: rel="next"``, ``paths-info``, and ``HEAD``/``GET`` on ``resolve`` with
``X-Repo-Commit``, ``ETag`` (git blob id, or the sha256 of an LFS file) and ranges; errors carry
``X-Error-Code``. Model repos ``org/name`` live in memory as commits, branches and tags; file
contents are stored once each under ``root/blobs``, named by their sha256::

    with HubServer(tmp_path) as hub:
        sha = hub.push("org/adapters", {"sql": Path("adapters/sql")})
        os.environ["HF_ENDPOINT"] = hub.url
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlencode

from devtools.loopback import ThreadedHttpServer

#: Entries per page of a tree listing (the real Hub pages by 1000; small pages exercise paging).
TREE_PAGE_SIZE = 50
#: Files stored in LFS: by extension, as a model repo's ``.gitattributes`` says, or by size.
_LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".msgpack")
_LFS_MIN_SIZE = 10 << 20
_CHUNK = 1 << 20


@dataclass(frozen=True)
class HubFile:
    """A file of a commit: its content's sha256 (its blob's name), size, git blob id, LFS or not."""

    sha256: str
    size: int
    oid: str
    lfs: bool

    def entry(self, path: str) -> dict[str, Any]:
        """The file's entry in a tree or paths-info listing (LFS ``oid`` is the sha256)."""
        lfs = {"oid": self.sha256, "size": self.size, "pointerSize": len(self.pointer())}
        entry = {"type": "file", "oid": self.oid, "size": self.size, "path": path}
        return entry | ({"lfs": lfs} if self.lfs else {})

    def sibling(self, path: str) -> dict[str, Any]:
        """The file's entry in revision info with ``blobs=true`` (LFS keyed by ``sha256`` there)."""
        lfs = {"sha256": self.sha256, "size": self.size, "pointerSize": len(self.pointer())}
        sibling = {"rfilename": path, "size": self.size, "blobId": self.oid}
        return sibling | ({"lfs": lfs} if self.lfs else {})

    def pointer(self) -> bytes:
        """The LFS pointer git stores in place of the content."""
        return (
            f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\n"
            f"size {self.size}\n"
        ).encode()


Snapshot = dict[str, HubFile]


@dataclass
class _Repo:
    commits: dict[str, Snapshot] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    private_token: str | None = None
    gated_token: str | None = None

    def commit_of(self, revision: str) -> str:
        if revision in self.commits:
            return revision
        commit = self.branches.get(revision) or self.tags.get(revision)
        if commit is None:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return commit


def _commit(repo_id: str, repo: _Repo, parent: str | None, snapshot: Snapshot, branch: str) -> str:
    """Record ``snapshot`` as a new commit on ``branch`` of ``repo``; its sha."""
    listing = "".join(f"{p}\0{f.oid}\n" for p, f in sorted(snapshot.items()))
    text = f"{repo_id}\0{parent}\0{len(repo.commits)}\0{listing}"
    sha = hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()
    repo.commits[sha] = snapshot
    repo.branches[branch] = sha
    return sha


class HubError(Exception):
    """An error answer: HTTP status, ``X-Error-Code``, message and any other headers."""

    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message = status, message
        self.headers = {"X-Error-Code": code, "X-Error-Message": message, **(headers or {})}


class HubServer(ThreadedHttpServer[ThreadingHTTPServer]):
    """Serve model repos on ``http://127.0.0.1:PORT``; a context manager.

    Every request is counted as ``(method, path with query)`` in `requests`.
    """

    def __init__(self, root: Path, port: int = 0) -> None:
        self.blobs = root / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self._repos: dict[str, _Repo] = {}
        self._lock = threading.Lock()
        self._requests: list[tuple[str, str]] = []
        super().__init__(ThreadingHTTPServer, _Handler, port)
        cast("Any", self._server).hub = self

    @property
    def requests(self) -> list[tuple[str, str]]:
        """(method, path with query) of every request received so far."""
        with self._lock:
            return list(self._requests)

    def reset_counters(self) -> None:
        """Forget the requests seen."""
        with self._lock:
            self._requests.clear()

    # -- changing repos ------------------------------------------------------------------

    def push(self, repo_id: str, files: Mapping[str, Path | bytes], branch: str = "main") -> str:
        """Commit ``files`` (path in repo -> content) on top of ``branch``; the new commit's sha.

        A `Path` to a folder adds every file in it under that path (``""``: the repo root). A new
        branch starts from ``main``; a new repo is created public and ungated.
        """
        added = {path: self._store(path, content) for path, content in _expand(files)}
        with self._lock:
            repo = self._repos.setdefault(repo_id, _Repo())
            parent = repo.branches.get(branch) or repo.branches.get("main")
            snapshot = {**(repo.commits[parent] if parent else {}), **added}
            return _commit(repo_id, repo, parent, snapshot, branch)

    def remove(self, repo_id: str, folder: str, branch: str = "main") -> str:
        """Commit the removal of every file under ``folder`` on ``branch``; the new commit's sha."""
        with self._lock:
            repo = self._repos[repo_id]
            parent = repo.branches[branch]
            snapshot = {
                path: file
                for path, file in repo.commits[parent].items()
                if not path.startswith(f"{folder}/")
            }
            return _commit(repo_id, repo, parent, snapshot, branch)

    def tag(self, repo_id: str, tag: str, revision: str) -> None:
        """Point ``tag`` at the commit ``revision`` (a sha, branch or tag) resolves to."""
        with self._lock:
            repo = self._repos[repo_id]
            repo.tags[tag] = repo.commit_of(revision)

    def set_private(self, repo_id: str, token: str) -> None:
        """Only requests with ``Authorization: Bearer <token>`` see the repo; others are told
        it does not exist (401 without a token, 404 with another one), as the Hub does."""
        with self._lock:
            self._repos[repo_id].private_token = token

    def set_gated(self, repo_id: str, token: str) -> None:
        """Anyone sees the repo and its listing; only ``token`` may read its files."""
        with self._lock:
            self._repos[repo_id].gated_token = token

    def blob_of(self, repo_id: str, path: str, revision: str = "main") -> Path:
        """Where the content of ``path`` at ``revision`` is stored (to corrupt it in tests)."""
        with self._lock:
            repo = self._repos[repo_id]
            return self.blobs / repo.commits[repo.commit_of(revision)][path].sha256

    def _store(self, path: str, content: Path | bytes) -> HubFile:
        sha256, size = hashlib.sha256(), 0
        with tempfile.NamedTemporaryFile(dir=self.blobs, delete=False) as temporary:
            for chunk in _chunks(content):
                sha256.update(chunk)
                temporary.write(chunk)
                size += len(chunk)
        blob = Path(temporary.name).replace(self.blobs / sha256.hexdigest())
        lfs = path.endswith(_LFS_SUFFIXES) or size >= _LFS_MIN_SIZE
        pointer = HubFile(sha256.hexdigest(), size, "", lfs).pointer()
        git = hashlib.sha1(f"blob {size}\0".encode(), usedforsecurity=False)
        for chunk in [pointer] if lfs else _chunks(blob):
            git.update(chunk)
        return HubFile(sha256.hexdigest(), size, git.hexdigest(), lfs)

    # -- reading repos -------------------------------------------------------------------

    def _snapshot(
        self, repo_id: str, revision: str, token: str | None, files: bool
    ) -> tuple[_Repo, str, Snapshot]:
        """The repo, commit and files ``revision`` names, as ``token`` may see them."""
        with self._lock:
            repo = self._repos.get(repo_id)
            if repo is None or repo.private_token not in (None, token):
                raise HubError(
                    401 if token is None else 404, "RepoNotFound", "Repository not found"
                )
            if files and repo.gated_token not in (None, token):
                raise HubError(
                    401 if token is None else 403,
                    "GatedRepo",
                    f"Access to model {repo_id} is restricted and you are not in the authorized "
                    "list. Visit the repo page to ask for access.",
                )
            commit = repo.commit_of(revision)
            return repo, commit, repo.commits[commit]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30  # an idle keep-alive connection ends its thread
    # As a real server: a body sent after its headers does not wait for the client's delayed
    # ACK of them (Nagle's algorithm), which cost every small answer 40 ms.
    disable_nagle_algorithm = True
    hub: HubServer
    token: str | None

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests count requests instead."""

    def do_GET(self) -> None:
        """Every route; ``HEAD`` and ``POST`` too (the handlers look at ``self.command``)."""
        self.hub = cast("HubServer", cast("Any", self.server).hub)
        with self.hub._lock:
            self.hub._requests.append((self.command, self.path))
        path, _, query = self.path.partition("?")
        # Split before unquoting: a revision arrives quoted whole ("refs%2Fpr%2F1").
        parts = [unquote(part) for part in path.split("/")[1:]]
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        self.token = token if scheme.lower() == "bearer" and token else None
        try:
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                self._api("/".join(parts[2:4]), parts[4:], parse_qs(query))
            elif len(parts) >= 5 and parts[2] == "resolve" and self.command != "POST":
                snapshot = self.hub._snapshot("/".join(parts[:2]), parts[3], self.token, True)
                self._resolve(snapshot[1], snapshot[2], "/".join(parts[4:]))
            else:
                raise HubError(404, "NotFound", f"no route for {self.command} {path}")
        except HubError as error:
            self._send(error.status, error.headers, json.dumps({"error": error.message}).encode())

    do_HEAD = do_POST = do_GET  # noqa: N815 - http.server's names

    def _api(self, repo_id: str, rest: list[str], query: dict[str, list[str]]) -> None:
        hub, token = self.hub, self.token
        if not rest or (rest[0] == "revision" and len(rest) == 2):
            repo, commit, snapshot = hub._snapshot(
                repo_id, rest[-1] if rest else "main", token, False
            )
            blobs = query.get("blobs", [""])[0].lower() == "true"
            siblings = [
                f.sibling(p) if blobs else {"rfilename": p} for p, f in sorted(snapshot.items())
            ]
            gated = "manual" if repo.gated_token is not None else False
            private = repo.private_token is not None
            info = {"id": repo_id, "sha": commit, "private": private, "gated": gated}
            self._json(info | {"siblings": siblings})
        elif rest[0] == "tree" and len(rest) >= 2:
            snapshot = hub._snapshot(repo_id, rest[1], token, False)[2]
            folder = "/".join(rest[2:]).strip("/")
            entries = _tree(snapshot, folder, query.get("recursive", [""])[0].lower() == "true")
            if folder and not entries:
                raise HubError(404, "EntryNotFound", f"{folder} does not exist on this revision")
            start = int(query.get("cursor", ["0"])[0])
            end, headers = start + TREE_PAGE_SIZE, {}
            if end < len(entries):
                next_query = urlencode({**{k: v[0] for k, v in query.items()}, "cursor": end})
                url = f"http://{self.headers['Host']}{self.path.partition('?')[0]}?{next_query}"
                headers["Link"] = f'<{url}>; rel="next"'
            self._json(entries[start:end], headers)
        elif rest[0] == "paths-info" and len(rest) == 2 and self.command == "POST":
            snapshot = hub._snapshot(repo_id, rest[1], token, False)[2]
            wanted = self._posted_paths()
            self._json([e for e in _tree(snapshot, "", recursive=True) if e["path"] in wanted])
        else:
            raise HubError(404, "NotFound", f"no API route {'/'.join(rest)}")

    def _posted_paths(self) -> set[str]:
        raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if "json" in self.headers.get("Content-Type", ""):
            paths = json.loads(raw).get("paths", [])
        else:
            paths = parse_qs(raw.decode()).get("paths", [])
        return {str(path).strip("/") for path in paths}

    def _resolve(self, commit: str, snapshot: Snapshot, path: str) -> None:
        file = snapshot.get(path)
        if file is None:
            raise HubError(404, "EntryNotFound", f"{path} does not exist at {commit}")
        etag = f'"{file.sha256 if file.lfs else file.oid}"'
        headers = {"X-Repo-Commit": commit, "ETag": etag, "Accept-Ranges": "bytes"}
        if file.lfs:
            headers |= {"X-Linked-Etag": etag, "X-Linked-Size": str(file.size)}
        start, end, status = 0, file.size, 200
        requested = _parse_range(self.headers.get("Range"), file.size)
        if requested is not None:
            (start, end), status = requested, 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{file.size}"
        self._send(
            status, headers | {"Content-Type": "application/octet-stream"}, length=end - start
        )
        if self.command == "GET" and end > start:
            with (self.hub.blobs / file.sha256).open("rb") as blob:
                try:
                    self.connection.sendfile(blob, start, end - start)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

    def _json(self, data: object, headers: Mapping[str, str] | None = None) -> None:
        self._send(
            200, {"Content-Type": "application/json", **(headers or {})}, json.dumps(data).encode()
        )

    def _send(
        self,
        status: int,
        headers: Mapping[str, str],
        payload: bytes = b"",
        length: int | None = None,
    ) -> None:
        """Send the head; the payload too, unless this is a ``HEAD`` request."""
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload) if length is None else length))
        self.end_headers()
        if payload and self.command != "HEAD":
            self.wfile.write(payload)


def _tree(snapshot: Snapshot, folder: str, recursive: bool) -> list[dict[str, Any]]:
    """Entries under ``folder`` (files and directories), sorted by path."""
    prefix = f"{folder}/" if folder else ""
    entries: dict[str, dict[str, Any]] = {}
    for path, file in sorted(snapshot.items()):
        if not path.startswith(prefix):
            continue
        parts = path[len(prefix) :].split("/")
        for depth in range(1, len(parts) if recursive else min(2, len(parts))):
            directory = prefix + "/".join(parts[:depth])
            entry = entries.setdefault(
                directory, {"type": "directory", "size": 0, "path": directory}
            )
            entry["oid"] = hashlib.sha1(
                f"{entry.get('oid')}{file.oid}".encode(), usedforsecurity=False
            ).hexdigest()
        if recursive or len(parts) == 1:
            entries[path] = file.entry(path)
    return [entries[path] for path in sorted(entries)]


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(start, end)`` (end exclusive) of a single ``bytes=`` range; None to send it all."""
    first, _, last = (header or "").removeprefix("bytes=").partition("-")
    if not header or "," in header or not (first.isdigit() or last.isdigit()):
        return None
    if not first:
        start, end = max(0, size - int(last)), size
    else:
        start, end = int(first), min(size, int(last) + 1 if last else size)
    if start >= end:
        raise HubError(
            416, "RangeNotSatisfiable", "bad range", {"Content-Range": f"bytes */{size}"}
        )
    return start, end


def _expand(files: Mapping[str, Path | bytes]) -> Iterator[tuple[str, Path | bytes]]:
    for path, content in files.items():
        if isinstance(content, Path) and content.is_dir():
            for inner in sorted(p for p in content.rglob("*") if p.is_file()):
                yield (
                    f"{path.strip('/')}/{inner.relative_to(content).as_posix()}".lstrip("/"),
                    inner,
                )
        else:
            yield path.strip("/"), content


def _chunks(content: Path | bytes) -> Iterator[bytes]:
    if isinstance(content, bytes):
        yield content
        return
    with content.open("rb") as stream:
        while chunk := stream.read(_CHUNK):
            yield chunk
