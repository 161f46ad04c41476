"""The tensors of a weights file as vLLM's LoRA loader reads them for the adapter's config.

Mirrors ``parse_fine_tuned_lora_name`` (``vllm/lora/utils.py``), ``LoRAModel.from_lora_tensors``
(``vllm/lora/lora_model.py``) and ``PEFTHelper.get_rank_and_scaling``: every tensor must be a
``lora_A`` / ``lora_B`` weight (``lora_embedding_A`` / ``_B`` for embeddings) of a module, or a
full ``classifier`` / ``score`` weight that ``modules_to_save`` lists, or a base embedding PEFT
saves beside them (which vLLM skips). Every module needs both halves, 2-D, with the rank vLLM
will compute for it from ``r`` and ``rank_pattern`` (vLLM never compares them: it would scale a
mismatched module by the wrong ``alpha / r``). Which modules the served model has is not known
here; vLLM checks that when it loads the adapter.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from vllm_lora_resolvers.adapter_config import CONFIG_FILE, LoraAdapterConfig
from vllm_lora_resolvers.lora_patterns import PatternKey
from vllm_lora_resolvers.weights import (
    MAX_TENSOR_NAME_CHARS,
    TensorSpec,
    WeightsError,
    shown_name,
)

# vLLM tests rank_pattern and alpha_pattern keys as regular expressions against every module
# (~20 us each, ~35 us at worst for the keys accepted): bound the engine's work to a few seconds.
MAX_PATTERN_MATCHES = 1 << 18
_BASE_EMBEDDINGS = (".embed_tokens.base_layer.weight", ".lm_head.base_layer.weight")
_FULL_MODULES = ("classifier", "score")
_MODULE_PATH = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+){0,15}")


@dataclass(frozen=True)
class _Half:
    tensor: str
    spec: TensorSpec


def check_lora_tensors(tensors: Mapping[str, TensorSpec], config: LoraAdapterConfig) -> None:
    """Raise `WeightsError` unless vLLM loads ``tensors`` as ``config`` says."""
    halves: dict[str, dict[str, _Half]] = {}
    full_modules: dict[str, set[str]] = {}
    for name, spec in tensors.items():
        if name.endswith(_BASE_EMBEDDINGS):
            continue
        module, role = _module_and_role(name)
        is_full = role in ("weight", "bias")
        if is_full != (module in (config.modules_to_save or ())):
            raise WeightsError(
                f"holds tensor {shown_name(name)}, whose module {module!r} modules_to_save "
                f"{'does not list' if is_full else 'lists'}; vLLM would load it as a "
                f"{'LoRA' if is_full else 'full'} weight"
            )
        if is_full:
            full_modules.setdefault(module, set()).add(role)
            continue
        if len(spec.shape) != 2:
            raise WeightsError(
                f"holds tensor {shown_name(name)} of shape {list(spec.shape)}; LoRA weights are 2-D"
            )
        if role in halves.setdefault(module, {}):
            raise WeightsError(
                f"holds two lora_{role} tensors for module {shown_name(module)}: "
                f"{shown_name(halves[module][role].tensor)} and {shown_name(name)}"
            )
        halves[module][role] = _Half(name, spec)
    _check_full_modules(full_modules)
    _check_ranks(halves, config)


def _module_and_role(name: str) -> tuple[str, str]:
    """``parse_fine_tuned_lora_name`` (no weights mapper): the module, and A, B, weight or bias."""
    if len(name) > MAX_TENSOR_NAME_CHARS:
        raise WeightsError(
            f"holds tensor {shown_name(name)}, whose name is longer than "
            f"{MAX_TENSOR_NAME_CHARS} characters"
        )
    prefix = "base_model.model."
    stripped = name.replace(prefix, "") if name.startswith(prefix) else name
    parts = stripped.split(".")
    start = 2 if stripped.startswith(prefix) else 0
    if len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in ("lora_A", "lora_B"):
        module, role = ".".join(parts[start:-2]), parts[-2][-1]
    elif len(parts) >= 2 and parts[-1] in ("weight", "bias") and parts[-2] in _FULL_MODULES:
        module, role = parts[-2], parts[-1]
    elif parts[-1] in ("lora_embedding_A", "lora_embedding_B"):
        module, role = ".".join(parts[start:-1]), parts[-1][-1]
    else:
        raise WeightsError(f"holds tensor {shown_name(name)}, {_unloadable(name)}")
    if not _MODULE_PATH.fullmatch(module):
        raise WeightsError(
            f"holds tensor {shown_name(name)}, whose module is not a module path "
            "(letters, digits and '_', at most 16 dotted parts)"
        )
    return module, role


def _unloadable(name: str) -> str:
    if name.endswith(".trainable_tokens_delta"):
        return (
            "a PEFT trainable-tokens delta (trainable_token_indices), which vLLM does not "
            "support; train without trainable_token_indices"
        )
    return (
        "which vLLM cannot load: it loads '<module>.lora_A.weight' and '.lora_B.weight', "
        "'<module>.lora_embedding_A' and '_B', and the 'classifier' / 'score' weights that "
        "modules_to_save lists"
    )


def _check_full_modules(full_modules: dict[str, set[str]]) -> None:
    if len(full_modules) > 1:
        raise WeightsError(
            f"holds full weights of {sorted(full_modules)}; vLLM loads at most one "
            "classification module per adapter"
        )
    for module, roles in full_modules.items():
        if "weight" not in roles:
            raise WeightsError(f"holds a bias for the full {module!r} module but no weight")


def _check_ranks(halves: dict[str, dict[str, _Half]], config: LoraAdapterConfig) -> None:
    ranks = _RankPatterns(config)
    for module, sides in halves.items():
        missing = {"A", "B"} - sides.keys()
        if missing:
            present = next(iter(sides.values())).tensor
            raise WeightsError(
                f"holds tensor {shown_name(present)} but no lora_{missing.pop()} tensor for "
                f"its module {shown_name(module)}"
            )
        rank, source = ranks.rank_of(module)
        fused_experts = module.endswith((".experts", ".experts.base_layer"))
        for half, found in (("A", sides["A"].spec.shape[0]), ("B", sides["B"].spec.shape[1])):
            if found != rank and not (fused_experts and found > 0 and found % rank == 0):
                tensor = sides[half]
                raise WeightsError(
                    f"holds tensor {shown_name(tensor.tensor)} of shape "
                    f"{list(tensor.spec.shape)}, rank {found}, but {CONFIG_FILE} gives its "
                    f"module rank {rank} ({source}); vLLM would scale it as rank {rank}: make r "
                    "and rank_pattern match the weights"
                )


class _RankPatterns:
    """``PEFTHelper.get_rank_and_scaling``'s rank, counting the pattern matches vLLM runs."""

    def __init__(self, config: LoraAdapterConfig) -> None:
        self.r = config.r
        rank_pattern = config.rank_pattern or {}
        self.rank_keys = [(key, PatternKey.parse(key)) for key in rank_pattern]
        self.ranks = list(rank_pattern.values())
        self.alpha_keys = [PatternKey.parse(key) for key in config.alpha_pattern or {}]
        self.matches = 0

    def rank_of(self, module: str) -> tuple[int, str]:
        """The rank vLLM gives ``module``, and where it comes from."""
        if not self.rank_keys and not self.alpha_keys:
            return self.r, "r"
        # vLLM matches PEFT's fused experts under the names of the parameters they replace.
        if module.endswith(".experts.base_layer"):
            module = module.removesuffix(".base_layer") + ".gate_up_proj"
        elif module.endswith(".experts"):
            module += ".down_proj"
        self._first_match(self.alpha_keys, module)  # run by vLLM too, for the scaling
        index = self._first_match([key for _, key in self.rank_keys], module)
        if index is None:
            return self.r, "r"
        return self.ranks[index], f"rank_pattern key {shown_name(self.rank_keys[index][0])}"

    def _first_match(self, keys: list[PatternKey], module: str) -> int | None:
        index = next((i for i, key in enumerate(keys) if key.matches(module)), None)
        self.matches += len(keys) if index is None else index + 1
        if self.matches > MAX_PATTERN_MATCHES:
            raise WeightsError(
                f"has so many modules that vLLM would test more than {MAX_PATTERN_MATCHES} "
                "rank_pattern / alpha_pattern keys against their names; use fewer keys"
            )
        return index
