"""Answers the processes of a node share: the last answer to a question (a store lookup, say),
recorded for the others, so that a node asks at most once per time-to-live."""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from vllm_lora_resolvers.cache.files import cache_write_error, lock_file, unlock_and_remove
from vllm_lora_resolvers.cache.layout import Layout
from vllm_lora_resolvers.cache.staging import Staging

logger = logging.getLogger("vllm.lora_resolvers.cache")

#: What asks the question when no fresh answer is recorded.
Ask = Callable[[], str]
#: Whether a recorded answer is sound (``None``: any is).
Accept = Callable[[str], bool] | None


class NodeAnswer(BaseModel):
    """A recorded answer to a question the node's processes share (see `NodeAnswers.ask`)."""

    model_config = ConfigDict(frozen=True)

    question: str
    answer: str
    at: float


class NodeAnswers:
    """The answers recorded in ``answers/``, one file per question."""

    def __init__(self, layout: Layout, staging: Staging) -> None:
        self._layout = layout
        self._staging = staging

    def ask(
        self, question: str, max_age: float, ask: Ask, accept: Accept = None
    ) -> tuple[str, bool]:
        """The answer to ``question`` some process of this node recorded at most ``max_age``
        seconds ago, else ``ask()``'s, recorded for the others: ``(answer, asked here)``.

        Processes asking at once wait for the first one's answer (one lock per question), so a
        node asks at most once per ``max_age`` however many processes want to know. A recorded
        answer ``accept`` rejects (a damaged record) is asked again and rewritten. An answer the
        cache cannot record (a full disk) is still returned: the node asks again next time.
        Raises `CacheError` when the question's lock cannot be taken (no answer is asked then).
        """
        digest = hashlib.sha256(question.encode()).hexdigest()[:40]
        record = self._layout.answers / f"{digest}.json"
        lock = self._layout.locks / f"answer.{digest}.lock"
        try:
            self._layout.make()
            descriptor = lock_file(lock, wait=True)
        except OSError as error:
            raise cache_write_error(error) from None
        assert descriptor is not None
        try:
            recorded = _read_answer(record, question)
            if (
                recorded is not None
                and 0 <= time.time() - recorded.at < max_age
                and (accept is None or accept(recorded.answer))
            ):
                return recorded.answer, False
            answer = ask()
            self._record(record, NodeAnswer(question=question, answer=answer, at=time.time()))
            return answer, True
        finally:
            unlock_and_remove(lock, descriptor)

    def _record(self, record: Path, answer: NodeAnswer) -> None:
        """Write ``answer`` to ``record`` at once for the node's other processes, or not at all
        (with a warning) when the cache cannot."""
        try:
            temporary = self._staging.scratch() / f"answer.{secrets.token_hex(8)}"
            temporary.write_text(answer.model_dump_json())
            temporary.replace(record)
        except OSError as error:
            logger.warning(
                "the node cache cannot record an answer for its other processes (%s); they ask "
                "again",
                error.strerror or error,
            )


def _read_answer(record: Path, question: str) -> NodeAnswer | None:
    try:
        answer = NodeAnswer.model_validate_json(record.read_bytes())
    except (OSError, ValidationError):
        return None
    return answer if answer.question == question else None
