"""Adapters saved by the real PEFT library: we refuse exactly what vLLM's own loader refuses.

The oracle is vLLM's static loader as the worker runs it (``PEFTHelper.from_local_dir``,
``validate_legal``, ``LoRAModel.from_local_checkpoint`` with the tiny Llama's LoRA modules and
weights mapper), plus the one thing it loads without checking: every module's rank must be the one
it scales by. Whether the served output equals PEFT's needs a server (covered elsewhere).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from itertools import chain
from pathlib import Path
from typing import Final, Literal

import pytest

from devtools.models import build_tiny_llama, write_peft_adapter
from vllm_lora_resolvers.adapter import AdapterPolicy, check_adapter_folder, parse_adapter_config
from vllm_lora_resolvers.errors import InvalidAdapterError
from vllm_lora_resolvers.lora_patterns import PatternKey

pytest.importorskip("vllm")
pytest.importorskip("peft")
pytestmark = pytest.mark.vllm

MAX_RANK: Final = 16
QV = ["q_proj", "v_proj"]
# name: (LoraConfig arguments, whether vLLM serves the adapter as trained)
PEFT_ADAPTERS: dict[str, tuple[dict[str, object], bool]] = {
    "plain": ({"r": 8, "lora_alpha": 16, "target_modules": QV}, True),
    "patterns": (
        {
            "r": 8,
            "lora_alpha": 16,
            "target_modules": QV,
            "rank_pattern": {"q_proj": 4, "model.layers.1.self_attn.v_proj": 2},
            "alpha_pattern": {"v_proj": 3},
        },
        True,
    ),
    # PEFT trains layer 1's q_proj at rank 4 (its first key), saves the keys sorted, and vLLM then
    # reads rank 2 for it: it would scale the rank-4 weights as rank 2.
    "patterns reordered by saving": (
        {
            "r": 8,
            "lora_alpha": 16,
            "target_modules": QV,
            "rank_pattern": {"q_proj": 4, "layers.1.self_attn.q_proj": 2},
        },
        False,
    ),
    "all-linear": ({"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}, True),
    "regex targets": ({"r": 4, "lora_alpha": 8, "target_modules": r".*\.(q_proj|v_proj)"}, True),
    "one layer": (
        {"r": 4, "lora_alpha": 8, "target_modules": QV, "layers_to_transform": [0]},
        True,
    ),
    "embed_tokens": ({"r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens", "q_proj"]}, True),
    "lm_head": ({"r": 4, "lora_alpha": 8, "target_modules": ["lm_head", "q_proj"]}, True),
    "rslora": ({"r": 4, "lora_alpha": 8, "target_modules": QV, "use_rslora": True}, True),
    "gaussian init": (
        {"r": 4, "lora_alpha": 8, "target_modules": QV, "init_lora_weights": "gaussian"},
        True,
    ),
    "rank above the limit": ({"r": 32, "lora_alpha": 32, "target_modules": QV}, False),
    "trainable tokens": (
        {"r": 4, "lora_alpha": 8, "target_modules": QV, "trainable_token_indices": [1, 2]},
        False,
    ),
    "modules_to_save": (
        {"r": 4, "lora_alpha": 8, "target_modules": QV, "modules_to_save": ["lm_head"]},
        False,
    ),
    "dora": ({"r": 4, "lora_alpha": 8, "target_modules": QV, "use_dora": True}, False),
    "bias lora_only": ({"r": 4, "lora_alpha": 8, "target_modules": QV, "bias": "lora_only"}, False),
    "bias all": ({"r": 4, "lora_alpha": 8, "target_modules": QV, "bias": "all"}, False),
    "lora_bias": ({"r": 4, "lora_alpha": 8, "target_modules": QV, "lora_bias": True}, False),
    "pissa": ({"r": 4, "lora_alpha": 8, "target_modules": QV, "init_lora_weights": "pissa"}, False),
}
FORMATS = {"safetensors": True, "bin": False}
# Variants of those: (adapter, dtype of the model and so of its LoRA weights, config fields
# dropped after saving, as people edit them). Each is served if its adapter is.
Variant = tuple[str, Literal["float32", "bfloat16"], tuple[str, ...]]
VARIANTS: dict[str, Variant] = {
    "plain, bf16 weights": ("plain", "bfloat16", ()),
    "lm_head, bf16 weights": ("lm_head", "bfloat16", ()),
    "trainable tokens, field dropped": (
        "trainable tokens",
        "float32",
        ("trainable_token_indices",),
    ),
}
CASES = [f"{name} ({fmt})" for name in [*PEFT_ADAPTERS, *VARIANTS] for fmt in FORMATS]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("model") / "tiny-llama")


@pytest.fixture(scope="module")
def saved(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every case of `CASES`, saved once for the module."""
    root = tmp_path_factory.mktemp("peft")
    variants: dict[str, Variant] = {name: (name, "float32", ()) for name in PEFT_ADAPTERS}
    folders: dict[str, Path] = {}
    for fmt, safe in FORMATS.items():
        for name, (adapter, dtype, dropped) in (variants | VARIANTS).items():
            folder = write_peft_adapter(
                root / fmt / name,
                model_dir,
                PEFT_ADAPTERS[adapter][0],
                safe_serialization=safe,
                dtype=dtype,
            )
            config_path = folder / "adapter_config.json"
            document = json.loads(config_path.read_text())
            edited = {key: value for key, value in document.items() if key not in dropped}
            config_path.write_text(json.dumps(edited))
            folders[f"{name} ({fmt})"] = folder
    return folders


