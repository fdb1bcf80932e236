"""Multi-session conversational training data (``deltamem data --multi-session``), and held-out conversations in
LoCoMo's JSON for ``deltamem eval locomo``.

The conversations come from :func:`peft_deltamem.evaluation.multisession.make_conversations`. Training rows are
TRL conversational records, one per question: every session of the conversation, rendered the way the LoCoMo
harness renders them (:meth:`~peft_deltamem.evaluation.locomo.LocomoSample.history_messages`: ``"Speaker: text"``,
speaker A as ``user`` and speaker B as ``assistant``, each session's date before its first turn), then the question
as a ``user`` turn and the gold answer as the final ``assistant`` turn. With the recipes' ``recent_messages: 1`` the
read context is the question alone and the sessions are written into memory: the memory-only protocol.

One difference from evaluation remains: training writes all sessions in one write pass (the trainer takes one
history per episode), while ``deltamem eval locomo`` writes each session by its own call, as LoCoMo is evaluated.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._io import write_text_atomic
from ..evaluation.locomo import parse_locomo
from ..evaluation.multisession import make_conversations
from ..evaluation.report import write_jsonl

FORMATS = ("jsonl", "locomo")
"""Output formats: training rows as JSON Lines, or LoCoMo's JSON (a list of samples) for ``deltamem eval locomo``."""


def training_rows(samples: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One ``{"messages", "answer", "category", "id"}`` row per question of LoCoMo-format ``samples``."""
    rows = []
    for sample in parse_locomo(list(samples)):
        history = sample.history_messages()
        for j, qa in enumerate(sample.qa):
            messages = [*history, {"role": "user", "content": qa.question}, {"role": "assistant", "content": qa.answer}]
            rows.append(
                {"messages": messages, "answer": qa.answer, "category": qa.category, "id": f"{sample.sample_id}/qa{j}"}
            )
    return rows


def write_multisession(
    path: str | Path,
    n: int,
    *,
    seed: int = 0,
    split: str = "train",
    sessions: int = 4,
    open_values: bool = False,
    fmt: str = "jsonl",
) -> int:
    """Write ``n`` conversations to ``path`` (atomically) as training rows (``fmt="jsonl"``) or LoCoMo JSON
    (``"locomo"``); returns the number of records written (rows, or conversations)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {fmt!r}")
    samples = make_conversations(n, seed=seed, split=split, sessions=sessions, open_values=open_values)
    path = Path(path)
    if fmt == "locomo":
        write_text_atomic(path, json.dumps(samples, indent=1, ensure_ascii=False) + "\n")
        return len(samples)
    return write_jsonl(training_rows(samples), path)


__all__ = ["FORMATS", "training_rows", "write_multisession"]
