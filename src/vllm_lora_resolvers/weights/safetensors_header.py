"""A safetensors header, checked as the ``safetensors`` library checks it, within fixed bounds.

The library refuses a file whose tensors overlap, leave gaps or trailing bytes, whose sizes
overflow or disagree with shape times dtype, or whose ``__metadata__`` is not string to string;
so does this. It is stricter in a few places: a duplicate JSON key anywhere (the library keeps the
last one), a dtype that is not floating point (vLLM would silently cast integer LoRA weights), and
more than `MAX_TENSORS` tensors or `MAX_SAFETENSORS_HEADER_BYTES` of header, refused before the
JSON is parsed.
"""

from __future__ import annotations

import json
import math

from vllm_lora_resolvers.weights import (
    FLOAT_DTYPE_BYTES,
    MAX_TENSOR_DIMS,
    MAX_TENSORS,
    TensorSpec,
    WeightsError,
    malformed,
    shown_name,
)

# About 256 bytes of JSON per tensor; the safetensors library itself stops at 100 MB.
MAX_SAFETENSORS_HEADER_BYTES = 16 << 20
# Per tensor a header holds 3 JSON containers and at most 12 separators (fields, offsets, dims).
_MAX_CONTAINERS = 3 * MAX_TENSORS + 2
_MAX_SEPARATORS = 16 * MAX_TENSORS
_USIZE_MAX = (1 << 64) - 1


def safetensors_header_size(first_bytes: bytes, total_size: int) -> int:
    """How many leading bytes of the file hold its header (the 8-byte length included)."""
    if len(first_bytes) < 8 or total_size < 8:
        raise malformed("the file is shorter than a safetensors header")
    length = int.from_bytes(first_bytes[:8], "little")
    if length > MAX_SAFETENSORS_HEADER_BYTES or 8 + length > total_size:
        raise malformed(f"the header length {length} does not fit")
    return 8 + length


def parse_safetensors_header(first_bytes: bytes, total_size: int) -> dict[str, TensorSpec]:
    """The tensors of a safetensors file of ``total_size`` bytes, from its first bytes (a read
    that ends before the header does is refused as a file cut short)."""
    header_size = safetensors_header_size(first_bytes, total_size)
    if len(first_bytes) < header_size:
        raise malformed(f"the file ends inside its {header_size}-byte header")
    header = _json_header(first_bytes, header_size)
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict)
        and all(isinstance(value, str) and _is_utf8(value) for value in metadata.values())
        and all(_is_utf8(key) for key in metadata)
    ):
        raise malformed("__metadata__ is not a map of strings to strings")
    if not header:
        raise malformed("it holds no tensors")
    placed = sorted(
        (_placed_tensor(name, entry) for name, entry in header.items()), key=lambda t: t[0]
    )
    end = 0
    for (begin, stop), name, _ in placed:
        if begin != end:
            raise malformed(
                f"tensor {shown_name(name)}'s data_offsets [{begin}, {stop}] overlap another "
                "tensor or leave a gap before it"
            )
        end = stop
    if end != total_size - header_size:
        raise malformed(
            f"its tensors cover {end} bytes but the file holds {total_size - header_size} "
            "bytes of data"
        )
    return {name: spec for _, name, spec in placed}


def _json_header(first_bytes: bytes, header_size: int) -> dict[str, object]:
    def count(character: bytes) -> int:
        return first_bytes.count(character, 8, header_size)

    if count(b"{") + count(b"[") > _MAX_CONTAINERS or count(b",") + count(b":") > _MAX_SEPARATORS:
        raise malformed(f"the header is larger than {MAX_TENSORS} tensors need")
    text = memoryview(first_bytes)[8:header_size]
    try:
        header = json.loads(str(text, "utf-8"), object_pairs_hook=_without_duplicate_keys)
    except WeightsError:
        raise
    except (ValueError, RecursionError):
        raise malformed("the header is not valid JSON") from None
    if not isinstance(header, dict):
        raise malformed("the header is not a JSON object")
    if len(header) > MAX_TENSORS + 1:
        raise malformed(f"it holds more than {MAX_TENSORS} tensors")
    return header


def _without_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    document: dict[str, object] = {}
    for key, value in pairs:
        if key in document:
            raise malformed(f"the header repeats the key {shown_name(key)}")
        document[key] = value
    return document


def _placed_tensor(name: str, entry: object) -> tuple[tuple[int, int], str, TensorSpec]:
    """((begin, end), name, spec) of one header entry, checked on its own."""
    if not _is_utf8(name):
        raise malformed(f"tensor {shown_name(name)}: the name is not UTF-8 text")
    if not isinstance(entry, dict):
        raise malformed(f"tensor {shown_name(name)}: its entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in FLOAT_DTYPE_BYTES:
        raise malformed(
            f"tensor {shown_name(name)}: dtype {shown_name(str(dtype)[:20])} is not one of "
            f"{', '.join(FLOAT_DTYPE_BYTES)} (LoRA weights are floating point)"
        )
    if not (
        isinstance(shape, list) and len(shape) <= MAX_TENSOR_DIMS and all(map(_is_usize, shape))
    ):
        raise malformed(
            f"tensor {shown_name(name)}: its shape is not a list of at most "
            f"{MAX_TENSOR_DIMS} non-negative integers"
        )
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_usize, offsets))):
        raise malformed(f"tensor {shown_name(name)}: data_offsets is not a pair of integers")
    begin, end = offsets
    if end - begin != math.prod(shape) * FLOAT_DTYPE_BYTES[dtype]:
        raise malformed(
            f"tensor {shown_name(name)}: data_offsets [{begin}, {end}] do not match shape "
            f"{shape} of {dtype}"
        )
    return (begin, end), name, TensorSpec(dtype, tuple(shape))


def _is_usize(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _USIZE_MAX


def _is_utf8(text: str) -> bool:
    """False for the lone surrogates Python's JSON parser lets through (``"\\udc80"``)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