@pytest.fixture(scope="module")
def vllm_refusal(model_dir: Path) -> Callable[[Path], str | None]:
    """Why vLLM's worker would not serve an adapter folder as trained, or ``None``."""
    from vllm.config.lora import LoRAConfig
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.model_executor.models.llama import LlamaForCausalLM

    # The worker's expected modules: the model's LoRA-capable layers, packed ones unpacked.
    packed = LlamaForCausalLM.packed_modules_mapping
    expected = {
        "o_proj",
        "down_proj",
        *chain.from_iterable(packed.values()),
        *LlamaForCausalLM.embedding_modules,
    }
    mapper = LlamaForCausalLM.hf_to_vllm_mapper.get_rename_mapper()
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]

    def refusal(folder: Path) -> str | None:
        try:
            helper = PEFTHelper.from_local_dir(str(folder), max_position_embeddings=None)
            helper.validate_legal(LoRAConfig(max_lora_rank=MAX_RANK))
            model = LoRAModel.from_local_checkpoint(
                str(folder),
                expected,
                helper,
                lora_model_id=1,
                device="cpu",
                model_vocab_size=vocab,
                weights_mapper=mapper,
            )
        except (ValueError, RuntimeError, TypeError) as error:
            return f"{type(error).__name__}: {error}"
        misused = [
            name
            for name, lora in model.loras.items()
            if not lora.lora_a.shape[0] == lora.rank == lora.lora_b.shape[1]
        ]
        return f"scaled by the wrong rank: {misused}" if misused else None

    return refusal


@pytest.mark.parametrize("case", CASES)
def test_we_refuse_exactly_what_vllm_refuses(
    case: str,
    saved: dict[str, Path],
    model_dir: Path,
    vllm_refusal: Callable[[Path], str | None],
) -> None:
    folder = saved[case]
    name = case.rsplit(" (", 1)[0]
    served = PEFT_ADAPTERS[VARIANTS[name][0] if name in VARIANTS else name][1]
    assert (vllm_refusal(folder) is None) == served, vllm_refusal(folder)
    policy = AdapterPolicy(base_model=str(model_dir), max_rank=MAX_RANK)
    if served:
        check_adapter_folder(case, folder, policy)
        return
    with pytest.raises(InvalidAdapterError) as raised:
        check_adapter_folder(case, folder, policy)
    assert str(raised.value).startswith(f"adapter {case!r}")


def test_trainable_tokens_are_refused_by_tensor_name_when_the_config_hides_them(
    saved: dict[str, Path], model_dir: Path
) -> None:
    policy = AdapterPolicy(base_model=str(model_dir), max_rank=MAX_RANK)
    with pytest.raises(InvalidAdapterError) as raised:
        check_adapter_folder("tt", saved["trainable tokens, field dropped (safetensors)"], policy)
    assert "'base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta'" in str(
        raised.value
    )


def test_pattern_keys_match_the_modules_vllm_matches() -> None:
    from vllm.lora.peft_helper import PEFTHelper

    keys = [
        "q_proj",
        "proj",
        "self_attn.q_proj",
        "layers.1.self_attn.q_proj",
        "model.layers.1",
        "^model.layers.1.self_attn.q_proj",
        "^layers.1.self_attn.q_proj",
        "q_proj$",
        "layers\\.1\\.self_attn\\.q_proj",
        "layers.1.self.attn.q.proj",
        "layers.1.self_attn.q_pr.j",
        ".*\\.q_proj",
        ".*\\.model\\.layers\\.1\\.self_attn\\.q_proj",
        "^.*\\.self_attn\\.q_proj",
        ".*\\.experts\\.gate_up_proj",
        "experts.down_proj",
        "x.q_proj",
    ]
    modules = [
        "model.layers.1.self_attn.q_proj",
        "q_proj",
        "self_attn.q_proj",
        "model.layers.11.self_attn.q_proj",
        "model.layers.1.self_attn.xq_proj",
        "model.layers.1",
        "model.layers.0.mlp.experts.gate_up_proj",
        "model.layers.0.mlp.experts.down_proj",
        "layers.1.self_attn.q_proj",
        "x.q_proj",
        "xq_proj",
    ]
    for key in keys:
        ours = PatternKey.parse(key)
        for module in modules:
            theirs = PEFTHelper._match_pattern({key: 1}, module) == 1
            assert ours.matches(module) == theirs, (key, module)


@pytest.mark.parametrize(
    ("fields", "vllm_error"),
    [({"lora_alpha": "16"}, TypeError), ({"rank_pattern": {"q_proj": 0}}, ValueError)],
    ids=["string alpha", "rank 0 in rank_pattern"],
)
def test_configs_vllm_raises_on_are_refused(
    fields: dict[str, object], vllm_error: type[Exception]
) -> None:
    from vllm.lora.peft_helper import PEFTHelper

    document = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": QV, **fields}
    with pytest.raises(vllm_error):
        PEFTHelper.from_dict(dict(document))
    with pytest.raises(InvalidAdapterError):
        parse_adapter_config("a", json.dumps(document).encode())


def test_nan_alpha_vllm_would_serve_as_nan_is_refused() -> None:
    from vllm.lora.peft_helper import PEFTHelper

    document = {"peft_type": "LORA", "r": 8, "lora_alpha": math.nan, "target_modules": QV}
    assert math.isnan(PEFTHelper.from_dict(dict(document)).vllm_lora_scaling_factor)
    with pytest.raises(InvalidAdapterError, match="lora_alpha"):
        parse_adapter_config("a", json.dumps(document).encode())
