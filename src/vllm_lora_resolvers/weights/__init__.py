"""Reading an adapter's weights file without loading it: what tensors it holds, by name.

`safetensors_header` reads a safetensors header, `torch_archive` (with `pickle_vm`) a
``torch.save`` zip; both check the file as the library vLLM loads it with would, and return the
tensors as `TensorSpec` by name. `lora_tensors` then checks those names and shapes against the
adapter's config as vLLM's LoRA loader reads them.
"""

from __future__ import annotations

from typing import NamedTuple

# Two tensors per adapted module: a per-expert LoRA of Qwen3-30B-A3B (48 layers x 128 experts x
# 3 projections, plus attention) holds about 37,000. Larger MoE adapters use PEFT's fused
# experts format (two tensors per layer).
MAX_TENSORS = 65_536
MAX_TENSOR_NAME_CHARS = 256
MAX_TENSOR_DIMS = 8
# The dtypes LoRA weights come in (safetensors' names), with their size in bytes. vLLM would cast
# integer ones silently.
FLOAT_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}


class WeightsError(Exception):
    """Why vLLM cannot load a weights file; the message follows "weights file <name> "."""


def malformed(problem: str) -> WeightsError:
    """The file is not what its format says (truncated, inconsistent, hostile)."""
    return WeightsError(f"is malformed: {problem}")


class TensorSpec(NamedTuple):
    """A tensor's dtype (safetensors' names: ``F32``, ``BF16``...) and shape."""

    dtype: str
    shape: tuple[int, ...]


def shown_name(name: str) -> str:
    """A tensor (or other) name read from a file, as an error message may quote it."""
    return repr(name) if len(name) <= 120 else repr(name[:117]) + "..."
