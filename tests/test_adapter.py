"""The checks an adapter folder must pass before it is handed to vLLM."""

from __future__ import annotations

import json
import pickle
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from devtools.models import write_broken_safetensors, write_lora_adapter
from vllm_lora_resolvers.adapter import (
    AdapterPolicy,
    check_adapter_folder,
    check_weights_header,
    parse_adapter_config,
)
from vllm_lora_resolvers.errors import InvalidAdapterError

BASE = "/models/tiny-llama"
POLICY = AdapterPolicy(base_model=BASE, max_rank=16)


def adapter(tmp_path: Path, **config: object) -> Path:
    return write_lora_adapter(tmp_path / "a", base_model=BASE, rank=8, extra_config=config)


def refusal(folder: Path, policy: AdapterPolicy = POLICY) -> str:
    with pytest.raises(InvalidAdapterError) as raised:
        check_adapter_folder("my-adapter", folder, policy)
    return str(raised.value)


def test_valid_adapter_passes(tmp_path: Path) -> None:
    config = check_adapter_folder("my-adapter", adapter(tmp_path), POLICY)
    assert config.r == 8
    assert config.max_rank == 8


def test_bin_weights_from_torch_save_pass(tmp_path: Path) -> None:
    folder = write_lora_adapter(tmp_path / "a", base_model=BASE, weights_format="bin")
    check_adapter_folder("my-adapter", folder, POLICY)


def test_wrong_peft_type_is_refused(tmp_path: Path) -> None:
    message = refusal(adapter(tmp_path, peft_type="PREFIX_TUNING"))
    assert "peft_type is 'PREFIX_TUNING'" in message
    assert "'LORA'" in message


def test_base_model_mismatch_names_both_models(tmp_path: Path) -> None:
    message = refusal(adapter(tmp_path, base_model_name_or_path="meta-llama/Other"))
    assert "'my-adapter'" in message
    assert "'meta-llama/Other'" in message
    assert BASE in message
    assert "VLLM_LORA_RESOLVER_BASE_MODEL_ALIASES" in message


def test_base_model_alias_is_accepted(tmp_path: Path) -> None:
    folder = adapter(tmp_path, base_model_name_or_path="org/tiny-llama")
    policy = AdapterPolicy(base_model=BASE, max_rank=16, base_model_aliases=("org/tiny-llama",))
    check_adapter_folder("my-adapter", folder, policy)


def test_trailing_slash_on_local_base_model_path_matches(tmp_path: Path) -> None:
    check_adapter_folder("a", adapter(tmp_path, base_model_name_or_path=BASE + "/"), POLICY)


def test_missing_base_model_is_refused(tmp_path: Path) -> None:
    assert "base_model_name_or_path is None" in refusal(
        adapter(tmp_path, base_model_name_or_path=None)
    )


def test_rank_above_limit_names_rank_and_limit(tmp_path: Path) -> None:
    folder = write_lora_adapter(tmp_path / "a", base_model=BASE, rank=32)
    message = refusal(folder)
    assert "rank 32" in message
    assert "limit of 16" in message


def test_rank_pattern_counts_towards_the_limit(tmp_path: Path) -> None:
    message = refusal(adapter(tmp_path, rank_pattern={"q_proj": 64}))
    assert "rank 64" in message


def test_rank_at_the_limit_passes(tmp_path: Path) -> None:
    folder = write_lora_adapter(tmp_path / "a", base_model=BASE, rank=16)
    check_adapter_folder("a", folder, POLICY)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("use_dora", True, "DoRA"),
        ("bias", "all", "bias='all'"),
        ("lora_bias", True, "lora_bias"),
        ("modules_to_save", ["lm_head"], "modules_to_save=['lm_head']"),
        ("init_lora_weights", "pissa", "init_lora_weights='pissa'"),
        ("alora_invocation_tokens", [1, 2], "aLoRA"),
        ("layer_replication", [[0, 1]], "layer_replication"),
        ("use_qalora", True, "QALoRA"),
    ],
)
def test_unsupported_feature_is_refused(
    tmp_path: Path, field: str, value: object, expected: str
) -> None:
    assert expected in refusal(adapter(tmp_path, **{field: value}))


