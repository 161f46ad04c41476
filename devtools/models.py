"""Tiny local models, LoRA adapters and corrupt weight files for tests, demos and benchmarks.

Everything is built offline and deterministically; nothing is downloaded. The model matches the
adapter defaults below: a Llama with hidden size 128, 2 layers, 4 attention heads, 2 KV heads,
head size 32 (a size vLLM's CPU attention supports) and MLP size 256.
"""

from __future__ import annotations

import json
import math
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, assert_never

import numpy as np
from safetensors.numpy import save_file

HIDDEN_SIZE = 128
INTERMEDIATE_SIZE = 256
NUM_LAYERS = 2
NUM_HEADS = 4
NUM_KV_HEADS = 2
HEAD_DIM = 32
VOCAB_SIZE = 512
MAX_POSITION_EMBEDDINGS = 512
_MODEL_SEED = 0

# Presence of all of these means a complete model; config.json is moved into place last.
_MODEL_FILES = ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json")

_UNK, _BOS, _EOS = _SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2

_CORPUS = """\
A LoRA adapter adds a small low-rank update to the weights of a large language model.
The server loads adapters on demand, keeps the recent ones in memory and evicts the rest.
Resolvers find an adapter by name in a bucket, on a shared disk or on a model hub.
Each adapter is copied once into a local cache, checked, and never changed afterwards.
The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.
Pack my box with five dozen liquor jugs, then count one, two, three, four, five, six.
She sells sea shells by the sea shore; the shells she sells are surely sea shells.
Numbers such as 0 1 2 3 4 5 6 7 8 9 10 42 100 256 512 1024 appear in logs and configs.
How much wood would a woodchuck chuck if a woodchuck could chuck wood? Nobody knows.
Good tests are small, fast, deterministic, and they fail for exactly one clear reason.
Once upon a time there was a little model that wanted to write stories about the sea.
The weather today is cold and rainy in the north, but warm and sunny in the south.
Questions and answers: what is the capital of France? Paris. What is two plus two? Four.
Water boils at one hundred degrees, and ice melts when the morning becomes warmer.
"""

# lora_B's standard deviation at scale=1.0: the base weights' own (initializer_range 0.02).
# Greedy output of the tiny Llama already changes at a quarter of this; 10x makes it degenerate.
_LORA_B_STD = 0.02

_ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


def build_tiny_llama(directory: Path) -> Path:
    """Write a tiny random ``LlamaForCausalLM`` with a small trained BPE tokenizer.

    The weights are seeded and saved as bfloat16 ``model.safetensors``; the byte-level BPE
    tokenizer (vocabulary of at most 512, specials ``<unk>``, ``<s>``, ``</s>``; ``<s>`` is
    prepended to every prompt) is trained offline on built-in text and saved as a transformers
    fast tokenizer. Idempotent: a directory that already holds a complete model is returned
    unchanged. Files are built in a sibling temporary directory and moved into place, so an
    interrupted build is simply redone next time. Returns ``directory``.
    """
    if all((directory / name).is_file() for name in _MODEL_FILES):
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory.parent, prefix=f".{directory.name}-") as tmp:
        staging = Path(tmp)
        _save_tokenizer(staging)
        _save_model(staging)
        for path in sorted(staging.iterdir(), key=lambda p: p.name == "config.json"):
            path.replace(directory / path.name)
    return directory


def _save_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=_UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{_BOS} $A", pair=f"{_BOS} $A {_BOS} $B", special_tokens=[(_BOS, 1)]
    )
    wrapped = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer,
        unk_token=_UNK,
        bos_token=_BOS,
        eos_token=_EOS,
        model_max_length=MAX_POSITION_EMBEDDINGS,
    )
    wrapped.save_pretrained(str(directory))


