"""Load plugins the way a vLLM server process does, then resolve names through the registry.

Prints one JSON object: the registry order, and for each name the resolver that answered (tried
in registry order, as vLLM's ``OpenAIServingModels`` does) with the request it returned, and
whether vLLM's own loader accepts that request's folder.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from vllm.lora.peft_helper import PEFTHelper
from vllm.lora.resolver import LoRAResolverRegistry
from vllm.plugins import load_general_plugins

LLAMA_LORA_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def vllm_accepts(path: str, lora_int_id: int) -> bool:
    """Whether vLLM's own adapter loader reads the folder (the part that runs without a model)."""
    from vllm.config.lora import LoRAConfig
    from vllm.lora.lora_model import LoRAModel

    helper = PEFTHelper.from_local_dir(path, max_position_embeddings=None)
    helper.validate_legal(LoRAConfig(max_lora_rank=16))
    model = LoRAModel.from_local_checkpoint(
        path, LLAMA_LORA_MODULES, helper, lora_model_id=lora_int_id, device="cpu"
    )
    return len(model.loras) > 0


async def resolve(base_model: str, name: str) -> dict[str, object]:
    started = time.monotonic()
    for registry_name in LoRAResolverRegistry.get_supported_resolvers():
        resolver = LoRAResolverRegistry.get_resolver(registry_name)
        try:
            request = await resolver.resolve_lora(base_model, name)
        except Exception as error:  # vLLM answers 400 for a ValueError, 500 for the rest
            return {"resolver": registry_name, "error": str(error), "type": type(error).__name__}
        if request is not None:
            return {
                "resolver": registry_name,
                "path": request.lora_path,
                "lora_int_id": request.lora_int_id,
                "vllm_accepts": vllm_accepts(request.lora_path, request.lora_int_id),
                "seconds": time.monotonic() - started,
            }
    return {"resolver": None, "seconds": time.monotonic() - started}


def main() -> None:
    base_model, names = sys.argv[1], sys.argv[2:]
    load_general_plugins()
    order = list(LoRAResolverRegistry.get_supported_resolvers())
    answers = {name: asyncio.run(resolve(base_model, name)) for name in names}
    print(json.dumps({"order": order, "answers": answers}))


if __name__ == "__main__":
    main()