@pytest.mark.parametrize("modules", [["classifier"], ["score"], None])
def test_classifier_modules_to_save_pass(tmp_path: Path, modules: list[str] | None) -> None:
    check_adapter_folder("a", adapter(tmp_path, modules_to_save=modules), POLICY)


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva"])
def test_weight_only_inits_pass(tmp_path: Path, init: object) -> None:
    check_adapter_folder("a", adapter(tmp_path, init_lora_weights=init), POLICY)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
        (b'{"peft_type": "LORA", "r": "8", "lora_alpha": 16, "target_modules": []}', "'r'"),
        (b'{"peft_type": "LORA", "r": -1, "lora_alpha": 16, "target_modules": []}', "'r' = -1"),
        (b'{"peft_type": "LORA", "r": 1e9, "lora_alpha": 16, "target_modules": []}', "'r'"),
        (b'{"peft_type": "LORA", "r": 0, "lora_alpha": 16, "target_modules": []}', "'r' = 0"),
        (b'{"peft_type": "LORA", "r": 8, "target_modules": []}', "lora_alpha"),
        (b'{"peft_type": "LORA", "r": 8, "lora_alpha": 16}', "target_modules"),
        (b'{"peft_type": 7, "r": 8, "lora_alpha": 16, "target_modules": []}', "peft_type"),
        (
            b'{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": [], '
            b'"rank_pattern": {"q": 1.5}}',
            "rank_pattern",
        ),
    ],
)
def test_hostile_config_gets_a_clear_error(raw: bytes, expected: str) -> None:
    with pytest.raises(InvalidAdapterError) as raised:
        parse_adapter_config("my-adapter", raw)
    assert expected in str(raised.value)
    assert "'my-adapter'" in str(raised.value)


def test_huge_config_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    folder = adapter(tmp_path)
    with (folder / "adapter_config.json").open("wb") as stream:
        stream.write(b'{"pad": "' + b"x" * (100 << 20) + b'"}')
    assert "the limit is 1048576 bytes" in refusal(folder)


def test_missing_config_is_refused(tmp_path: Path) -> None:
    folder = adapter(tmp_path)
    (folder / "adapter_config.json").unlink()
    assert "has no adapter_config.json" in refusal(folder)


def test_missing_weights_are_refused(tmp_path: Path) -> None:
    folder = adapter(tmp_path)
    (folder / "adapter_model.safetensors").unlink()
    assert "has no weights file" in refusal(folder)


@pytest.mark.parametrize(
    "kind", ["truncated", "bad_header", "offsets_out_of_range", "header_too_large"]
)
def test_malformed_safetensors_is_refused(tmp_path: Path, kind: str) -> None:
    folder = adapter(tmp_path)
    write_broken_safetensors(folder / "adapter_model.safetensors", kind)  # type: ignore[arg-type]
    assert "adapter_model.safetensors is malformed" in refusal(folder)


def test_empty_safetensors_file_is_refused(tmp_path: Path) -> None:
    folder = adapter(tmp_path)
    (folder / "adapter_model.safetensors").write_bytes(b"")
    assert "shorter than a safetensors header" in refusal(folder)


def test_safetensors_with_inconsistent_shape_is_refused(tmp_path: Path) -> None:
    folder = adapter(tmp_path)
    header = json.dumps({"t": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 32]}}).encode()
    payload = len(header).to_bytes(8, "little") + header + bytes(32)
    (folder / "adapter_model.safetensors").write_bytes(payload)
    assert "do not match shape [4, 4]" in refusal(folder)


class _Exploit:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return (os.system, ("echo pwned",))


def _torch_style_archive(path: Path, payload: bytes) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", payload)
        archive.writestr("archive/version", "3\n")


def test_pickle_that_calls_os_system_is_refused(tmp_path: Path) -> None:
    folder = adapter(tmp_path)
    (folder / "adapter_model.safetensors").unlink()
    _torch_style_archive(folder / "adapter_model.bin", pickle.dumps(_Exploit(), protocol=2))
    assert "which is not allowed" in refusal(folder)


def test_pickle_with_stack_global_exploit_is_refused(tmp_path: Path) -> None:
    folder = adapter(tmp_path)
    (folder / "adapter_model.safetensors").unlink()
    _torch_style_archive(folder / "adapter_model.bin", pickle.dumps(_Exploit(), protocol=4))
    assert "posix.system" in refusal(folder) or "os.system" in refusal(folder)


