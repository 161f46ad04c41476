"""Load plugins the way a vLLM server process does, then resolve names through the registry.

``vllm_plugins.py BASE_MODEL NAME...`` prints one JSON object: the registry order, and for each
name the resolver that answered (tried in registry order, as vLLM's ``OpenAIServingModels`` does)
with the request it returned, and whether vLLM's own loader accepts that request's folder; and
the ``model_signing`` modules imported by then. ``TEST_HIDDEN_MODULES`` (a comma list) hides
modules from the child, as if they were not installed.

``vllm_plugins.py --serve`` imports vLLM once (about 20 s here), then runs each request read
from stdin (a JSON object: ``env``, ``args``, and ``stdout``/``stderr`` file paths) in a child it
forks: a process in which no plugin is loaded yet, with that environment, as a new server's. It
answers each request with a line ``{"exit": CODE}`` once the child ended.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import traceback

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


def load_and_resolve(base_model: str, names: list[str]) -> None:
    load_general_plugins()
    order = list(LoRAResolverRegistry.get_supported_resolvers())
    answers = {name: asyncio.run(resolve(base_model, name)) for name in names}
    signing = sorted(name for name in sys.modules if name.split(".")[0] == "model_signing")
    print(json.dumps({"order": order, "answers": answers, "signing": signing}), flush=True)


def serve() -> None:
    """Answer requests of stdin, each in a forked child (see the module's docstring)."""
    from vllm.lora.lora_model import LoRAModel  # noqa: F401 - the slow import, once

    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        child = os.fork()
        if child == 0:
            run_child(request["env"], request["args"], request["stdout"], request["stderr"])
        _, status = os.waitpid(child, 0)
        print(json.dumps({"exit": os.waitstatus_to_exitcode(status)}), flush=True)


def run_child(env: dict[str, str], args: list[str], stdout: str, stderr: str) -> None:
    """In a forked child: take the request's environment and output files, resolve, exit."""
    code = 1
    try:
        for path, fd in ((stdout, 1), (stderr, 2)):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        os.environ.clear()
        os.environ.update(env)
        # As on a machine without them (the [signing] extra, say): importing one fails.
        for module in env.get("TEST_HIDDEN_MODULES", "").split(","):
            if module:
                sys.modules[module] = None  # type: ignore[assignment]
        load_and_resolve(args[0], args[1:])
        code = 0
    except BaseException:  # the parent reports the exit code; the traceback goes to stderr
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        load_and_resolve(sys.argv[1], sys.argv[2:])
