"""Rendering chat messages to token ids: the one place that turns messages into a prompt the way training does."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def render_ids(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    template_kwargs: Mapping[str, Any] | None = None,
    *,
    add_generation_prompt: bool = False,
) -> tuple[str, list[int]]:
    """``(text, token ids)`` of ``messages`` rendered with the chat template, then tokenised without special tokens.

    Rendering to text first and tokenising that text (instead of ``apply_chat_template(tokenize=True)``) is what the
    training episodes, the evaluation prompts and the session prompts all do, so the three see the same tokens.
    """
    text = tokenizer.apply_chat_template(
        [dict(m) for m in messages],
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        **(template_kwargs or {}),
    )
    return text, list(tokenizer(text, add_special_tokens=False)["input_ids"])


def common_prefix(a: Sequence[Any], b: Sequence[Any]) -> int:
    """How many leading items ``a`` and ``b`` share: where an answer's tokens start after its rendered prompt, or how
    many written message groups two transcript hash chains share (the point a session's memory rewinds to)."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
