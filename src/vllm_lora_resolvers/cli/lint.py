"""The checks the resolvers make, run one by one so that a report lists every failure and its fix.

The verdicts come from `vllm_lora_resolvers.adapter` and `vllm_lora_resolvers.names` themselves;
this module only runs them independently (a bad config does not hide a broken weights file) and
adds, for each failure, what to do about it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_lora_resolvers.adapter import (
    CONFIG_FILE,
    MAX_CONFIG_BYTES,
    WEIGHTS_FILES,
    AdapterPolicy,
    LoraAdapterConfig,
    check_adapter_config,
    check_weights_file,
    parse_adapter_config,
    weights_file,
)
from vllm_lora_resolvers.cli.output import Level
from vllm_lora_resolvers.errors import InvalidAdapterError
from vllm_lora_resolvers.names import MAX_NAME_LENGTH, MAX_SEGMENTS

NAME_CHECK = "name"
CONFIG_CHECK = "config"
COMPATIBILITY_CHECK = "compatibility"
WEIGHTS_CHECK = "weights"
DOWNLOAD_CHECK = "download"
FILES_CHECK = "files"
SIGNATURE_CHECK = "signature"

_NAME_FIX = (
    f"rename the folder: 1 to {MAX_SEGMENTS} segments of [A-Za-z0-9][A-Za-z0-9._-]* joined by '/', "
    f"at most {MAX_NAME_LENGTH} characters (hf:// names may end in @REVISION)"
)
_CONFIG_FIX = (
    "save the adapter with PEFT (model.save_pretrained(DIR)): adapter_config.json must be a JSON "
    "object with PEFT's fields and types"
)
FILES_FIX = (
    "make adapter_config.json and the weights regular files inside the adapter folder: the "
    "resolvers refuse links that leave it"
)
_WEIGHTS_FIX = (
    "save the weights with PEFT as adapter_model.safetensors and upload the complete file "
    "next to adapter_config.json"
)


@dataclass(frozen=True)
class Check:
    """The outcome of one check: ``PASS``, ``FAIL`` (with the problem and its fix) or ``SKIP``."""

    check: str
    level: Level
    detail: str = ""
    fix: str | None = None

    def to_json(self) -> dict[str, Any]:
        """``{"check", "status", "problem", "fix"}`` (problem and fix are null unless failed)."""
        failed = self.level is Level.FAIL
        return {
            "check": self.check,
            "status": self.level.value.lower(),
            "problem": self.detail if failed else None,
            "fix": self.fix,
        }


@dataclass(frozen=True)
class LintPolicy:
    """What to check against: a base model (``None``: the adapter's own), a rank limit, aliases."""

    base_model: str | None
    max_rank: int
    aliases: tuple[str, ...] = ()

    def for_config(self, config: LoraAdapterConfig) -> AdapterPolicy:
        """The resolvers' policy for ``config``: the given base model, else the adapter's own."""
        base_model = self.base_model or config.base_model_name_or_path or ""
        return AdapterPolicy(base_model, self.max_rank, self.aliases)


@dataclass(frozen=True)
class LintReport:
    """Every check of one adapter."""

    adapter: str
    location: str
    lint_policy: LintPolicy
    config: LoraAdapterConfig | None
    checks: tuple[Check, ...]

    @property
    def valid(self) -> bool:
        """Whether no check failed."""
        return not self.problems

    @property
    def problems(self) -> list[Check]:
        """The checks that failed."""
        return [check for check in self.checks if check.level is Level.FAIL]

    @property
    def base_model(self) -> str | None:
        """The base model the adapter was checked against (``None`` if its config is unread)."""
        if self.lint_policy.base_model is not None:
            return self.lint_policy.base_model
        return None if self.config is None else self.config.base_model_name_or_path

    @property
    def base_model_source(self) -> str | None:
        """Where `base_model` came from: ``--base-model`` or ``adapter_config.json``."""
        if self.lint_policy.base_model is not None:
            return "--base-model"
        return None if self.config is None else CONFIG_FILE

    def to_json(self) -> dict[str, Any]:
        """The machine-readable result ``validate --json`` prints."""
        return {
            "adapter": self.adapter,
            "location": self.location,
            "valid": self.valid,
            "base_model": self.base_model,
            "base_model_source": self.base_model_source,
            "max_rank": self.lint_policy.max_rank,
            "rank": None if self.config is None else self.config.max_rank,
            "checks": [check.to_json() for check in self.checks],
        }


def check_name(name: str, accepted: bool) -> Check:
    """The name check (``accepted`` is the backend's own `accepts_name` answer)."""
    if accepted:
        return Check(NAME_CHECK, Level.PASS, name)
    return Check(NAME_CHECK, Level.FAIL, f"{name!r} is not a name a client can ask for", _NAME_FIX)


def check_config(
    adapter: str, raw: bytes | None, lint_policy: LintPolicy
) -> tuple[LoraAdapterConfig | None, list[Check]]:
    """Parse ``adapter_config.json`` (``None``: absent) and check it against the policy."""
    if raw is None:
        missing = f"no {CONFIG_FILE}"
        return None, [
            Check(CONFIG_CHECK, Level.FAIL, missing, _CONFIG_FIX),
            Check(COMPATIBILITY_CHECK, Level.SKIP, "needs a readable config"),
        ]
    try:
        config = parse_adapter_config(adapter, raw)
    except InvalidAdapterError as error:
        return None, [
            Check(CONFIG_CHECK, Level.FAIL, str(error), _CONFIG_FIX),
            Check(COMPATIBILITY_CHECK, Level.SKIP, "needs a readable config"),
        ]
    policy = lint_policy.for_config(config)
    parsed = Check(CONFIG_CHECK, Level.PASS, f"{CONFIG_FILE} parses")
    try:
        check_adapter_config(adapter, config, policy)
    except InvalidAdapterError as error:
        fix = compatibility_fix(config, policy)
        return config, [parsed, Check(COMPATIBILITY_CHECK, Level.FAIL, str(error), fix)]
    summary = f"LORA, rank {config.max_rank} <= {policy.max_rank}, base model {policy.base_model!r}"
    return config, [parsed, Check(COMPATIBILITY_CHECK, Level.PASS, summary)]


def compatibility_fix(config: LoraAdapterConfig, policy: AdapterPolicy) -> str:
    """What to do about the first problem `check_adapter_config` reports (it checks in this
    order: peft type, base model, rank, unsupported features)."""
    if config.peft_type != "LORA":
        return "train (or convert to) a LoRA adapter: vLLM serves peft_type LORA only"
    if config.base_model_name_or_path is None:
        return "set base_model_name_or_path in adapter_config.json to the model it was trained on"
    if not policy.accepts_base_model(config.base_model_name_or_path):
        return (
            f"use an adapter trained on {policy.base_model!r}, set base_model_name_or_path to "
            "the server's --model, or add the adapter's base model to "
            "VLLM_LORA_RESOLVER_BASE_MODEL_ALIASES"
        )
    if config.max_rank > policy.max_rank:
        return (
            f"retrain with r and every rank_pattern value at most {policy.max_rank}, or raise "
            "the server's --max-lora-rank (and VLLM_LORA_RESOLVER_MAX_RANK / --max-rank here)"
        )
    return "retrain (or merge and re-extract) it as a plain LoRA without the features named"


def check_weights(adapter: str, folder: Path) -> Check:
    """The weights file vLLM would load is present and well-formed."""
    path = weights_file(folder)
    if path is None:
        expected = ", ".join(WEIGHTS_FILES)
        return Check(
            WEIGHTS_CHECK, Level.FAIL, f"no weights file; expected {expected}", _WEIGHTS_FIX
        )
    try:
        check_weights_file(adapter, path)
    except InvalidAdapterError as error:
        return Check(WEIGHTS_CHECK, Level.FAIL, str(error), _WEIGHTS_FIX)
    return Check(WEIGHTS_CHECK, Level.PASS, f"{path.name} is well-formed")


def lint_folder(
    adapter: str, folder: Path, location: str, name_check: Check, lint_policy: LintPolicy
) -> LintReport:
    """Every check of the local adapter folder ``folder`` (published as ``adapter``, whose
    `check_name` is ``name_check``)."""
    config_path = folder / CONFIG_FILE
    raw = None
    if config_path.is_file():
        with config_path.open("rb") as stream:
            raw = stream.read(MAX_CONFIG_BYTES + 1)
    config, config_checks = check_config(adapter, raw, lint_policy)
    checks = (name_check, *config_checks, check_weights(adapter, folder))
    return LintReport(adapter, location, lint_policy, config, checks)
