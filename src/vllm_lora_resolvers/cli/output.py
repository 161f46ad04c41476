"""What every command shares: consoles, sizes and times for people, status lines, exit codes,
the options several commands take.

Text that comes from a store, a config, a cache or the environment is printed only through
`printable` (`line`, `table`, `print_finding` and `CannotCheckError` apply it): a name or a message
can never move the cursor, recolour or clear the terminal, or start a line of its own.

Exit codes: 0 the answer is yes (valid, pulled, intact, healthy); 1 it is no (invalid, failed,
damaged, a FAIL); 2 the question could not be answered (bad usage or configuration, a store
that cannot be read).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

import click
from rich import box
from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text

from vllm_lora_resolvers.config import ConfigurationError
from vllm_lora_resolvers.errors import CacheError, StoreUnavailableError

#: Width of output that is not a terminal: wide enough that URIs and messages stay on one line.
_PIPE_WIDTH = 240
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")
_Command = TypeVar("_Command", bound=Callable[..., Any])
#: The largest LoRA rank a command accepts (the server's ``--max-lora-rank``).
max_rank_option = click.option(
    "--max-rank",
    type=click.IntRange(min=1),
    help="The server's --max-lora-rank; default: the configured limit.",
)


def seconds_option(
    name: str, *, minimum: float, default: float, help: str
) -> Callable[[_Command], _Command]:
    """An option of a number of seconds, at least ``minimum``, its default shown."""
    return click.option(
        name, type=click.FloatRange(min=minimum), default=default, show_default=True, help=help
    )


def printable(text: str) -> str:
    r"""``text`` with every character a terminal acts on (controls, escapes, line and paragraph
    breaks, bidirectional overrides) written as its Python escape.

    >>> print(printable("evil\x1b[2J\nrow"))
    evil\x1b[2J\nrow
    """
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def line(text: str, style: str = "") -> Text:
    """One line to print, whatever ``text`` holds."""
    return Text(printable(text), style=style)


class CannotCheckError(click.ClickException):
    """The command could not answer its question (configuration, store or cache trouble)."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(printable(message))


@contextmanager
def cannot_check() -> Iterator[None]:
    """Report configuration, store and cache errors as `CannotCheckError` (exit code 2)."""
    try:
        yield
    except (ConfigurationError, StoreUnavailableError, CacheError) as error:
        raise CannotCheckError(str(error)) from None


def console(*, stderr: bool = False) -> Console:
    """A console that styles a terminal and writes plain, unwrapped lines to anything else."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else _PIPE_WIDTH
    # No markup, no emoji codes: names, paths and messages with [brackets] or :colons: are printed
    # as they are (nor is rich's table of emoji codes loaded to look them up).
    return Console(
        stderr=stderr, width=width, markup=False, emoji=False, highlight=False, soft_wrap=True
    )


class PrintableTable(Table):
    """A table whose text cells go through `printable`: one row is one line, whatever it holds."""

    def add_row(self, *renderables: RenderableType | None, **options: Any) -> None:
        """Add a row; `str` cells are made printable (`Text` cells are the command's own)."""
        cells = (printable(cell) if isinstance(cell, str) else cell for cell in renderables)
        super().add_row(*cells, **options)


def table(*columns: str) -> Table:
    """A borderless table with these column headers; long cells fold rather than truncate."""
    made = PrintableTable(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for column in columns:
        made.add_column(column, overflow="fold")
    return made


def print_table(out: Console, rows: Table) -> None:
    """Print a table; to anything but a terminal, without the blanks that pad its lines."""
    if out.is_terminal:
        out.print(rows)
        return
    with out.capture() as captured:
        out.print(rows)
    for line in captured.get().splitlines():
        out.print(Text(line.rstrip()))


def plural(count: int, noun: str) -> str:
    """``1 snapshot``, ``2 snapshots``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def human_bytes(size: int) -> str:
    """``1536`` -> ``1.5 KiB``."""
    value = float(size)
    for unit in _UNITS:
        if value < 1024 or unit == _UNITS[-1]:
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable: the last unit returns")


def local_time(timestamp: float) -> str:
    """A Unix time as ``YYYY-MM-DD HH:MM:SS`` in local time (``-`` for 0)."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp)) if timestamp else "-"


def short_version(version: str) -> str:
    """The first 12 characters of an opaque version (a hash, a commit), as git shows commits."""
    return version[:12]


class Level(StrEnum):
    """How a finding of ``doctor`` (or a check of ``validate``) came out."""

    OK = "OK"
    WARN = "WARN"
    FAIL = "FAIL"
    PASS = "PASS"  # noqa: S105 - a check's outcome, not a password
    SKIP = "SKIP"


_STYLES = {
    Level.OK: "green",
    Level.PASS: "green",
    Level.WARN: "yellow",
    Level.FAIL: "bold red",
    Level.SKIP: "dim",
}


@dataclass(frozen=True)
class Finding:
    """One line of a report: its level, what was found and, for a problem, the fix."""

    level: Level
    message: str
    fix: str | None = None


def print_finding(out: Console, finding: Finding, indent: int = 0) -> None:
    """``LEVEL message`` and, under it, ``fix: ...``; user text is never read as markup."""
    pad = " " * indent
    status = Text(pad)
    status.append(f"{finding.level.value:<4}", style=_STYLES[finding.level])
    status.append(f" {printable(finding.message)}")
    out.print(status)
    if finding.fix:
        out.print(line(f"{pad}     fix: {finding.fix}", style="cyan"))
