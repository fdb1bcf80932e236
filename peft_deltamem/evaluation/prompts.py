"""The prompts each system sees: rendered as training renders them, the full history cut to fit the context."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..chat.templates import render_ids
from .retrieval import bm25_top_k
from .settings import EvalSettings
from .tasks import MemoryTask, Message, Question


def render_prompt(tokenizer: Any, messages: Sequence[Message], template_kwargs: Mapping[str, Any]) -> list[int]:
    """Token ids of ``messages`` rendered with the chat template and its generation prompt (as training renders)."""
    return render_ids(tokenizer, messages, template_kwargs, add_generation_prompt=True)[1]


def system_prefix(system: str | None) -> list[Message]:
    return [{"role": "system", "content": system}] if system is not None else []


def fit_history(
    tokenizer: Any,
    system: str | None,
    history: Sequence[Message],
    question: Message,
    budget: int,
    template_kwargs: Mapping[str, Any],
) -> tuple[list[int], int]:
    """The longest suffix of ``history`` whose prompt fits in ``budget`` tokens: (prompt ids, turns kept).

    Binary search over the first kept turn (prompt length only grows with more turns), so long conversations cost
    O(log n) renderings instead of n.
    """

    def ids(start: int) -> list[int]:
        return render_prompt(tokenizer, [*system_prefix(system), *history[start:], question], template_kwargs)

    full = ids(0)
    if len(full) <= budget:
        return full, len(history)
    lo, hi = 1, len(history)  # hi: no history at all always "fits" (or is the best we can do)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(ids(mid)) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return ids(lo), len(history) - lo


def prompt_messages(
    system_name: str, task: MemoryTask, question: Question, settings: EvalSettings, tokenizer: Any, budget: int
) -> tuple[list[Message], list[int], int]:
    """(prompt messages, prompt ids, history turns in the prompt) of one question for one system."""
    conv = task.conversations[question.conversation]
    ask = {"role": "user", "content": question.question}
    kwargs = settings.chat_template_kwargs
    if system_name == "full_history":
        history = conv.history()
        ids, kept = fit_history(tokenizer, conv.system, history, ask, budget, kwargs)
        return [*system_prefix(conv.system), *history[len(history) - kept :], ask], ids, kept
    if system_name == "bm25":
        turns = bm25_top_k(conv.history(), question.question, settings.bm25_k)
        messages = [*system_prefix(conv.system), *turns, ask]
        return messages, render_prompt(tokenizer, messages, kwargs), len(turns)
    messages = [*system_prefix(conv.system), ask]
    return messages, render_prompt(tokenizer, messages, kwargs), 0


def context_budget(model: Any, settings: EvalSettings) -> int:
    if settings.max_context_tokens is not None:
        return settings.max_context_tokens
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 2048
    return int(limit) - settings.max_new_tokens
