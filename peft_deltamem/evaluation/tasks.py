"""Evaluation tasks: conversations (each a list of sessions of chat messages) and questions about them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .ladder import history_messages
from .locomo import CATEGORY_NAMES

Message = dict[str, str]

SCORINGS = ("exact", "locomo", "style")


@dataclass
class Conversation:
    """One conversation: its sessions (each written into memory by one model call) and an optional system message."""

    id: str
    sessions: list[list[Message]]
    system: str | None = None

    def history(self) -> list[Message]:
        """All sessions as one message list (what the in-prompt baselines see)."""
        return [m for session in self.sessions for m in session]


@dataclass
class Question:
    """One question about conversation ``conversation`` (an index into the task's conversations)."""

    id: str
    conversation: int
    question: str
    answer: str
    choices: list[str] | None = None
    group: str = "all"
    category: int | None = None
    preferences: list[dict[str, Any]] | None = None


@dataclass
class MemoryTask:
    """Conversations and questions, plus how answers are scored: ``"exact"`` (against the reference answer),
    ``"locomo"`` (LoCoMo's token F1) or ``"style"`` (whether the answer follows each question's ``preferences``,
    :mod:`~peft_deltamem.evaluation.style_scoring`)."""

    name: str
    conversations: list[Conversation]
    questions: list[Question]
    scoring: str = "exact"

    def __post_init__(self) -> None:
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {list(SCORINGS)}, got {self.scoring!r}")
        if self.scoring == "style" and any(not q.preferences for q in self.questions):
            raise ValueError("a style task needs the preferences of every question")
        for q in self.questions:
            if not 0 <= q.conversation < len(self.conversations):
                raise ValueError(f"question {q.id} refers to conversation {q.conversation}, which does not exist")


def recall_task(examples: Sequence[Mapping[str, Any]], name: str = "recall") -> MemoryTask:
    """A task from recall-ladder records (:func:`~peft_deltamem.evaluation.ladder.make_ladder`): one conversation
    (one session) and one question per record. Working-style records (levels 6-7, with ``preferences``) make a
    ``"style"`` task; the levels cannot be mixed with the others in one task."""
    styled = {bool(ex.get("preferences")) for ex in examples}
    if len(styled) > 1:
        raise ValueError("recall_task: working-style records (levels 6-7) cannot share a task with levels 1-5")
    conversations, questions = [], []
    for i, ex in enumerate(examples):
        first = ex["messages"][0]
        system = first["content"] if first["role"] == "system" else None
        conversations.append(Conversation(id=str(ex["id"]), sessions=[history_messages(ex)], system=system))
        questions.append(
            Question(
                id=str(ex["id"]),
                conversation=i,
                question=ex["messages"][-2]["content"],
                answer=str(ex["answer"]),
                choices=list(ex["choices"]) if ex.get("choices") else None,
                group=str(ex.get("fact_type", "all")),
                preferences=[dict(p) for p in ex["preferences"]] if ex.get("preferences") else None,
            )
        )
    scoring = "style" if styled == {True} else "exact"
    return MemoryTask(name=name, conversations=conversations, questions=questions, scoring=scoring)


def locomo_task(samples: Sequence[Any], name: str = "locomo", *, roles: str = "alternate") -> MemoryTask:
    """A task from :func:`~peft_deltamem.evaluation.locomo.load_locomo` samples: one memory per conversation, written
    one session per call; every scored QA item (categories 1-4) is a question, grouped by category."""
    conversations, questions = [], []
    for c, sample in enumerate(samples):
        conversations.append(Conversation(id=sample.sample_id, sessions=sample.session_messages(roles=roles)))
        for j, qa in enumerate(sample.qa):
            questions.append(
                Question(
                    id=f"{sample.sample_id}/qa{j}",
                    conversation=c,
                    question=qa.question,
                    answer=qa.answer,
                    group=f"{qa.category}-{CATEGORY_NAMES.get(qa.category, '?')}",
                    category=qa.category,
                )
            )
    return MemoryTask(name=name, conversations=conversations, questions=questions, scoring="locomo")