def test_raw_pickle_weights_are_refused(tmp_path: Path) -> None:
    folder = adapter(tmp_path)
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.bin").write_bytes(pickle.dumps({"a": 1}))
    assert "not a torch.save zip archive" in refusal(folder)


def test_safetensors_is_preferred_over_bin_as_vllm_does(tmp_path: Path) -> None:
    folder = adapter(tmp_path)
    (folder / "adapter_model.bin").write_bytes(b"garbage that would fail the pickle check")
    check_adapter_folder("a", folder, POLICY)


def test_pickle_naming_a_torch_function_beyond_tensor_rebuilding_is_refused(tmp_path: Path) -> None:
    folder = adapter(tmp_path)
    (folder / "adapter_model.safetensors").unlink()
    payload = b"\x80\x02ctorch.hub\nload\nq\x00."  # GLOBAL torch.hub load
    _torch_style_archive(folder / "adapter_model.bin", payload)
    assert "torch.hub.load, which is not allowed" in refusal(folder)


# -- adapter_config.json as vLLM's PEFTHelper reads it -----------------------------------------


def config_bytes(**fields: object) -> bytes:
    document = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}
    return json.dumps({**document, **fields}).encode()


def config_refusal(raw: bytes) -> str:
    with pytest.raises(InvalidAdapterError) as raised:
        parse_adapter_config("my-adapter", raw)
    return str(raised.value)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"lora_alpha": "16"}, "field 'lora_alpha' = '16': Input should be a valid number"),
        ({"lora_alpha": float("nan")}, "field 'lora_alpha' = nan: Input should be a finite number"),
        ({"lora_alpha": float("inf")}, "'lora_alpha' = inf"),
        ({"alpha_pattern": {"q_proj": float("nan")}}, "'alpha_pattern.q_proj' = nan"),
        ({"alpha_pattern": {"q_proj": "32"}}, "'alpha_pattern.q_proj' = '32'"),
        ({"rank_pattern": {"q_proj": 0}}, "'rank_pattern.q_proj' = 0: Input should be greater"),
        ({"rank_pattern": {"q_proj": -4}}, "'rank_pattern.q_proj' = -4"),
        ({"use_rslora": "false"}, "'use_rslora' = 'false': Input should be a valid boolean"),
    ],
    ids=[
        "string alpha",
        "NaN alpha",
        "infinite alpha",
        "NaN in alpha_pattern",
        "string in alpha_pattern",
        "rank 0 in rank_pattern",
        "negative rank in rank_pattern",
        "string use_rslora",
    ],
)
def test_config_vllm_would_refuse_or_misuse_is_refused(
    fields: dict[str, object], expected: str
) -> None:
    assert expected in config_refusal(config_bytes(**fields))


@pytest.mark.parametrize(
    ("encoded", "expected"),
    [
        (b"\xef\xbb\xbf" + config_bytes(), "is not UTF-8 text without a byte-order mark"),
        (config_bytes().decode().encode("utf-16"), "is not UTF-8 text without a byte-order mark"),
        (config_bytes().decode().encode("utf-32"), "is not UTF-8 text without a byte-order mark"),
        (config_bytes().decode().encode("utf-16-be"), "is not valid JSON"),  # NULs are UTF-8
    ],
    ids=["UTF-8 with BOM", "UTF-16", "UTF-32", "UTF-16 without BOM"],
)
def test_config_that_is_not_plain_utf8_is_refused(encoded: bytes, expected: str) -> None:
    assert f"adapter_config.json {expected}" in config_refusal(encoded)


@pytest.mark.parametrize("pattern", ["rank_pattern", "alpha_pattern"])
def test_pattern_key_that_would_backtrack_in_the_engine_is_refused_at_once(pattern: str) -> None:
    started = time.perf_counter()
    message = config_refusal(config_bytes(**{pattern: {"(.*){1,32000}[bc]": 4}}))
    assert time.perf_counter() - started < 0.5
    assert f"field '{pattern}.(.*){{1,32000}}[bc].[key]'" in message
    assert "is not a module name or name suffix" in message


