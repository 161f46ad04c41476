"""Weights files built to crash, exhaust or exploit the loader: refused, in bounded time and memory.

Each verdict is compared with the library vLLM would load the file with: ``safetensors.safe_open``
for safetensors, ``torch.load(weights_only=True)`` for ``torch.save`` zips (never on a pickle that
names a callable it must not call: a marker file stands in for any payload and must never appear).
"""

from __future__ import annotations

import io
import json
import math
import struct
import time
import tracemalloc
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from vllm_lora_resolvers.adapter import check_weights_file
from vllm_lora_resolvers.errors import InvalidAdapterError

NAME = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def refusal(path: Path) -> str:
    with pytest.raises(InvalidAdapterError) as raised:
        check_weights_file("my-adapter", path)
    message = str(raised.value)
    assert message.startswith(f"adapter 'my-adapter': weights file {path.name} ")
    return message


def accepted(path: Path) -> bool:
    try:
        check_weights_file("my-adapter", path)
    except InvalidAdapterError:
        return False
    return True


def measured(check: Callable[[], object]) -> tuple[float, int]:
    """Seconds and peak bytes Python allocated while running ``check``."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        check()
    finally:
        elapsed = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return elapsed, peak


# -- safetensors ------------------------------------------------------------------------------


def safetensors_file(path: Path, header: bytes, data: bytes) -> Path:
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)
    return path


def entry(begin: int, end: int, shape: list[int] | None = None) -> dict[str, object]:
    return {"dtype": "F32", "shape": shape or [(end - begin) // 4], "data_offsets": [begin, end]}


def two(**header: object) -> bytes:
    return json.dumps({"a": entry(0, 8), "b": entry(8, 16), **header}).encode()


def a_twice(first: dict[str, object], second: dict[str, object]) -> bytes:
    """A header that names tensor ``a`` twice, ``first`` then ``second`` (JSON that `json.dumps`
    cannot write)."""
    return b'{"a": ' + json.dumps(first).encode() + b', "a": ' + json.dumps(second).encode() + b"}"


SAFETENSORS_CASES: dict[str, tuple[bytes, bytes]] = {
    "valid": (two(), bytes(16)),
    "space padding": (two() + b"    ", bytes(16)),
    "leading space": (b"  " + two(), bytes(16)),
    "newline padding": (two() + b"\n", bytes(16)),
    "null metadata": (two(__metadata__=None), bytes(16)),
    "string metadata": (two(__metadata__={"format": "pt"}), bytes(16)),
    "extra entry field": (json.dumps({"a": {**entry(0, 8), "x": 1}}).encode(), bytes(8)),
    "empty tensor": (json.dumps({"a": entry(0, 8), "e": entry(8, 8, [0, 4])}).encode(), bytes(8)),
    "overlapping tensors": (json.dumps({"a": entry(0, 8), "b": entry(4, 12)}).encode(), bytes(12)),
    "gap between tensors": (json.dumps({"a": entry(0, 8), "b": entry(12, 20)}).encode(), bytes(20)),
    "trailing data": (two(), bytes(17)),
    "integer metadata value": (two(__metadata__={"k": 1}), bytes(16)),
    "list metadata": (two(__metadata__=[]), bytes(16)),
    "shape overflow": (json.dumps({"a": entry(0, 8, [2**62, 8])}).encode(), bytes(8)),
    "reversed offsets": (json.dumps({"a": {**entry(0, 8), "data_offsets": [8, 0]}}).encode(), b""),
    "float shape": (b'{"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}', bytes(8)),
    "negative shape": (json.dumps({"a": entry(0, 8, [-2])}).encode(), bytes(8)),
    "UTF-16 header": (json.dumps({"a": entry(0, 8)}).encode("utf-16"), bytes(8)),
    "byte-order mark": (b"\xef\xbb\xbf" + json.dumps({"a": entry(0, 8)}).encode(), bytes(8)),
    "lone surrogate in a name": (
        b'{"\\udc80": ' + json.dumps(entry(0, 8)).encode() + b"}",
        bytes(8),
    ),
    "duplicate tensor name": (a_twice(entry(0, 8), entry(8, 16)), bytes(16)),
    "duplicate field": (
        b'{"a": {"dtype": "F32", "dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}',
        bytes(8),
    ),
    "junk after the JSON": (two() + b"x", bytes(16)),
    "NUL padding": (two() + b"\0\0", bytes(16)),
    "entry not an object": (json.dumps({"a": entry(0, 8), "b": 5}).encode(), bytes(8)),
}


def safetensors_library_accepts(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as opened:
            for name in opened.keys():  # noqa: SIM118 (a safe_open handle is not a mapping)
                opened.get_tensor(name)
    except Exception:  # any refusal counts
        return False
    return True


@pytest.mark.parametrize("case", SAFETENSORS_CASES)
def test_safetensors_verdict_agrees_with_the_safetensors_library(tmp_path: Path, case: str) -> None:
    path = safetensors_file(tmp_path / "adapter_model.safetensors", *SAFETENSORS_CASES[case])
    assert accepted(path) == safetensors_library_accepts(path)


@pytest.mark.parametrize(
    ("header", "data", "reason"),
    [
        (a_twice(entry(0, 8), entry(0, 8)), bytes(8), "repeats the key 'a'"),
        (
            b'{"__metadata__": {"k": "1", "k": "2"}, "a": '
            + json.dumps(entry(0, 8)).encode()
            + b"}",
            bytes(8),
            "repeats the key 'k'",
        ),
        (
            json.dumps({"a": {**entry(0, 8), "dtype": "I32"}}).encode(),
            bytes(8),
            "dtype 'I32' is not one of",
        ),
        (b"{}", b"", "it holds no tensors"),
    ],
    ids=["identical duplicate name", "duplicate metadata key", "integer dtype", "no tensors"],
)
def test_what_safetensors_would_load_but_vllm_must_not_get_is_refused(
    tmp_path: Path, header: bytes, data: bytes, reason: str
) -> None:
    path = safetensors_file(tmp_path / "adapter_model.safetensors", header, data)
    assert safetensors_library_accepts(path)
    assert reason in refusal(path)


def test_header_above_the_limit_is_refused_without_reading_it(tmp_path: Path) -> None:
    header = json.dumps({"a": entry(0, 8)}).encode() + b" " * (17 << 20)  # valid JSON
    path = safetensors_file(tmp_path / "adapter_model.safetensors", header, bytes(8))
    elapsed, peak = measured(lambda: refusal(path))
    assert "does not fit" in refusal(path)
    assert peak < 1 << 20
    assert elapsed < 1


def test_header_holding_more_tensors_than_an_adapter_is_refused_before_parsing(
    tmp_path: Path,
) -> None:
    count = 70_000
    header = json.dumps({f"t{i}": entry(4 * i, 4 * i + 4) for i in range(count)}).encode()
    path = safetensors_file(tmp_path / "adapter_model.safetensors", header, bytes(4 * count))
    assert safetensors_library_accepts(path)
    elapsed, peak = measured(lambda: refusal(path))
    assert "the header is larger than 65536 tensors need" in refusal(path)
    assert peak < 2 * len(header)
    assert elapsed < 1


# -- torch.save zips --------------------------------------------------------------------------


@pytest.fixture
def marker(tmp_path: Path) -> Iterator[Path]:
    """The file a payload would create if anything ever ran it."""
    path = tmp_path / "payload-ran"
    yield path
    assert not path.exists(), "a payload ran"


def text(opcode: bytes, value: str, length: str = "<I") -> bytes:
    raw = value.encode()
    return opcode + struct.pack(length, len(raw)) + raw


def binunicode(value: str) -> bytes:
    return text(b"X", value)


def short_binstring(value: str) -> bytes:
    return text(b"U", value, "<B")


def binint(value: int) -> bytes:
    return b"J" + struct.pack("<i", value)


def ints(*values: int) -> bytes:
    return b"(" + b"".join(map(binint, values)) + b"t"


def state_dict_pickle(
    shape: tuple[int, ...] = (4, 4),
    numel: int = 16,
    storage: str = "FloatStorage",
    rebuild: str = "torch._utils\n_rebuild_tensor_v2",
) -> bytes:
    """A protocol-2 pickle of ``{NAME: tensor}``, opcode for opcode as torch.save writes it."""
    strides = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
    persistent_id = b"(" + binunicode("storage") + f"ctorch\n{storage}\n".encode()
    persistent_id += binunicode("0") + binunicode("cpu") + binint(numel) + b"tQ"
    return b"".join(
        [
            b"\x80\x02}(",
            binunicode(NAME),
            f"c{rebuild}\n(".encode(),
            persistent_id,
            b"K\x00",
            ints(*shape),
            ints(*strides),
            b"\x89ccollections\nOrderedDict\n)R",
            b"tRu.",
        ]
    )


def torch_zip(
    path: Path,
    pickle: bytes,
    records: dict[str, bytes] | None = None,
    compression: int = zipfile.ZIP_STORED,
) -> Path:
    """A zip laid out as torch.save lays it out: ``archive/data.pkl``, ``data/<key>``, version."""
    with zipfile.ZipFile(path, "w", compression) as archive:
        archive.writestr("archive/data.pkl", pickle)
        for name, content in (records if records is not None else {"data/0": bytes(64)}).items():
            archive.writestr(f"archive/{name}", content)
        archive.writestr("archive/version", "3\n")
    return path


def torch_accepts(path: Path) -> bool:
    """``torch.load`` as vLLM calls it; only ever given files that name no foreign callable."""
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # any refusal counts
        return False
    return True


def call_os_system(names: bytes, marker: Path) -> bytes:
    """``os.system("touch <marker>")``, with the global's name pushed by ``names``."""
    return names + b"\x93" + binunicode(f"touch {marker}") + b"\x85R."


