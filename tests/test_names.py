"""Which adapter names are accepted before any store is asked."""

from __future__ import annotations

import pytest

from vllm_lora_resolvers.names import adapter_name_segments, is_safe_adapter_name

HOSTILE_NAMES = [
    "",
    ".",
    "..",
    "../x",
    "a/../../b",
    "a/..",
    "/etc/passwd",
    "//server/share",
    "a\\b",
    "..\\x",
    "a\x00b",
    "a\nb",
    "a\tb",
    "a\x7fb",
    "%2e%2e",
    "%2e%2e/x",
    "a%2fb",
    "x" * 10_000,
    "a//b",
    "a/",
    "/a",
    ".hidden",
    "-flag",
    "a/.vllm-lora",
    "\uff41dapter",  # fullwidth a
    "\u0430dapter",  # Cyrillic a
    "adapter\u200b",  # zero-width space
    "a b",
    "a:b",
    "a/b/c/d/e/f/g/h/i",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=range(len(HOSTILE_NAMES)))
def test_hostile_name_is_refused(name: str) -> None:
    assert adapter_name_segments(name) is None
    assert not is_safe_adapter_name(name)


@pytest.mark.parametrize(
    ("name", "segments"),
    [
        ("sql", ("sql",)),
        ("my_sql-adapter.v2", ("my_sql-adapter.v2",)),
        ("org/repo", ("org", "repo")),
        ("org/repo/sub.dir", ("org", "repo", "sub.dir")),
        ("A1", ("A1",)),
    ],
)
def test_safe_name_splits_into_segments(name: str, segments: tuple[str, ...]) -> None:
    assert adapter_name_segments(name) == segments


def test_name_length_is_bounded() -> None:
    assert is_safe_adapter_name("a" * 128 + "/" + "b" * 127)
    assert not is_safe_adapter_name("a" * 128 + "/" + "b" * 128)


def test_a_segment_fits_in_a_file_name() -> None:
    assert is_safe_adapter_name("a" * 255)
    assert not is_safe_adapter_name("a" * 256)  # NAME_MAX: it could never be a folder
