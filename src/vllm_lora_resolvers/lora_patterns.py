"""``rank_pattern`` / ``alpha_pattern`` keys: the ones vLLM can evaluate in bounded time.

vLLM (``PEFTHelper._match_pattern``), like PEFT (``get_pattern_key``), treats every key as a
regular expression: a module takes the value of the first key for which
``re.match(rf"(.*\\.)?({key})$", module)`` matches. A key such as ``(.*){1,32000}[bc]`` backtracks
for ever, in the engine. Accepted here are the keys PEFT writes and people use: a module path or
path suffix whose dots are plain or escaped (``q_proj``, ``model.layers.0.self_attn.q_proj``,
``layers\\.0\\.mlp``), optionally anchored by ``^`` / ``$`` or led by PEFT's own ``.*\\.``
(``.*\\.mlp\\.experts\\.gate_up_proj``). Such a key matches a fixed number of characters at the end
of the module name, so `PatternKey.matches` decides it in linear time, exactly as vLLM would.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_PATTERN_KEY_CHARS = 256
_SAFE_KEY = re.compile(
    r"(?P<start>\^)?(?P<after_dot>\.\*\\\.)?(?P<body>[A-Za-z0-9_]+(?:\\?\.[A-Za-z0-9_]+)*)\$?"
)


def pattern_key_problem(key: str) -> str | None:
    """Why vLLM cannot be trusted to evaluate ``key`` quickly, or ``None`` if it can."""
    if len(key) > MAX_PATTERN_KEY_CHARS:
        return f"is longer than {MAX_PATTERN_KEY_CHARS} characters"
    if _SAFE_KEY.fullmatch(key) is None:
        return (
            "is not a module name or name suffix (letters, digits, '_' and '.' or '\\.', "
            "optionally '^...$' or PEFT's '.*\\.' prefix); vLLM would run it as a regular "
            "expression in the engine; list the module names instead"
        )
    return None


@dataclass(frozen=True)
class PatternKey:
    """One accepted key, compiled to the test vLLM applies to module names."""

    at_start: bool
    after_dot: bool
    body: re.Pattern[str]
    length: int

    @classmethod
    def parse(cls, key: str) -> PatternKey:
        """Compile ``key``; ``ValueError`` unless `pattern_key_problem` accepts it."""
        parsed = _SAFE_KEY.fullmatch(key)
        if parsed is None or len(key) > MAX_PATTERN_KEY_CHARS:
            raise ValueError("not an accepted pattern key")
        body = parsed["body"]
        return cls(
            at_start=parsed["start"] is not None,
            after_dot=parsed["after_dot"] is not None,
            body=re.compile(body),
            length=len(body.replace("\\.", ".")),
        )

    def matches(self, module: str) -> bool:
        """Whether ``re.match(rf"(.*\\.)?({key})$", module)`` would match."""
        start = len(module) - self.length
        if start < 0 or self.body.fullmatch(module, start) is None:
            return False
        if self.after_dot:
            return start > 0 and module[start - 1] == "."
        if self.at_start:
            return start == 0
        return start == 0 or module[start - 1] == "."