@pytest.mark.parametrize(
    "key",
    [
        "q_proj",
        "model.layers.0.self_attn.q_proj",
        "layers\\.1\\.mlp\\.down_proj",
        "^model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.q_proj$",
        ".*\\.mlp\\.experts\\.gate_up_proj",  # what PEFT writes for fused MoE experts
    ],
)
def test_pattern_keys_people_and_peft_write_are_accepted(key: str) -> None:
    config = parse_adapter_config("my-adapter", config_bytes(rank_pattern={key: 4}))
    assert config.rank_pattern == {key: 4}


def test_more_pattern_keys_than_vllm_caches_are_refused() -> None:
    keys = {f"model.layers.{i}.self_attn.q_proj": 4 for i in range(200)}
    alphas = {f"model.layers.{i}.mlp.up_proj": 4.0 for i in range(100)}
    message = config_refusal(config_bytes(rank_pattern=keys, alpha_pattern=alphas))
    assert "hold 300 distinct keys" in message


def test_a_long_hostile_key_is_quoted_short() -> None:
    message = config_refusal(config_bytes(rank_pattern={"(" * 5000: 4}))
    assert len(message) < 600
    assert "(" * 100 not in message


# -- the weights as vLLM's loader reads them for the config -------------------------------------

PREFIX = "base_model.model.model.layers"


def with_tensors(folder: Path, shapes: dict[str, tuple[int, ...]], **config: object) -> Path:
    """``folder``'s weights replaced by zero tensors of ``shapes``, its config updated."""
    save_file(
        {name: np.zeros(shape, np.float32) for name, shape in shapes.items()},
        str(folder / "adapter_model.safetensors"),
    )
    document = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**document, **config}))
    return folder


def lora(
    module: str, rank: int, fan_in: int = 128, fan_out: int = 128
) -> dict[str, tuple[int, ...]]:
    return {
        f"{PREFIX}.{module}.lora_A.weight": (rank, fan_in),
        f"{PREFIX}.{module}.lora_B.weight": (fan_out, rank),
    }


def test_trainable_tokens_tensor_is_refused_by_name(tmp_path: Path) -> None:
    delta = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
    folder = with_tensors(adapter(tmp_path), {**lora("0.self_attn.q_proj", 8), delta: (3, 128)})
    message = refusal(folder)
    assert f"weights file adapter_model.safetensors holds tensor {delta!r}" in message
    assert "trainable_token_indices" in message


def test_weights_of_another_rank_than_r_are_refused(tmp_path: Path) -> None:
    folder = with_tensors(adapter(tmp_path), lora("0.self_attn.q_proj", 8), r=4)
    message = refusal(folder)
    assert f"holds tensor '{PREFIX}.0.self_attn.q_proj.lora_A.weight' of shape [8, 128]" in message
    assert "gives its module rank 4 (r)" in message


def test_weights_of_another_rank_than_rank_pattern_says_are_refused(tmp_path: Path) -> None:
    shapes = {**lora("0.self_attn.q_proj", 8), **lora("0.self_attn.v_proj", 8, fan_out=64)}
    folder = with_tensors(adapter(tmp_path), shapes, rank_pattern={"v_proj": 4})
    assert "module rank 4 (rank_pattern key 'v_proj')" in refusal(folder)


def test_weights_matching_rank_pattern_pass(tmp_path: Path) -> None:
    shapes = {
        **lora("0.self_attn.q_proj", 8),
        **lora("0.self_attn.v_proj", 4, fan_out=64),
        **lora("1.self_attn.v_proj", 2, fan_out=64),
    }
    rank_pattern = {"model.layers.1.self_attn.v_proj": 2, "v_proj": 4}
    folder = with_tensors(adapter(tmp_path), shapes, rank_pattern=rank_pattern)
    check_adapter_folder("my-adapter", folder, POLICY)


def test_fused_experts_hold_one_rank_per_expert(tmp_path: Path) -> None:
    experts = "0.mlp.experts.base_layer"
    folder = with_tensors(adapter(tmp_path), lora(experts, 8 * 4, fan_out=512))
    check_adapter_folder("my-adapter", folder, POLICY)


