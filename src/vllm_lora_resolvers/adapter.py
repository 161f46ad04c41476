"""What makes an adapter folder servable: ``adapter_config.json`` and its weights file.

The rules mirror what vLLM's own loader enforces (``vllm/lora/peft_helper.py``,
``vllm/lora/lora_model.py``), checked before the adapter is handed to the engine, so a client
reads the real reason in a 400 instead of vLLM's generic "found but could not be loaded", and so a
file built to hang, exhaust or exploit the engine never reaches it. Every check reads a bounded
amount of the files, in bounded time, whatever they hold.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from vllm_lora_resolvers.adapter_config import (
    CONFIG_FILE,
    MAX_CONFIG_BYTES,
    LoraAdapterConfig,
    parse_adapter_config,
)
from vllm_lora_resolvers.errors import InvalidAdapterError
from vllm_lora_resolvers.remote import RemoteAdapter, RemoteFile
from vllm_lora_resolvers.weights import TensorSpec, WeightsError
from vllm_lora_resolvers.weights.lora_tensors import check_lora_tensors
from vllm_lora_resolvers.weights.safetensors_header import (
    parse_safetensors_header,
    safetensors_header_size,
)
from vllm_lora_resolvers.weights.torch_archive import read_torch_archive

__all__ = [
    "ADAPTER_FILES",
    "CONFIG_FILE",
    "MAX_CONFIG_BYTES",
    "MAX_SIGNATURE_BYTES",
    "SIGNATURE_FILE",
    "WEIGHTS_FILES",
    "AdapterPolicy",
    "LoraAdapterConfig",
    "check_adapter_config",
    "check_adapter_folder",
    "check_torch_pickle",
    "check_weights_file",
    "check_weights_header",
    "parse_adapter_config",
    "weights_file",
]

# The order in which vLLM's loader looks for weights; it loads the first one present.
WEIGHTS_FILES = ("adapter_model.safetensors", "adapter_model.bin", "adapter_model.pt")
ADAPTER_FILES = (CONFIG_FILE, *WEIGHTS_FILES)
#: The adapter's signature, as OpenSSF model signing writes it into the folder it signs
#: (`vllm_lora_resolvers.signing`); fetched and checked when ``VLLM_LORA_RESOLVER_TRUST`` is set.
SIGNATURE_FILE = "model.sig"
#: A signature is a few kilobytes (a few hundred bytes per file signed); a larger file is not one.
MAX_SIGNATURE_BYTES = 4 << 20


def adapter_file_names(*, signature: bool) -> tuple[str, ...]:
    """The files of an adapter folder a lookup looks for: `ADAPTER_FILES`, and `SIGNATURE_FILE`
    when ``signature`` is true."""
    return (*ADAPTER_FILES, SIGNATURE_FILE) if signature else ADAPTER_FILES


@dataclass(frozen=True)
class AdapterPolicy:
    """What the serving side accepts: its base model (and aliases) and its rank limit."""

    base_model: str
    max_rank: int
    base_model_aliases: tuple[str, ...] = ()

    def accepts_base_model(self, name: str | None) -> bool:
        """Whether ``name`` (an adapter's ``base_model_name_or_path``) is this server's model."""
        if name is None:
            return False
        accepted = {self.base_model, *self.base_model_aliases}
        return name.rstrip("/") in {item.rstrip("/") for item in accepted}


def check_adapter_config(adapter: str, config: LoraAdapterConfig, policy: AdapterPolicy) -> None:
    """Raise `InvalidAdapterError` unless vLLM, configured as ``policy`` says, can serve it."""
    if config.peft_type != "LORA":
        raise InvalidAdapterError(
            f"adapter {adapter!r}: peft_type is {config.peft_type[:40]!r}; only 'LORA' is supported"
        )
    if not policy.accepts_base_model(config.base_model_name_or_path):
        accepted = ", ".join(repr(name) for name in (policy.base_model, *policy.base_model_aliases))
        raise InvalidAdapterError(
            f"adapter {adapter!r}: base_model_name_or_path is "
            f"{config.base_model_name_or_path!r} but this server serves {accepted}; "
            "use an adapter trained for this model or add its base model name to "
            "VLLM_LORA_RESOLVER_BASE_MODEL_ALIASES"
        )
    if config.max_rank > policy.max_rank:
        raise InvalidAdapterError(
            f"adapter {adapter!r}: rank {config.max_rank} is above this server's limit of "
            f"{policy.max_rank} (VLLM_LORA_RESOLVER_MAX_RANK / --max-lora-rank)"
        )
    problems = config.unsupported_features()
    if problems:
        raise InvalidAdapterError(f"adapter {adapter!r}: " + "; ".join(problems))


def weights_file(folder: Path) -> Path | None:
    """The weights file vLLM would load from ``folder``, in vLLM's order of preference."""
    for name in WEIGHTS_FILES:
        if (folder / name).is_file():
            return folder / name
    return None


def check_adapter_folder(adapter: str, folder: Path, policy: AdapterPolicy) -> LoraAdapterConfig:
    """Check a local adapter folder end to end: config, then its weights file against it."""
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise InvalidAdapterError(f"adapter {adapter!r} has no {CONFIG_FILE}")
    with config_path.open("rb") as stream:
        raw = stream.read(MAX_CONFIG_BYTES + 1)
    config = parse_adapter_config(adapter, raw)
    check_adapter_config(adapter, config, policy)
    weights = weights_file(folder)
    if weights is None:
        raise InvalidAdapterError(
            f"adapter {adapter!r} has no weights file; expected one of {', '.join(WEIGHTS_FILES)}"
        )
    check_weights_file(adapter, weights, config)
    return config


def check_weights_file(adapter: str, path: Path, config: LoraAdapterConfig | None = None) -> None:
    """Raise `InvalidAdapterError` unless vLLM can load the weights file ``path``; given the
    adapter's ``config``, also unless vLLM loads its tensors as the config says."""
    try:
        tensors = read_torch_archive(path) if path.suffix != ".safetensors" else _header(path)
        if config is not None:
            check_lora_tensors(tensors, config)
    except WeightsError as problem:
        raise _invalid_weights(adapter, path.name, problem) from None


def check_torch_pickle(adapter: str, path: Path) -> None:
    """`check_weights_file` for a ``torch.save`` file, whatever its name."""
    try:
        read_torch_archive(path)
    except WeightsError as problem:
        raise _invalid_weights(adapter, path.name, problem) from None


def check_weights_header(
    adapter: str, config: LoraAdapterConfig, first_bytes: bytes, total_size: int
) -> int:
    """Check ``adapter_model.safetensors`` (``total_size`` bytes) from its first bytes, before
    its body is fetched: the header, and its tensors against ``config``.

    Returns how many leading bytes the check needs. When ``first_bytes`` holds fewer (at least 8
    are needed to tell), nothing but the header's length was checked: call again with that many.
    For example, with ``fetch(start, end)`` reading a byte range of the stored file::

        first = fetch(0, min(size, 64 << 10))
        needed = check_weights_header("sql-expert", config, first, size)
        if needed > len(first):
            check_weights_header("sql-expert", config, fetch(0, needed), size)
    """
    try:
        needed = safetensors_header_size(first_bytes, total_size)
        if len(first_bytes) >= needed:
            check_lora_tensors(parse_safetensors_header(first_bytes, total_size), config)
    except WeightsError as problem:
        raise _invalid_weights(adapter, WEIGHTS_FILES[0], problem) from None
    return needed


def _header(path: Path) -> dict[str, TensorSpec]:
    total_size = path.stat().st_size
    with path.open("rb") as stream:
        header_size = safetensors_header_size(stream.read(8), total_size)
        stream.seek(0)
        return parse_safetensors_header(stream.read(header_size), total_size)


def _invalid_weights(adapter: str, file_name: str, problem: WeightsError) -> InvalidAdapterError:
    return InvalidAdapterError(f"adapter {adapter!r}: weights file {file_name} {problem}")


def adapter_from_listing(
    name: str, location: str, listed: Mapping[str, RemoteFile], *, signature: bool = False
) -> RemoteAdapter | None:
    """The adapter in one listed folder (file name -> file), or ``None`` if it has no config.

    It is made of the config and the first weights file in vLLM's order of preference, and its
    `SIGNATURE_FILE` if ``signature`` is true (`Store.lists_signatures`) and the folder has one;
    its version changes whenever the etag (object version) or size of one of those does.
    """
    config = listed.get(CONFIG_FILE)
    weights = next((listed[n] for n in WEIGHTS_FILES if n in listed), None)
    if config is None:
        return None
    signed = listed.get(SIGNATURE_FILE) if signature else None
    files = tuple(file for file in (config, weights, signed) if file is not None)
    fingerprint = hashlib.sha256()
    for file in files:
        fingerprint.update(f"{file.path}\0{file.etag}\0{file.size}\n".encode())
    return RemoteAdapter(name, fingerprint.hexdigest()[:32], location, files)
