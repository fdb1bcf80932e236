"""Recall conversations for training tests: the answer (a one-token code) is only in the history."""

from __future__ import annotations

import random

CODES = list("KMPRTVXZ")  # a closed answer set; each is one token


def recall_conversations(n: int, seed: int) -> list[dict]:
    """The answer (a code) is only in the history: with recent_messages=1 the read context holds just the question."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        code = rng.choice(CODES)
        messages = [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"The code is {code}."},
            {"role": "assistant", "content": "OK."},
            {"role": "user", "content": "What is the code?"},
            {"role": "assistant", "content": code},
        ]
        rows.append({"messages": messages})
    return rows