@pytest.mark.parametrize(
    ("shapes", "expected"),
    [
        ({f"{PREFIX}.0.self_attn.q_proj.lora_A.weight": (8, 128)}, "but no lora_B tensor"),
        ({f"{PREFIX}.0.self_attn.q_proj.lora_B.weight": (128, 8)}, "but no lora_A tensor"),
        (
            {**lora("0.self_attn.q_proj", 8), f"{PREFIX}.0.self_attn.q_proj.weight": (128, 128)},
            "'base_model.model.model.layers.0.self_attn.q_proj.weight', which vLLM cannot load",
        ),
        (
            {**lora("0.self_attn.q_proj", 8), f"{PREFIX}.0.self_attn.q_proj.lora_B.bias": (128,)},
            "lora_B.bias', which vLLM cannot load",
        ),
        (
            {
                **lora("0.self_attn.q_proj", 8),
                f"{PREFIX}.0.self_attn.q_proj.lora_magnitude_vector": (128,),
            },
            "which vLLM cannot load",
        ),
        (
            {**lora("0.self_attn.q_proj", 8), "base_model.model.lm_head.weight": (512, 128)},
            "'base_model.model.lm_head.weight', which vLLM cannot load",
        ),
        (
            {**lora("0.self_attn.q_proj", 8), "base_model.model.score.weight": (2, 128)},
            "whose module 'score' modules_to_save does not list",
        ),
        (
            {
                f"{PREFIX}.0.self_attn.q_proj.lora_A.weight": (8, 128, 1),
                f"{PREFIX}.0.self_attn.q_proj.lora_B.weight": (128, 8),
            },
            "of shape [8, 128, 1]; LoRA weights are 2-D",
        ),
        (lora("0.self-attn.q_proj", 8), "whose module is not a module path"),
        (lora("0" + ".x" * 20, 8), "whose module is not a module path"),
        (lora("0." + "x" * 300, 8), "whose name is longer than 256 characters"),
        (
            {
                **lora("0.self_attn.q_proj", 8),
                f"{PREFIX}.0.self_attn.q_proj.lora_embedding_A": (8, 512),
            },
            "holds two lora_A tensors for module 'model.layers.0.self_attn.q_proj'",
        ),
    ],
    ids=[
        "A without B",
        "B without A",
        "base weight",
        "LoRA bias",
        "DoRA magnitude",
        "full lm_head",
        "score not in modules_to_save",
        "3-D lora_A",
        "odd module name",
        "deep module name",
        "long name",
        "two lora_A",
    ],
)
def test_tensor_vllm_cannot_load_as_the_config_says_is_refused(
    tmp_path: Path, shapes: dict[str, tuple[int, ...]], expected: str
) -> None:
    assert expected in refusal(with_tensors(adapter(tmp_path), shapes))


def test_classification_head_listed_in_modules_to_save_passes(tmp_path: Path) -> None:
    shapes = {**lora("0.self_attn.q_proj", 8), "base_model.model.score.weight": (2, 128)}
    folder = with_tensors(adapter(tmp_path), shapes, modules_to_save=["score"])
    check_adapter_folder("my-adapter", folder, POLICY)


def test_pattern_keys_times_modules_beyond_the_engine_budget_are_refused(tmp_path: Path) -> None:
    shapes = {
        name: shape
        for layer in range(1100)
        for name, shape in lora(f"{layer}.self_attn.q_proj", 8, fan_in=2, fan_out=2).items()
    }
    keys = {f"model.layers.{layer}.mlp.up_proj": 4 for layer in range(250)}  # none matches
    folder = with_tensors(adapter(tmp_path), shapes, rank_pattern=keys)
    started = time.perf_counter()
    assert "vLLM would test more than 262144 rank_pattern / alpha_pattern keys" in refusal(folder)
    assert time.perf_counter() - started < 2


def test_weights_header_is_checked_before_the_body_is_fetched(tmp_path: Path) -> None:
    folder = adapter(tmp_path)
    config = parse_adapter_config("my-adapter", (folder / "adapter_config.json").read_bytes())
    weights = (folder / "adapter_model.safetensors").read_bytes()
    needed = check_weights_header("my-adapter", config, weights[:8], len(weights))
    assert 8 < needed < len(weights)
    assert check_weights_header("my-adapter", config, weights[:needed], len(weights)) == needed
    smaller = parse_adapter_config("my-adapter", config_bytes(r=4, base_model_name_or_path=BASE))
    with pytest.raises(InvalidAdapterError, match="gives its module rank 4"):
        check_weights_header("my-adapter", smaller, weights[:needed], len(weights))
    with pytest.raises(InvalidAdapterError, match="does not fit"):
        check_weights_header("my-adapter", config, weights[:needed], needed - 1)
