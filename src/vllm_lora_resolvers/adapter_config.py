"""``adapter_config.json``: parsed and typed as vLLM's ``PEFTHelper`` reads it, refusing what it
would refuse or misuse (a string or NaN ``lora_alpha``, a ``rank_pattern`` rank of 0, a pattern key
vLLM cannot evaluate quickly, a file that is not UTF-8)."""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    model_validator,
)

from vllm_lora_resolvers.errors import InvalidAdapterError
from vllm_lora_resolvers.lora_patterns import pattern_key_problem

CONFIG_FILE = "adapter_config.json"
MAX_CONFIG_BYTES = 1 << 20
# vLLM's regex module caches 500 compiled patterns; past that, every module it loads recompiles
# every key (~0.4 ms each): keep the distinct keys of both patterns well inside the cache.
MAX_PATTERN_KEYS = 256
SUPPORTED_STRING_INITS = frozenset({"gaussian", "eva", "orthogonal", "mica", "lora_ga"})
SUPPORTED_MODULES_TO_SAVE = frozenset({"classifier", "score"})


def _safe_pattern_key(key: str) -> str:
    problem = pattern_key_problem(key)
    if problem:
        raise ValueError(f"the key {problem}")
    return key


PatternKey = Annotated[str, AfterValidator(_safe_pattern_key)]
Rank = Annotated[StrictInt, Field(gt=0)]
# vLLM computes alpha / rank: a string raises TypeError in the engine, NaN or infinity poisons it.
Alpha = Annotated[StrictFloat, Field(allow_inf_nan=False)]


class LoraAdapterConfig(BaseModel):
    """The fields of a PEFT ``adapter_config.json`` that decide whether vLLM can serve it."""

    model_config = ConfigDict(extra="allow", frozen=True)

    peft_type: str
    base_model_name_or_path: str | None = None
    r: Rank
    lora_alpha: Alpha
    target_modules: list[str] | str
    rank_pattern: dict[PatternKey, Rank] | None = None
    alpha_pattern: dict[PatternKey, Alpha] | None = None
    use_rslora: StrictBool = False
    bias: str = "none"
    use_dora: StrictBool = False
    lora_bias: StrictBool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    alora_invocation_tokens: list[int] | None = None
    layer_replication: list[list[int]] | None = None
    use_bdlora: dict[str, Any] | None = None
    use_qalora: StrictBool = False
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None

    @model_validator(mode="after")
    def _few_pattern_keys(self) -> LoraAdapterConfig:
        keys = {*(self.rank_pattern or {}), *(self.alpha_pattern or {})}
        if len(keys) > MAX_PATTERN_KEYS:
            raise ValueError(
                f"rank_pattern and alpha_pattern hold {len(keys)} distinct keys; vLLM matches "
                f"them all for every module: at most {MAX_PATTERN_KEYS} are accepted"
            )
        return self

    @property
    def max_rank(self) -> int:
        """The largest rank of any module: ``r`` or a ``rank_pattern`` override."""
        return max([self.r, *(self.rank_pattern or {}).values()])

    def unsupported_features(self) -> list[str]:
        """Every PEFT feature vLLM refuses to load, each as an actionable sentence."""
        problems = []
        if self.use_dora:
            problems.append("use_dora=true (DoRA) is not supported by vLLM; train a plain LoRA")
        if self.bias != "none":
            problems.append(f"bias={_shown(self.bias)} is not supported by vLLM; it must be 'none'")
        if self.lora_bias:
            problems.append("lora_bias=true is not supported by vLLM")
        unsupported = [m for m in self.modules_to_save or [] if m not in SUPPORTED_MODULES_TO_SAVE]
        if unsupported:
            problems.append(
                f"modules_to_save={_shown(unsupported)} is not supported by vLLM "
                "(only 'classifier' and 'score')"
            )
        init = self.init_lora_weights
        if isinstance(init, str) and init.lower() not in SUPPORTED_STRING_INITS:
            problems.append(
                f"init_lora_weights={_shown(init)} changes the base weights and is not supported "
                "by vLLM; convert it to a plain LoRA with PEFT"
            )
        if self.alora_invocation_tokens:
            problems.append("alora_invocation_tokens (aLoRA) is not supported by vLLM")
        if self.layer_replication:
            problems.append("layer_replication is not supported by vLLM")
        if self.use_bdlora:
            problems.append("use_bdlora (block-diagonal LoRA) is not supported by vLLM")
        if self.use_qalora:
            problems.append("use_qalora (QALoRA) is not supported by vLLM")
        if self.trainable_token_indices:
            problems.append(
                "trainable_token_indices (PEFT trainable tokens) is not supported by vLLM; "
                "train without it"
            )
        return problems


def parse_adapter_config(adapter: str, raw: bytes) -> LoraAdapterConfig:
    """Parse and type-check ``adapter_config.json``; `InvalidAdapterError` names the bad field."""
    if len(raw) > MAX_CONFIG_BYTES:
        raise InvalidAdapterError(
            f"adapter {adapter!r}: {CONFIG_FILE} is {len(raw)} bytes; "
            f"the limit is {MAX_CONFIG_BYTES} bytes"
        )
    document = _json_object(adapter, raw)
    try:
        return LoraAdapterConfig.model_validate(document)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "(root)"
        raise InvalidAdapterError(
            f"adapter {adapter!r}: {CONFIG_FILE} field {_shown(field)} = "
            f"{_shown(first.get('input'))}: {first['msg']}"
        ) from None


def _json_object(adapter: str, raw: bytes) -> dict[str, Any]:
    # vLLM reads the file as UTF-8 text, where a BOM is an error; json.loads(bytes) would
    # silently accept one, and UTF-16 or UTF-32 too.
    try:
        text: str | None = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or text.startswith("\ufeff"):
        raise InvalidAdapterError(
            f"adapter {adapter!r}: {CONFIG_FILE} is not UTF-8 text without a byte-order mark, "
            "which is how vLLM reads it; save it as plain UTF-8"
        )
    try:
        document = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise InvalidAdapterError(
            f"adapter {adapter!r}: {CONFIG_FILE} is not valid JSON ({_first_line(error)})"
        ) from None
    if not isinstance(document, dict):
        raise InvalidAdapterError(f"adapter {adapter!r}: {CONFIG_FILE} must be a JSON object")
    return document


def _shown(value: object, limit: int = 80) -> str:
    """``repr`` of a value read from a file, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0][:200] if str(error) else type(error).__name__
