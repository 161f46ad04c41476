"""The checks an adapter folder must pass before it is handed to vLLM."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import pytest

from devtools.models import write_broken_safetensors, write_lora_adapter
from vllm_lora_resolvers.adapter import (
    AdapterPolicy,
    check_adapter_folder,
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
