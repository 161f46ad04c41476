"""What a store answers a lookup with: an adapter's version and the files that make it up."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from vllm_lora_resolvers.adapter import CONFIG_FILE, WEIGHTS_FILES
from vllm_lora_resolvers.transfer import RemoteFile


@dataclass(frozen=True)
class RemoteAdapter:
    """An adapter found in a store: its version and the files that make it up.

    ``version`` is opaque and changes whenever the content may have changed. A backend that
    finds an adapter already snapshotted in the node cache names it in ``cached_snapshot``.
    """

    name: str
    version: str
    location: str
    files: tuple[RemoteFile, ...]
    cached_snapshot: str | None = None

    def file(self, path: str) -> RemoteFile | None:
        """The file at ``path`` (relative to the adapter folder), if the adapter has it."""
        return next((file for file in self.files if file.path == path), None)


def adapter_from_listing(
    name: str, location: str, listed: Mapping[str, RemoteFile]
) -> RemoteAdapter | None:
    """The adapter in one listed folder (file name -> file), or ``None`` if it has no config.

    It is made of the config and the first weights file in vLLM's order of preference; its
    version changes whenever the etag (object version) or size of one of those does.
    """
    config = listed.get(CONFIG_FILE)
    weights = next((listed[n] for n in WEIGHTS_FILES if n in listed), None)
    if config is None:
        return None
    files = (config,) if weights is None else (config, weights)
    fingerprint = hashlib.sha256()
    for file in files:
        fingerprint.update(f"{file.path}\0{file.etag}\0{file.size}\n".encode())
    return RemoteAdapter(name, fingerprint.hexdigest()[:32], location, files)
