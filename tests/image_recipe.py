"""The repository's ``Dockerfile``, read as ``docker build`` reads it, for the tests to run.

Only the instructions the file uses are understood (``ARG``, ``FROM``, ``COPY``, ``RUN``); any other
fails the read, so a new instruction is a test to write, not one silently skipped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from conftest import REPO

DOCKERFILE = REPO / "Dockerfile"
_REFERENCE = re.compile(r"\$\{(\w+)\}|\$(\w+)")


@dataclass
class ImageRecipe:
    """What the Dockerfile builds from, copies in and runs."""

    #: The ``FROM`` image, its arguments substituted.
    base: str = ""
    #: The build arguments declared after ``FROM``: their defaults, or the values passed. A
    #: ``RUN`` command sees them as environment variables.
    arguments: dict[str, str] = field(default_factory=dict)
    #: ``COPY`` instructions: (sources, relative to the build context; destination).
    copies: list[tuple[list[str], str]] = field(default_factory=list)
    #: ``RUN`` commands (shell form), as written.
    runs: list[str] = field(default_factory=list)


def instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` of a Dockerfile: comments dropped, continued lines joined."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    found = []
    for line in joined.splitlines():
        if line.strip():
            instruction, _, rest = line.strip().partition(" ")
            found.append((instruction.upper(), rest.strip()))
    return found


def _substitute(text: str, arguments: Mapping[str, str]) -> str:
    """``${NAME}`` and ``$NAME`` replaced as Docker replaces them in ``FROM`` and ``COPY``."""
    return _REFERENCE.sub(lambda match: arguments[match.group(1) or match.group(2)], text)


def image_recipe(build_args: Mapping[str, str] | None = None) -> ImageRecipe:
    """The Dockerfile's recipe with ``build_args`` passed (``docker build --build-arg``)."""
    passed = build_args or {}
    recipe = ImageRecipe()
    arguments: dict[str, str] = {}
    for instruction, rest in instructions(DOCKERFILE.read_text()):
        if instruction == "ARG":
            name, _, default = rest.partition("=")
            arguments[name] = passed.get(name, default)
        elif instruction == "FROM":
            assert not recipe.base, "one stage"
            recipe.base = _substitute(rest, arguments)
            arguments = recipe.arguments  # arguments before FROM are for FROM only
        elif instruction == "COPY":
            *sources, destination = _substitute(rest, arguments).split()
            recipe.copies.append((sources, destination))
        elif instruction == "RUN":
            recipe.runs.append(rest)
        else:
            raise AssertionError(f"the Dockerfile's {instruction} is not understood here")
    return recipe
