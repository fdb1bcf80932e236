"""Summaries of a system's answers: the primary metric with bootstrap intervals, per group, and the diagnostics."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .metrics import bootstrap_ci
from .settings import EvalSettings
from .tasks import MemoryTask, Question


def primary_metric(task: MemoryTask, settings: EvalSettings) -> str:
    """What ``accuracy`` means for a task: LoCoMo F1, the share of answers that follow every preference (working
    style), forced choice for closed sets, else exact match."""
    if task.scoring == "locomo":
        return "f1"
    if task.scoring == "style":
        return "followed"
    if settings.forced_choice and task.questions and all(q.choices for q in task.questions):
        return "forced_choice"
    return "exact_match"


def interval(values: Sequence[float], settings: EvalSettings) -> tuple[float, list[float]]:
    mean, lo, hi = bootstrap_ci(values, n_resamples=settings.n_resamples, seed=settings.seed)
    return mean, [lo, hi]


def summarize_records(records: Sequence[Mapping[str, Any]], metric: str, settings: EvalSettings) -> dict[str, Any]:
    """Per-system summary: ``accuracy`` (the primary metric) with ``accuracy_ci``, every metric with its ``_ci``,
    the mean gold log-probability, per-group accuracy and, for working-style tasks, ``by_preference``: how often each
    kind of preference was followed."""
    summary: dict[str, Any] = {"n": len(records), "metric": metric}
    for name in ("accuracy", "exact_match", "contains_match", "forced_choice", "f1", "followed"):
        key = metric if name == "accuracy" else name
        values = [r[key] for r in records if r.get(key) is not None]
        if values:
            summary[name], summary[f"{name}_ci"] = interval(values, settings)
    gold = [r["gold_logprob"] for r in records if r.get("gold_logprob") is not None]
    if gold:
        summary["gold_logprob"] = float(np.mean(gold))
    groups: dict[str, list[float]] = {}
    for r in records:
        if r.get(metric) is not None:
            groups.setdefault(r["group"], []).append(r[metric])
    if len(groups) > 1:
        summary["by_group"] = {}
        for g, values in sorted(groups.items()):
            mean, ci = interval(values, settings)
            summary["by_group"][g] = {"n": len(values), "accuracy": mean, "accuracy_ci": ci}
    kinds: dict[str, list[float]] = {}
    for r in records:
        for key, value in r.items():
            if key.startswith("followed_"):
                kinds.setdefault(key.removeprefix("followed_"), []).append(value)
    if kinds:
        summary["by_preference"] = {}
        for kind, values in sorted(kinds.items()):
            mean, ci = interval(values, settings)
            summary["by_preference"][kind] = {"n": len(values), "accuracy": mean, "accuracy_ci": ci}
    return summary


def diagnostics(per_system: Mapping[str, list[dict]], task: MemoryTask, settings: EvalSettings) -> dict[str, Any]:
    out: dict[str, Any] = {}
    own, other = per_system.get("deltamem"), per_system.get("deltamem_other_memory")
    if own and other:
        gaps = [
            a["gold_logprob"] - b["gold_logprob"]
            for a, b in zip(own, other, strict=True)
            if a.get("gold_logprob") is not None and b.get("gold_logprob") is not None
        ]
        if gaps:
            mean, ci = interval(gaps, settings)
            # > 0: the reference answer is likelier under the conversation's own memory than under another one's,
            # i.e. the adapter reads content from memory (not just the answer format).
            out["own_minus_other_gold_logprob"] = {"mean": mean, "ci": ci, "n": len(gaps)}
    follows = follows_source(other or [], task)
    if follows:
        mean, ci = interval(follows, settings)
        # How often the other-memory control answers with the value stored in the memory it read (when that
        # conversation has a question with the same answer set and another answer): high = content read from memory.
        out["other_memory_answers_source_value"] = {"mean": mean, "ci": ci, "n": len(follows)}
    closed = [q for q in task.questions if q.choices]
    if closed:
        out["chance"] = float(np.mean([1.0 / len(q.choices) for q in closed]))
    return out


def follows_source(records: Sequence[Mapping[str, Any]], task: MemoryTask) -> list[float]:
    by_conversation: dict[str, list[Question]] = {}
    for q in task.questions:
        by_conversation.setdefault(task.conversations[q.conversation].id, []).append(q)
    hits = []
    for record in records:
        if record.get("choice") is None or record.get("memory_of") is None:
            continue
        own = next(q for q in task.questions if q.id == record["id"])
        source = next((q for q in by_conversation.get(record["memory_of"], []) if q.choices == own.choices), None)
        if source is not None and source.answer != own.answer:
            hits.append(float(record["choice"] == source.answer))
    return hits
