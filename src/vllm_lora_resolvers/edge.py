"""The vLLM edge: the ``LoRAResolver`` vLLM's registry holds for one of our stores.

vLLM awaits ``resolve_lora`` on its event loop. Answers that need no blocking call come from the
pipeline at once (`Resolver.answer_at_once`); the rest run `Resolver.resolve`
on this resolver's threads. A store that cannot answer lets the next resolver try, or fails the
request, as ``VLLM_LORA_RESOLVER_STORE_DOWN`` says. Everything else is the pipeline's.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from vllm_lora_resolvers.errors import ResolverError, StoreUnavailableError, for_clients
from vllm_lora_resolvers.resolver import ResolvedAdapter, Resolver

if TYPE_CHECKING:
    from vllm.lora.request import LoRARequest

logger = logging.getLogger("vllm.lora_resolvers")

#: Resolutions of one store in flight at once (store calls, downloads, lock waits).
RESOLUTIONS_IN_FLIGHT = 16


class VllmResolver:
    """vLLM's resolver for ``pipeline``'s store (vLLM's ``LoRAResolver`` ABC registers it as a
    virtual subclass, so this package imports without vLLM)."""

    def __init__(self, pipeline: Resolver) -> None:
        self.pipeline = pipeline
        self._threads = ThreadPoolExecutor(
            max_workers=RESOLUTIONS_IN_FLIGHT, thread_name_prefix=f"lora-{pipeline.backend}"
        )

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        """A ``LoRARequest``, or ``None`` if this store has no such adapter (or cannot answer,
        with ``VLLM_LORA_RESOLVER_STORE_DOWN=next``). An error reaches the client without the
        store's locations; the server's log has them."""
        try:
            resolved = await self._resolve(base_model_name, lora_name)
        except ResolverError as error:
            client_error = for_clients(error)
            if client_error is not error:
                logger.info("%s store: %s", self.pipeline.backend, error)
            raise client_error from None
        return None if resolved is None else lora_request(resolved)

    async def _resolve(self, base_model_name: str, lora_name: str) -> ResolvedAdapter | None:
        answered, resolved = self.pipeline.answer_at_once(base_model_name, lora_name)
        if answered:
            return resolved
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._threads, self.pipeline.resolve, base_model_name, lora_name
            )
        except StoreUnavailableError as error:
            if self.pipeline.settings.store_down == "fail":
                raise
            logger.warning(
                "%s store cannot answer for %r (%s); trying the next resolver "
                "(VLLM_LORA_RESOLVER_STORE_DOWN=next)",
                self.pipeline.backend,
                lora_name[:300],
                error,
            )
            return None


def lora_request(resolved: ResolvedAdapter) -> LoRARequest:
    """vLLM's request for a resolved adapter: its name, stable id and immutable path."""
    from vllm.lora.request import LoRARequest

    return LoRARequest(
        lora_name=resolved.name, lora_int_id=resolved.lora_int_id, lora_path=str(resolved.path)
    )
