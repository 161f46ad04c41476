"""What makes an adapter folder servable: ``adapter_config.json`` and its weights file.

The rules mirror what vLLM's own loader enforces (``vllm/lora/peft_helper.py``), checked before
the adapter is handed to the engine, so a client reads the real reason in a 400 instead of vLLM's
generic "found but could not be loaded".
"""

from __future__ import annotations

import json
import math
import pickletools
import struct
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from vllm_lora_resolvers.errors import InvalidAdapterError

CONFIG_FILE = "adapter_config.json"
# The order in which vLLM's loader looks for weights; it loads the first one present.
WEIGHTS_FILES = ("adapter_model.safetensors", "adapter_model.bin", "adapter_model.pt")
ADAPTER_FILES = (CONFIG_FILE, *WEIGHTS_FILES)

MAX_CONFIG_BYTES = 1 << 20
MAX_SAFETENSORS_HEADER_BYTES = 100 << 20
SUPPORTED_STRING_INITS = frozenset({"gaussian", "eva", "orthogonal", "mica", "lora_ga"})
SUPPORTED_MODULES_TO_SAVE = frozenset({"classifier", "score"})
_DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
# Exactly what torch.save() of a state dict references; anything else (os.system, builtins.eval,
# torch.hub.load, ...) is refused even though vLLM itself loads with weights_only=True.
_SAFE_PICKLE_GLOBALS = frozenset(
    {
        ("collections", "OrderedDict"),
        ("torch._utils", "_rebuild_tensor"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch._tensor", "_rebuild_from_type_v2"),
        ("torch", "UntypedStorage"),
        *(
            ("torch", f"{kind}Storage")
            for kind in ("Float", "Half", "BFloat16", "Double", "Long", "Int", "Short", "Char")
        ),
        ("torch", "ByteStorage"),
        ("torch", "BoolStorage"),
    }
)


class LoraAdapterConfig(BaseModel):
    """The fields of a PEFT ``adapter_config.json`` that decide whether vLLM can serve it."""

    model_config = ConfigDict(extra="allow", frozen=True)

    peft_type: str
    base_model_name_or_path: str | None = None
    r: StrictInt = Field(gt=0)
    lora_alpha: float
    target_modules: list[str] | str
    rank_pattern: dict[str, StrictInt] | None = None
    bias: str = "none"
    use_dora: StrictBool = False
    lora_bias: StrictBool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    alora_invocation_tokens: list[int] | None = None
    layer_replication: list[list[int]] | None = None
    use_bdlora: dict[str, Any] | None = None
    use_qalora: StrictBool = False

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
            problems.append(f"bias={self.bias!r} is not supported by vLLM; it must be 'none'")
        if self.lora_bias:
            problems.append("lora_bias=true is not supported by vLLM")
        unsupported = [m for m in self.modules_to_save or [] if m not in SUPPORTED_MODULES_TO_SAVE]
        if unsupported:
            problems.append(
                f"modules_to_save={unsupported} is not supported by vLLM "
                "(only 'classifier' and 'score')"
            )
        init = self.init_lora_weights
        if isinstance(init, str) and init.lower() not in SUPPORTED_STRING_INITS:
            problems.append(
                f"init_lora_weights={init!r} changes the base weights and is not supported by "
                "vLLM; convert it to a plain LoRA with PEFT"
            )
        if self.alora_invocation_tokens:
            problems.append("alora_invocation_tokens (aLoRA) is not supported by vLLM")
        if self.layer_replication:
            problems.append("layer_replication is not supported by vLLM")
        if self.use_bdlora:
            problems.append("use_bdlora (block-diagonal LoRA) is not supported by vLLM")
        if self.use_qalora:
            problems.append("use_qalora (QALoRA) is not supported by vLLM")
        return problems


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


def parse_adapter_config(adapter: str, raw: bytes) -> LoraAdapterConfig:
    """Parse and type-check ``adapter_config.json``; `InvalidAdapterError` names the bad field."""
    if len(raw) > MAX_CONFIG_BYTES:
        raise InvalidAdapterError(
            f"adapter {adapter!r}: {CONFIG_FILE} is {len(raw)} bytes; "
            f"the limit is {MAX_CONFIG_BYTES} bytes"
        )
    try:
        document = json.loads(raw)
    except (ValueError, RecursionError) as error:
        raise InvalidAdapterError(
            f"adapter {adapter!r}: {CONFIG_FILE} is not valid JSON ({_first_line(error)})"
        ) from None
    if not isinstance(document, dict):
        raise InvalidAdapterError(f"adapter {adapter!r}: {CONFIG_FILE} must be a JSON object")
    try:
        return LoraAdapterConfig.model_validate(document)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "(root)"
        value = first.get("input")
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        raise InvalidAdapterError(
            f"adapter {adapter!r}: {CONFIG_FILE} field {field!r} = {shown}: {first['msg']}"
        ) from None


def check_adapter_config(adapter: str, config: LoraAdapterConfig, policy: AdapterPolicy) -> None:
    """Raise `InvalidAdapterError` unless vLLM, configured as ``policy`` says, can serve it."""
    if config.peft_type != "LORA":
        raise InvalidAdapterError(
            f"adapter {adapter!r}: peft_type is {config.peft_type!r}; only 'LORA' is supported"
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
    """Check a local adapter folder end to end: config, then its weights file."""
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
    check_weights_file(adapter, weights)
    return config


def check_weights_file(adapter: str, path: Path) -> None:
    """Raise `InvalidAdapterError` unless ``path`` is a well-formed weights file."""
    if path.suffix == ".safetensors":
        check_safetensors(adapter, path)
    else:
        check_torch_pickle(adapter, path)


def check_safetensors(adapter: str, path: Path) -> None:
    """The header parses, and every tensor's offsets fit the file and match its dtype and shape."""
    size = path.stat().st_size
    with path.open("rb") as stream:
        prefix = stream.read(8)
        if len(prefix) < 8:
            raise _bad_weights(adapter, path, "the file is shorter than a safetensors header")
        (header_length,) = struct.unpack("<Q", prefix)
        if header_length > min(MAX_SAFETENSORS_HEADER_BYTES, size - 8):
            raise _bad_weights(adapter, path, f"the header length {header_length} does not fit")
        try:
            header = json.loads(stream.read(header_length))
        except (ValueError, RecursionError):
            raise _bad_weights(adapter, path, "the header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _bad_weights(adapter, path, "the header is not a JSON object")
    data_bytes = size - 8 - header_length
    tensors = {key: value for key, value in header.items() if key != "__metadata__"}
    if not tensors:
        raise _bad_weights(adapter, path, "it holds no tensors")
    for key, entry in tensors.items():
        problem = _tensor_entry_problem(entry, data_bytes)
        if problem:
            raise _bad_weights(adapter, path, f"tensor {key[:120]!r}: {problem}")


def _tensor_entry_problem(entry: object, data_bytes: int) -> str | None:
    if not isinstance(entry, dict):
        return "its entry is not an object"
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _DTYPE_BYTES:
        return f"unknown dtype {str(dtype)[:20]!r}"
    if not isinstance(shape, list) or not all(
        isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0 for dim in shape
    ):
        return "its shape is not a list of non-negative integers"
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        return "data_offsets is not a pair of integers"
    begin, end = offsets
    if not 0 <= begin <= end <= data_bytes:
        return f"data_offsets {offsets} fall outside the {data_bytes} data bytes of the file"
    if end - begin != math.prod(shape) * _DTYPE_BYTES[str(dtype)]:
        return f"data_offsets {offsets} do not match shape {shape} of {dtype}"
    return None


def check_torch_pickle(adapter: str, path: Path) -> None:
    """A ``torch.save`` zip archive whose pickle names only torch's own rebuild functions."""
    if not zipfile.is_zipfile(path):
        raise _bad_weights(
            adapter, path, "it is not a torch.save zip archive; convert it to safetensors"
        )
    problem = _torch_archive_problem(path)
    if problem:
        raise _bad_weights(adapter, path, problem)


def _torch_archive_problem(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [name for name in archive.namelist() if name.endswith("/data.pkl")]
            if len(pickles) != 1:
                return "the archive has no single data.pkl"
            with archive.open(pickles[0]) as stream:
                for module, name in _pickle_globals(stream):
                    if (module, name) not in _SAFE_PICKLE_GLOBALS:
                        return f"its pickle calls {module}.{name}, which is not allowed"
    except (zipfile.BadZipFile, ValueError, EOFError) as error:
        return f"it cannot be read ({_first_line(error)})"
    return None


def _pickle_globals(stream: IO[bytes]) -> Iterator[tuple[str, str]]:
    """(module, name) of every global a pickle references, without executing it."""
    recent_strings: list[str] = []
    for opcode, argument, _ in pickletools.genops(stream):
        if opcode.name in ("GLOBAL", "INST"):
            module, _, name = str(argument).partition(" ")
            yield module, name
        elif opcode.name == "STACK_GLOBAL":
            # Its operands are the two strings pushed last; anything cleverer is refused.
            yield (
                (recent_strings[-2], recent_strings[-1]) if len(recent_strings) >= 2 else ("?", "?")
            )
        elif isinstance(argument, str) and "UNICODE" in opcode.name:
            recent_strings.append(argument)


def _bad_weights(adapter: str, path: Path, problem: str) -> InvalidAdapterError:
    return InvalidAdapterError(
        f"adapter {adapter!r}: weights file {path.name} is malformed: {problem}"
    )


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0][:200] if str(error) else type(error).__name__
