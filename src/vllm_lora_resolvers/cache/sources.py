"""Whose snapshots this process serves: the stores it resolves from, and those withheld while
their store refuses it (or cannot be reached and cached copies may not be served)."""

from __future__ import annotations

from vllm_lora_resolvers.cache.snapshots import Snapshot


class ServedSources:
    """The sources (stores' identities) of the snapshots this process may serve."""

    def __init__(self) -> None:
        self._served: set[str] = set()
        self._withheld: dict[str, str] = {}

    def serve(self, source: str) -> None:
        """Declare that this process resolves adapters from ``source``."""
        self._served.add(source)

    def serves(self, snapshot: Snapshot) -> bool:
        """Whether ``snapshot`` comes from a store this process resolves from: pods of other
        stores share the node cache, and their snapshots (and ``NAME`` links) are not ours."""
        return snapshot.manifest.source in self._served

    def withhold(self, source: str, reason: str) -> None:
        """Serve no snapshot of ``source`` in this process, by any resolver, until `resume`:
        its store refused us, or cannot be reached while cached copies may not be served.
        ``reason`` is what a client asking for one of them is told."""
        self._withheld[source] = reason

    def resume(self, source: str) -> None:
        """The store of ``source`` answered again: its snapshots may be served."""
        self._withheld.pop(source, None)

    def withheld(self, snapshot: Snapshot) -> str | None:
        """Why ``snapshot`` may not be served now (`withhold`), or ``None``."""
        return self._withheld.get(snapshot.manifest.source)
