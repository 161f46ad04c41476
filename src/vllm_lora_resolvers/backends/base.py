"""`Store`: what one kind of store does, and nothing else. The resolution pipeline
(`vllm_lora_resolvers.resolver.Resolver`) is composed with one.

A store answers a few questions, each one call to it:
- `locate`: does NAME exist, at what version, made of which files (no download);
- `download`: copy one file to a local path;
- `read_head`: the first bytes of a file, when a range is cheap to read;
- `list_names`: the candidate adapter folders, for ``vllm-lora ls``.

It turns its client's errors into ours (`TransientStoreError` is worth retrying). Names, the miss
memory, single flight, checks, the cache, retries and metrics are the pipeline's.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import ClassVar

from vllm_lora_resolvers import metrics
from vllm_lora_resolvers.adapter import adapter_file_names
from vllm_lora_resolvers.cache import NodeCache, snapshot_key
from vllm_lora_resolvers.config import Settings
from vllm_lora_resolvers.errors import TransientStoreError
from vllm_lora_resolvers.names import is_safe_adapter_name
from vllm_lora_resolvers.remote import RemoteAdapter, RemoteFile
from vllm_lora_resolvers.transfer import DEFAULT_TRANSFER, TransferConfig, download_in_parts


class Store(ABC):
    """One store of adapters, identified by ``source`` (``s3://bucket/prefix``), which keys the
    node cache: two stores never share a snapshot.

    It is opened with the settings and the node cache of the process (some stores consult the
    cache to skip a question: the Hub for a commit already fetched) and the `TransferConfig` its
    clients' time limits and ranged reads follow.
    """

    #: The backend's name (`StoreDeclaration.backend`), in metrics and logs.
    backend: ClassVar[str]
    #: Whether `locate` only touches local disk (then cache hits are answered on the event loop,
    #: as vLLM's own filesystem resolver does).
    locate_is_local: ClassVar[bool] = False

    def __init__(
        self,
        source: str,
        settings: Settings,
        cache: NodeCache,
        transfer: TransferConfig = DEFAULT_TRANSFER,
    ) -> None:
        self.source = source
        self.settings = settings
        self.cache = cache
        self.transfer = transfer
        #: Whether `locate` looks for the adapter's signature (``model.sig``) beside its files:
        #: when this server checks signatures (``VLLM_LORA_RESOLVER_TRUST``), or a command shows
        #: them (`Settings.read_signatures`).
        self.lists_signatures = settings.lists_signatures
        #: The file names `locate` looks for in an adapter's folder.
        self.file_names = adapter_file_names(signature=self.lists_signatures)

    @abstractmethod
    def locate(self, name: str) -> RemoteAdapter | None:
        """Find adapter ``name``: its version and files, or ``None`` if it is not in the store.

        One cheap call, no download. Raise `TransientStoreError` for failures worth retrying and
        `StoreUnavailableError` for the rest; `InvalidAdapterError` for a found-but-unsafe one.
        """

    @abstractmethod
    def download(
        self, adapter: RemoteAdapter, file: RemoteFile, destination: Path
    ) -> Mapping[str, str]:
        """Copy ``file`` of ``adapter`` to ``destination`` (its parent exists).

        Return the checksums the store declares for the bytes it delivered (algorithm -> hex),
        beyond those `locate` already gave; the pipeline verifies them all.
        """

    @abstractmethod
    def list_names(self, folder: str = "") -> Iterator[str]:
        """Names of the folders directly in ``folder`` (``""``: the store's top): the candidate
        adapters, which `locate` tells apart."""

    def read_head(self, adapter: RemoteAdapter, file: RemoteFile, length: int) -> bytes | None:
        """The first ``length`` bytes of ``file`` as `locate` saw it, if the store can read a
        range cheaply (``None``: it cannot, and the weights are checked once downloaded)."""
        return None

    def accepts_name(self, name: str) -> bool:
        """Whether ``name``, a safe name (`is_safe_name`), is one this store could hold: checked
        before any store call; a safe name of another form (another store's) is ``missing`` here.
        """
        return is_safe_adapter_name(name)

    def snapshot_name(self, name: str) -> str:
        """The name the snapshots of adapter ``name`` are kept under, in their manifest and key:
        ``name`` itself, unless the store has several names for one adapter (the Hub's
        ``@revision``), which then share snapshots."""
        return name

    def snapshot_version(self, version: str) -> str:
        """The version a snapshot of ``version`` records: ``version + "+signed"`` when this
        server checks signatures, so that its snapshots (which hold the signature) are never
        those of a server that does not (which do not), even where the store's version is the
        same for both (the Hub's commit)."""
        return f"{version}+signed" if self.settings.trust else version

    def snapshot_key_for(self, name: str, version: str) -> str:
        """The node cache's key of version ``version`` of adapter ``name`` of this store."""
        return snapshot_key(self.source, self.snapshot_name(name), self.snapshot_version(version))

    def snapshot_key_of(self, remote: RemoteAdapter) -> str:
        """The node cache's key of what `locate` found: the snapshot it pointed at, if any."""
        return remote.cached_snapshot or self.snapshot_key_for(remote.name, remote.version)

    def download_ranges(
        self,
        destination: Path,
        size: int,
        fetch_range: Callable[[int, int, Callable[[bytes], None]], None],
        declared_algorithms: Iterable[str] = (),
    ) -> None:
        """For `download`: fetch ``size`` bytes into ``destination`` in parallel ranged parts,
        each retried and resumed where it broke, as `transfer` says (see `download_in_parts`).
        ``declared_algorithms``: those of the checksums the store declared since `locate` (in
        an S3 ``HEAD``), to compute as the bytes come, with the others the pipeline verifies."""
        download_in_parts(
            destination,
            size,
            fetch_range,
            config=self.transfer,
            on_retry=self.count_retry,
            declared_algorithms=declared_algorithms,
        )

    def count_retry(self, _: TransientStoreError) -> None:
        """Count one retry of a call to this store (the ``retries`` metric)."""
        metrics.RETRIES.labels(self.backend).inc()
