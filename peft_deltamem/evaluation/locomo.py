"""Loader for LoCoMo-format conversations (Maharana et al., 2024) as chat messages plus QA items.

LoCoMo itself is CC BY-NC and is never shipped with this project: the user passes the path of their copy
(e.g. ``locomo10.json``). The expected format is a JSON list of samples::

    {"sample_id": "conv-26",                          # optional; the list index is used otherwise
     "conversation": {"speaker_a": "Caroline", "speaker_b": "Melanie",
                      "session_1_date_time": "1:56 pm on 8 May, 2023",
                      "session_1": [{"speaker": "Caroline", "dia_id": "D1:1", "text": "Hey Mel! ..."}, ...],
                      ...},
     "qa": [{"question": "...", "answer": "...", "evidence": ["D1:3"], "category": 2}, ...]}

Turns become chat messages whose content is ``"Speaker: text"`` (a shared photo's caption, when the turn has
``blip_caption``, is appended as ``[shares a photo of ...]``). Roles: with ``roles="alternate"`` (default)
``speaker_a`` speaks as ``user`` and ``speaker_b`` as ``assistant``, which keeps two-party chats in the
template's natural shape (consecutive turns by the same speaker keep the same role); with ``roles="user"``
every turn is a ``user`` message. The session's date is prefixed to its first turn as ``[date] ``.

QA items are kept for categories 1-4 (1 multi-hop, 2 temporal, 3 open-domain, 4 single-hop; category 5,
adversarial, has no gold answer to score by F1 and is dropped). Malformed files raise
:class:`LocomoFormatError` naming the sample and the field.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

Message = dict[str, str]

CATEGORY_NAMES: dict[int, str] = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop", 5: "adversarial"}
SCORED_CATEGORIES: tuple[int, ...] = (1, 2, 3, 4)
_SESSION_KEY = re.compile(r"^session_(\d+)$")


class LocomoFormatError(ValueError):
    """A LoCoMo-format file does not have the expected structure; the message names the sample and field."""


@dataclass
class LocomoTurn:
    """One dialogue turn."""

    speaker: str
    dia_id: str
    text: str
    caption: str | None = None


@dataclass
class LocomoSession:
    """One session: its number, date string (may be None) and turns."""

    index: int
    date_time: str | None
    turns: list[LocomoTurn]


@dataclass
class LocomoQA:
    """One question with its gold answer, evidence dialogue ids and category (1-4)."""

    question: str
    answer: str
    category: int
    evidence: list[str] = field(default_factory=list)


@dataclass
class LocomoSample:
    """One LoCoMo conversation with its questions."""

    sample_id: str
    speaker_a: str
    speaker_b: str
    sessions: list[LocomoSession]
    qa: list[LocomoQA]

    def session_messages(self, *, roles: str = "alternate", include_dates: bool = True) -> list[list[Message]]:
        """The sessions as lists of chat messages (see the module docstring for roles and dates)."""
        return [session_to_messages(self, s, roles=roles, include_dates=include_dates) for s in self.sessions]

    def history_messages(self, *, roles: str = "alternate", include_dates: bool = True) -> list[Message]:
        """All sessions concatenated into one message list."""
        return [m for session in self.session_messages(roles=roles, include_dates=include_dates) for m in session]


def session_to_messages(
    sample: LocomoSample, session: LocomoSession, *, roles: str = "alternate", include_dates: bool = True
) -> list[Message]:
    """Turn one session into chat messages ``{"role", "content": "Speaker: text"}``."""
    if roles not in ("alternate", "user"):
        raise ValueError(f"roles must be 'alternate' or 'user', got {roles!r}")
    messages: list[Message] = []
    for i, turn in enumerate(session.turns):
        content = f"{turn.speaker}: {turn.text}"
        if turn.caption:
            content += f" [shares a photo of {turn.caption}]"
        if i == 0 and include_dates and session.date_time:
            content = f"[{session.date_time}] {content}"
        role = "user" if roles == "user" or turn.speaker == sample.speaker_a else "assistant"
        messages.append({"role": role, "content": content})
    return messages


def _require(mapping: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(mapping, dict):
        raise LocomoFormatError(f"{where}: expected a JSON object, got {type(mapping).__name__}")
    if key not in mapping:
        raise LocomoFormatError(f"{where}: missing field {key!r}")
    value = mapping[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise LocomoFormatError(f"{where}: field {key!r} should be {names}, got {type(value).__name__}")
    return value


def _parse_sessions(conversation: dict[str, Any], speakers: tuple[str, str], where: str) -> list[LocomoSession]:
    sessions = []
    numbers = sorted(int(m.group(1)) for key in conversation if (m := _SESSION_KEY.match(key)))
    if not numbers:
        raise LocomoFormatError(f"{where}: conversation has no 'session_N' lists")
    for number in numbers:
        key = f"session_{number}"
        raw_turns = _require(conversation, key, list, where)
        date = conversation.get(f"{key}_date_time")
        if date is not None and not isinstance(date, str):
            raise LocomoFormatError(f"{where}: field '{key}_date_time' should be str, got {type(date).__name__}")
        turns = []
        for t, raw in enumerate(raw_turns):
            turn_where = f"{where}, {key}[{t}]"
            speaker = _require(raw, "speaker", str, turn_where)
            if speaker not in speakers:
                raise LocomoFormatError(
                    f"{turn_where}: speaker {speaker!r} is neither speaker_a nor speaker_b {speakers}"
                )
            caption = raw.get("blip_caption")
            turns.append(
                LocomoTurn(
                    speaker=speaker,
                    dia_id=_require(raw, "dia_id", str, turn_where),
                    text=_require(raw, "text", str, turn_where),
                    caption=caption if isinstance(caption, str) and caption.strip() else None,
                )
            )
        sessions.append(LocomoSession(index=number, date_time=date, turns=turns))
    return sessions


def _parse_qa(raw_qa: list[Any], where: str, categories: Iterable[int]) -> list[LocomoQA]:
    keep = set(categories)
    items = []
    for q, raw in enumerate(raw_qa):
        qa_where = f"{where}, qa[{q}]"
        category = _require(raw, "category", int, qa_where)
        if category not in keep:
            continue
        answer = _require(raw, "answer", (str, int, float), qa_where)
        evidence = raw.get("evidence", [])
        if not isinstance(evidence, list) or not all(isinstance(e, str) for e in evidence):
            raise LocomoFormatError(f"{qa_where}: field 'evidence' should be a list of dialogue ids (str)")
        items.append(
            LocomoQA(
                question=_require(raw, "question", str, qa_where),
                answer=str(answer),
                category=category,
                evidence=list(evidence),
            )
        )
    return items


def parse_locomo(data: Any, *, categories: Iterable[int] = SCORED_CATEGORIES) -> list[LocomoSample]:
    """Validate and convert already-decoded LoCoMo JSON (a list of samples); see :func:`load_locomo`."""
    if not isinstance(data, list):
        raise LocomoFormatError(f"top level: expected a JSON list of samples, got {type(data).__name__}")
    categories = tuple(categories)
    samples = []
    for i, raw in enumerate(data):
        where = f"sample {i}"
        if isinstance(raw, dict) and isinstance(raw.get("sample_id"), str):
            where += f" ({raw['sample_id']})"
        conversation = _require(raw, "conversation", dict, where)
        speaker_a = _require(conversation, "speaker_a", str, f"{where}, conversation")
        speaker_b = _require(conversation, "speaker_b", str, f"{where}, conversation")
        samples.append(
            LocomoSample(
                sample_id=raw["sample_id"] if isinstance(raw.get("sample_id"), str) else str(i),
                speaker_a=speaker_a,
                speaker_b=speaker_b,
                sessions=_parse_sessions(conversation, (speaker_a, speaker_b), f"{where}, conversation"),
                qa=_parse_qa(_require(raw, "qa", list, where), where, categories),
            )
        )
    return samples


def load_locomo(path: str | os.PathLike[str], *, categories: Iterable[int] = SCORED_CATEGORIES) -> list[LocomoSample]:
    """Load a LoCoMo-format JSON file; keep QA items of ``categories`` (default 1-4).

    Raises:
        FileNotFoundError: the path does not exist (LoCoMo is not shipped: pass your own copy).
        LocomoFormatError: invalid JSON or structure, naming the sample and field.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"LoCoMo file not found: {os.fspath(path)!r}. LoCoMo (CC BY-NC) is not distributed with "
            "peft_deltamem; download locomo10.json yourself and pass its path."
        ) from None
    except json.JSONDecodeError as exc:
        raise LocomoFormatError(f"{os.fspath(path)}: not valid JSON ({exc})") from exc
    return parse_locomo(data, categories=categories)


__all__ = [
    "CATEGORY_NAMES",
    "SCORED_CATEGORIES",
    "LocomoFormatError",
    "LocomoQA",
    "LocomoSample",
    "LocomoSession",
    "LocomoTurn",
    "load_locomo",
    "parse_locomo",
    "session_to_messages",
]
