"""`vllm-lora sync`'s building blocks without a vLLM server: answers shared by a node's processes,
lease release when a name is resolved again, the command's exit codes.

The sync itself, against two real vLLM servers, is tested in ``test_e2e_rollout.py``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import BASE_MODEL, REPO

from devtools.models import write_lora_adapter
from vllm_lora_resolvers.backends.filesystem import FilesystemStore
from vllm_lora_resolvers.cache import NodeCache
from vllm_lora_resolvers.cli import main
from vllm_lora_resolvers.config import Settings
from vllm_lora_resolvers.resolver import Resolver
from vllm_lora_resolvers.sync import StoreAnswer

_ASK_ONCE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from vllm_lora_resolvers.cache import NodeCache

    cache, asked = NodeCache(Path(sys.argv[1])), Path(sys.argv[2])

    def ask():
        with asked.open("a") as log:
            log.write("asked\\n")
        time.sleep(0.5)
        return "current KEY"

    answer, asked_here = cache.node_answer("current of x", 30.0, ask)
    print(answer)
    """
)


def test_processes_of_a_node_asking_at_once_share_one_answer(
    cache_dir: Path, tmp_path: Path
) -> None:
    asked = tmp_path / "asked.log"
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _ASK_ONCE, str(cache_dir), str(asked)],
            stdout=subprocess.PIPE,
            text=True,
            env={"PYTHONPATH": str(REPO / "src")},
        )
        for _ in range(4)
    ]
    answers = [worker.communicate(timeout=60)[0].strip() for worker in workers]
    assert answers == ["current KEY"] * 4
    assert asked.read_text().splitlines() == ["asked"]


def test_an_answer_older_than_its_max_age_is_asked_again(cache_dir: Path) -> None:
    cache = NodeCache(cache_dir)
    answers = iter(["first", "second"])
    assert cache.node_answer("q", 0.2, lambda: next(answers)) == ("first", True)
    assert cache.node_answer("q", 0.2, lambda: "unused") == ("first", False)
    time.sleep(0.25)
    assert cache.node_answer("q", 0.2, lambda: next(answers)) == ("second", True)


def test_a_damaged_or_foreign_answer_record_is_asked_again(cache_dir: Path) -> None:
    cache = NodeCache(cache_dir)
    cache.node_answer("q", 60, lambda: "recorded")
    (record,) = cache.answers.iterdir()
    record.write_text("{not json")
    assert cache.node_answer("q", 60, lambda: "asked again") == ("asked again", True)
    record.write_text(record.read_text().replace('"q"', '"another question"'))
    assert cache.node_answer("q", 60, lambda: "asked once more") == ("asked once more", True)


def test_a_released_snapshot_can_be_evicted(cache_dir: Path, adapters_dir: Path) -> None:
    settings = Settings.from_environ({"VLLM_LORA_RESOLVER_CACHE_DIR": str(cache_dir)}, argv=[])
    resolver = Resolver(FilesystemStore(adapters_dir, settings, NodeCache(cache_dir)))
    write_lora_adapter(adapters_dir / "sql", base_model=BASE_MODEL)
    resolved = resolver.current(BASE_MODEL, "sql")
    assert resolved is not None
    key = resolved.snapshot.key
    assert resolver.cache.is_leased_by_anyone(key)
    resolver.cache.release(key)
    assert not resolver.cache.is_leased_by_anyone(key)
    assert [snapshot.key for snapshot in resolver.cache.prune(0)] == [key]


def test_a_name_resolved_again_releases_the_version_it_replaced_unless_another_name_uses_it(
    make_settings: Callable[..., Settings], cache_dir: Path, adapters_dir: Path
) -> None:
    resolver = Resolver(FilesystemStore(adapters_dir, make_settings(), NodeCache(cache_dir)))
    write_lora_adapter(adapters_dir / "sql", base_model=BASE_MODEL, seed=1)
    write_lora_adapter(adapters_dir / "chat", base_model=BASE_MODEL, seed=3)
    first = resolver.resolve(BASE_MODEL, "sql")
    chat = resolver.resolve(BASE_MODEL, "chat")
    assert first is not None and chat is not None
    write_lora_adapter(adapters_dir / "sql", base_model=BASE_MODEL, seed=2)
    second = resolver.resolve(BASE_MODEL, "sql")  # as vLLM asks after an unload
    assert second is not None and second.snapshot.key != first.snapshot.key
    assert not resolver.cache.is_leased_by_anyone(first.snapshot.key)
    assert resolver.cache.is_leased_by_anyone(second.snapshot.key)
    assert resolver.cache.is_leased_by_anyone(chat.snapshot.key)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("current 0123abcd", StoreAnswer("current", "0123abcd")),
        ("gone ", StoreAnswer("gone")),
        ("refused rank 64 is above 16", StoreAnswer("refused", "rank 64 is above 16")),
        ("garbage", StoreAnswer("unreachable", "unreadable shared answer 'garbage'")),
    ],
)
def test_store_answers_read_back_as_written(text: str, expected: StoreAnswer) -> None:
    assert StoreAnswer.decode(text) == expected
    assert StoreAnswer.decode(expected.encode()) == expected


def test_sync_once_exits_2_when_the_server_cannot_be_asked(
    cache_dir: Path, adapters_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VLLM_LORA_RESOLVER_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("VLLM_LORA_RESOLVER_FS_DIR", str(adapters_dir))
    runner = CliRunner()
    closed_port = runner.invoke(main, ["sync", "--server", "http://127.0.0.1:9", "--once"])
    assert closed_port.exit_code == 2, closed_port.output
    not_http = runner.invoke(main, ["sync", "--server", "file:///etc/passwd", "--once"])
    assert not_http.exit_code == 2
    assert "must be an http:// or https:// URL" in not_http.output


def test_sync_refuses_to_start_without_a_store(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VLLM_LORA_RESOLVER_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("VLLM_PLUGINS", "lora_s3_resolver")
    result = CliRunner().invoke(main, ["sync", "--server", "http://127.0.0.1:9", "--once"])
    assert result.exit_code == 2
    assert "no store is configured" in result.output