def _save_model(directory: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    torch.manual_seed(_MODEL_SEED)
    model = LlamaForCausalLM(config).bfloat16()  # type: ignore[no-untyped-call]
    model.save_pretrained(str(directory))


def _lora_shapes(
    target_modules: tuple[str, ...],
    *,
    rank: int,
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
) -> list[tuple[str, tuple[int, int]]]:
    """PEFT tensor names and shapes for a Llama LoRA: lora_A is (r, in), lora_B is (out, r)."""
    kv_size = num_kv_heads * head_dim
    in_out = {
        "q_proj": (hidden_size, hidden_size),
        "k_proj": (hidden_size, kv_size),
        "v_proj": (hidden_size, kv_size),
        "o_proj": (hidden_size, hidden_size),
        "gate_proj": (hidden_size, intermediate_size),
        "up_proj": (hidden_size, intermediate_size),
        "down_proj": (intermediate_size, hidden_size),
    }
    unknown = sorted(set(target_modules) - in_out.keys())
    if unknown:
        raise ValueError(f"unsupported target modules {unknown}; known: {sorted(in_out)}")
    shapes: list[tuple[str, tuple[int, int]]] = []
    for layer in range(num_layers):
        for module in target_modules:
            block = "self_attn" if module in _ATTENTION_MODULES else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
            fan_in, fan_out = in_out[module]
            shapes.append((f"{prefix}.lora_A.weight", (rank, fan_in)))
            shapes.append((f"{prefix}.lora_B.weight", (fan_out, rank)))
    return shapes


def _write_adapter_config(
    directory: Path,
    *,
    base_model: str,
    rank: int,
    alpha: int,
    target_modules: tuple[str, ...],
    extra_config: Mapping[str, object] | None,
) -> None:
    config: dict[str, object] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": list(target_modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_dora": False,
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "use_rslora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    config.update(extra_config or {})
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def write_lora_adapter(
    directory: Path,
    *,
    base_model: str,
    rank: int = 8,
    alpha: int = 16,
    seed: int = 0,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
    hidden_size: int = HIDDEN_SIZE,
    num_layers: int = NUM_LAYERS,
    num_kv_heads: int = NUM_KV_HEADS,
    head_dim: int = HEAD_DIM,
    extra_config: Mapping[str, object] | None = None,
    weights_format: Literal["safetensors", "bin"] = "safetensors",
    scale: float = 1.0,
    intermediate_size: int = INTERMEDIATE_SIZE,
) -> Path:
    """Write a PEFT-style LoRA adapter for the tiny Llama into ``directory`` and return it.

    Writes ``adapter_config.json`` (PEFT defaults, then ``extra_config`` merged over them, so a
    test can write any field, valid or not) and ``adapter_model.safetensors`` (or
    ``adapter_model.bin`` via ``torch.save`` when ``weights_format="bin"``) with PEFT's key
    names, e.g. ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``. Supported
    targets: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``gate_proj``, ``up_proj``,
    ``down_proj``. Weights are float32 and seeded by ``seed``; ``lora_B`` is not zero: at
    ``scale=1.0`` greedy generation with the adapter differs from the base model's (and between
    seeds) while staying non-degenerate. ``scale`` multiplies ``lora_B``.
    """
    shapes = _lora_shapes(
        target_modules,
        rank=rank,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_layers=num_layers,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
    )
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for name, shape in shapes:
        values = rng.standard_normal(shape, dtype=np.float32)
        if ".lora_A." in name:
            values /= math.sqrt(shape[1])  # unit-scale activations out of lora_A
        else:
            values *= scale * _LORA_B_STD
        tensors[name] = values
    directory.mkdir(parents=True, exist_ok=True)
    _write_adapter_config(
        directory,
        base_model=base_model,
        rank=rank,
        alpha=alpha,
        target_modules=target_modules,
        extra_config=extra_config,
    )
    if weights_format == "safetensors":
        save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    else:
        import torch

        state = {name: torch.from_numpy(values) for name, values in tensors.items()}
        torch.save(state, directory / "adapter_model.bin")
    return directory


def write_peft_adapter(
    directory: Path,
    model_dir: Path,
    lora_config: Mapping[str, object],
    *,
    safe_serialization: bool = True,
    dtype: Literal["float32", "bfloat16"] = "float32",
    seed: int = 0,
) -> Path:
    """Save a LoRA adapter of the tiny Llama at ``model_dir`` with the real PEFT library.

    ``lora_config`` holds ``peft.LoraConfig`` arguments (``task_type`` is ``CAUSAL_LM``), for
    example ``{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}``. The adapter is
    made by ``get_peft_model`` on the model loaded in ``dtype`` (its LoRA weights too: PEFT's
    float32 autocast is off) and written by ``save_pretrained`` into ``directory``, as
    ``adapter_model.safetensors`` or, with ``safe_serialization=False``, ``adapter_model.bin``.
    Returns ``directory``.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype))
    config = LoraConfig(task_type="CAUSAL_LM", **lora_config)  # type: ignore[arg-type]
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=False)
    peft_model.save_pretrained(str(directory), safe_serialization=safe_serialization)
    return directory


def write_large_adapter(
    directory: Path, *, base_model: str, size_bytes: int, seed: int = 0
) -> Path:
    """Write a structurally valid adapter whose weights file is about ``size_bytes`` long.

    For cache and transfer benchmarks only: the size comes from a huge rank (targets
    ``q_proj`` and ``v_proj``; roughly 3.5 KiB per unit of rank), far above anything vLLM
    accepts (``--max-lora-rank`` is at most 512), so vLLM will refuse to load it. The file is
    written in 4 MiB chunks of seeded random float32 values (never NaN), so memory use stays
    small even for multi-GB files. The rank is at least 1. Returns ``directory``.
    """
    target_modules = ("q_proj", "v_proj")
    dims = {
        "hidden_size": HIDDEN_SIZE,
        "intermediate_size": INTERMEDIATE_SIZE,
        "num_layers": NUM_LAYERS,
        "num_kv_heads": NUM_KV_HEADS,
        "head_dim": HEAD_DIM,
    }
    bytes_per_rank = 4 * sum(
        math.prod(shape) for _, shape in _lora_shapes(target_modules, rank=1, **dims)
    )
    rank = max(1, size_bytes // bytes_per_rank)
    shapes = _lora_shapes(target_modules, rank=rank, **dims)
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes:
        end = offset + 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    directory.mkdir(parents=True, exist_ok=True)
    _write_adapter_config(
        directory,
        base_model=base_model,
        rank=rank,
        alpha=16,
        target_modules=target_modules,
        extra_config=None,
    )
    rng = np.random.default_rng(seed)
    chunk_values = 1 << 20  # 4 MiB of float32
    with (directory / "adapter_model.safetensors").open("wb") as f:
        f.write(_safetensors_prefix(header))
        remaining = offset // 4
        while remaining:
            count = min(chunk_values, remaining)
            f.write(rng.standard_normal(count, dtype=np.float32).tobytes())
            remaining -= count
    return directory


def _safetensors_prefix(header: Mapping[str, object]) -> bytes:
    """The 8-byte little-endian header length plus the JSON header, space-padded to 8 bytes."""
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


# safetensors refuses headers longer than this many bytes.
_SAFETENSORS_MAX_HEADER = 100_000_000


def write_broken_safetensors(
    path: Path,
    kind: Literal["truncated", "bad_header", "offsets_out_of_range", "header_too_large"],
) -> Path:
    """Write a corrupt safetensors file of the named ``kind`` to ``path`` and return ``path``.

    All kinds name one float32 (4, 4) LoRA tensor with a PEFT key:

    - ``truncated``: a valid file cut in the middle of its tensor data;
    - ``bad_header``: a correct length prefix followed by a header that is not JSON;
    - ``offsets_out_of_range``: a complete file whose tensor's ``data_offsets`` run past the end
      of the data section;
    - ``header_too_large``: a length prefix above safetensors' 100 MB header limit.
    """
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    data = np.arange(16, dtype="<f4").tobytes()

    def tensor_header(begin: int) -> dict[str, object]:
        entry = {"dtype": "F32", "shape": [4, 4], "data_offsets": [begin, begin + len(data)]}
        return {"__metadata__": {"format": "pt"}, name: entry}

    if kind == "truncated":
        content = (_safetensors_prefix(tensor_header(0)) + data)[: -len(data) // 2]
    elif kind == "bad_header":
        raw = b'{"' + name.encode() + b'": {"dtype": "F32", '
        raw += b" " * (-len(raw) % 8)
        content = struct.pack("<Q", len(raw)) + raw + data
    elif kind == "offsets_out_of_range":
        content = _safetensors_prefix(tensor_header(len(data) // 2)) + data
    elif kind == "header_too_large":
        content = struct.pack("<Q", _SAFETENSORS_MAX_HEADER + 8) + b"{}      " + data
    else:
        assert_never(kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path
