"""Padding rows of token ids into a batch: the one helper the collator, the evaluation and the write pass share."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_rows(
    rows: Sequence[Sequence[int]],
    value: int,
    *,
    left: bool = False,
    multiple: int | None = None,
    minimum: int = 0,
) -> torch.Tensor:
    """A ``[len(rows), width]`` long tensor of ``rows`` padded with ``value`` (on the right, or on the ``left``).

    ``width`` is the longest row, at least ``minimum``, rounded up to a ``multiple`` if one is given.
    """
    width = max([len(row) for row in rows] + [minimum])
    if multiple:
        width = -(-width // multiple) * multiple
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if len(row):
            where = slice(width - len(row), None) if left else slice(0, len(row))
            out[i, where] = torch.as_tensor(row, dtype=torch.long)
    return out


def pad_batch(
    rows: Sequence[Sequence[int]], pad_id: int, device: torch.device | str, *, left: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of ``rows`` padded with ``pad_id`` (right, or ``left``), on ``device``."""
    ids = pad_rows(rows, pad_id, left=left)
    mask = pad_rows([[1] * len(row) for row in rows], 0, left=left)
    return ids.to(device), mask.to(device)


def pad_token_id(tokenizer) -> int:
    """The tokenizer's padding id: its pad token, else its end-of-sequence token, else 0."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad if pad is not None else 0)