def test_crafted_state_dict_loads_in_torch_and_passes(tmp_path: Path) -> None:
    path = torch_zip(tmp_path / "adapter_model.bin", state_dict_pickle())
    assert torch_accepts(path)
    assert accepted(path)


@pytest.mark.parametrize(
    "state",
    [
        {NAME: torch.randn(8, 128)},
        {NAME: torch.randn(8, 128, dtype=torch.bfloat16), "b": torch.randn(4, dtype=torch.half)},
        {"a": torch.randn(4, 4, dtype=torch.float64)},
        torch.nn.Linear(4, 3).state_dict(),  # an OrderedDict with _metadata
        {"p": torch.nn.Parameter(torch.ones(3))},
        {"view": torch.arange(16.0)[2:10:2], "same": torch.arange(16.0)},  # strided views
        {},
    ],
    ids=["fp32", "bf16 and fp16", "fp64", "module state dict", "parameter", "views", "empty"],
)
def test_real_torch_save_files_pass(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "adapter_model.bin"
    torch.save(state, path)
    assert torch_accepts(path)
    assert accepted(path)


def test_stack_global_reached_through_the_memo_after_decoy_strings_is_refused(
    tmp_path: Path, marker: Path
) -> None:
    names = b"(" + binunicode("os") + b"q\x00" + binunicode("system") + b"q\x01"
    names += binunicode("collections") + binunicode("OrderedDict") + b"t"  # decoys, put away
    pickle = b"\x80\x02" + call_os_system(names + b"h\x00h\x01", marker)
    path = torch_zip(tmp_path / "adapter_model.bin", pickle)
    assert "its pickle calls os.system, which is not allowed" in refusal(path)


def test_global_names_pushed_as_short_binstrings_are_seen(tmp_path: Path, marker: Path) -> None:
    decoys = b"(" + binunicode("collections") + binunicode("OrderedDict") + b"t"
    names = decoys + short_binstring("os") + short_binstring("system")
    path = torch_zip(tmp_path / "adapter_model.bin", b"\x80\x02" + call_os_system(names, marker))
    assert "its pickle calls os.system, which is not allowed" in refusal(path)


def test_protocol_4_pickle_is_refused_as_torch_weights_only_refuses_it(tmp_path: Path) -> None:
    path = tmp_path / "adapter_model.bin"
    torch.save({NAME: torch.randn(8, 128)}, path, pickle_protocol=4)
    assert not torch_accepts(path)
    assert "opcode FRAME, which torch.load(weights_only=True)" in refusal(path)


@pytest.mark.parametrize(
    ("pickle", "named"),
    [
        (state_dict_pickle(storage="LongStorage"), "torch.LongStorage"),
        (
            state_dict_pickle(rebuild="torch._utils\n_rebuild_tensor_v3"),
            "torch._utils._rebuild_tensor_v3",
        ),
        (b"\x80\x02ctorch.hub\nload\nq\x00.", "torch.hub.load"),
        (b"\x80\x02c" + "os\nsystem\u2028\n".encode() + b".", "'os.system\\u2028'"),
    ],
    ids=["integer storage", "tensor rebuilt with a dtype", "torch.hub.load", "odd name"],
)
def test_global_outside_the_state_dict_allow_list_is_refused(
    tmp_path: Path, pickle: bytes, named: str
) -> None:
    path = torch_zip(tmp_path / "adapter_model.bin", pickle)
    assert f"its pickle calls {named}" in refusal(path)


def test_legacy_pickle_with_a_torch_zip_appended_is_refused(tmp_path: Path, marker: Path) -> None:
    benign = torch_zip(tmp_path / "benign.bin", state_dict_pickle()).read_bytes()
    exploit = b"\x80\x02cposix\nsystem\n" + binunicode(f"touch {marker}") + b"\x85R."
    path = tmp_path / "adapter_model.bin"
    path.write_bytes(exploit + benign)
    assert zipfile.is_zipfile(path)
    assert "not a torch.save zip archive" in refusal(path)


def test_pickle_zip_bomb_is_refused_without_inflating_it(tmp_path: Path) -> None:
    size = 256 << 20
    path = tmp_path / "adapter_model.bin"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        with archive.open("archive/data.pkl", "w", force_zip64=True) as pickle:
            pickle.write(b"\x80\x02\x8e" + struct.pack("<Q", size))
            for _ in range(size >> 20):
                pickle.write(bytes(1 << 20))
            pickle.write(b".")
        archive.writestr("archive/version", "3\n")
    assert path.stat().st_size < size // 100
    elapsed, peak = measured(lambda: refusal(path))
    assert "member 'archive/data.pkl' is compressed" in refusal(path)
    assert peak < 1 << 20
    assert elapsed < 1


def test_data_pkl_above_the_limit_is_refused(tmp_path: Path) -> None:
    pickle = b"\x80\x02" + binunicode("x" * (5 << 20)) + b"."  # valid, and names no callable
    path = torch_zip(tmp_path / "adapter_model.bin", pickle)
    assert "data.pkl is larger than 4194304 bytes" in refusal(path)


def test_operand_longer_than_its_pickle_is_refused_unread(tmp_path: Path) -> None:
    pickle = b"\x80\x02\x8e" + struct.pack("<Q", 1 << 30) + bytes(3 << 20) + b"."
    path = torch_zip(tmp_path / "adapter_model.bin", pickle)
    elapsed, peak = measured(lambda: refusal(path))
    assert "opcode BINBYTES8" in refusal(path)
    assert peak < 2 * len(pickle)
    assert elapsed < 1


@pytest.mark.parametrize(
    ("pickle", "records", "reason"),
    [
        (state_dict_pickle(), {"data/0": bytes(60)}, "storage 0 needs a data/0 record of 64"),
        (
            state_dict_pickle(),
            {},
            "storage 0 needs a data/0 record of 64 bytes, the archive has none",
        ),
        (
            state_dict_pickle(shape=(4, 8)),
            {"data/0": bytes(64)},
            "reaches past the end of its storage",
        ),
        (
            state_dict_pickle(),
            {"data/0": bytes(64), "data/1": bytes(8)},
            "data/1 belongs to no tensor",
        ),
        (
            state_dict_pickle(),
            {"data/0": bytes(64), "evil.pkl": b"."},
            "'archive/evil.pkl' is not one torch.save writes",
        ),
    ],
    ids=[
        "short storage",
        "missing storage",
        "tensor past its storage",
        "stray storage",
        "stray member",
    ],
)
def test_archive_that_torch_save_would_not_write_is_refused(
    tmp_path: Path, pickle: bytes, records: dict[str, bytes], reason: str
) -> None:
    path = torch_zip(tmp_path / "adapter_model.bin", pickle, records)
    assert reason in refusal(path)


@pytest.mark.parametrize(
    "records",
    [{"data/0": bytes(60)}, {}, {"data/0": bytes(32)}],
    ids=["short storage", "missing storage", "half storage"],
)
def test_torch_refuses_the_broken_archives_too(tmp_path: Path, records: dict[str, bytes]) -> None:
    path = torch_zip(tmp_path / "adapter_model.bin", state_dict_pickle(), records)
    assert not torch_accepts(path)
    assert not accepted(path)


def test_zip_directory_larger_than_torch_writes_is_refused_before_it_is_read(
    tmp_path: Path,
) -> None:
    directory = io.BytesIO()
    count = 60_000
    with zipfile.ZipFile(directory, "w") as archive:
        archive.writestr("archive/data.pkl", state_dict_pickle())
        for key in range(count):
            archive.writestr(f"archive/data/{key:020d}", b"")
    path = tmp_path / "adapter_model.bin"
    path.write_bytes(directory.getvalue())
    elapsed, peak = measured(lambda: refusal(path))
    assert "its zip directory is larger than" in refusal(path)
    assert peak < 1 << 20
    assert elapsed < 1
