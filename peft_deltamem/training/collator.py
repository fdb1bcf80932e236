"""Batching episodes: the write history and the read context, each right-padded with its own attention mask.

Right padding keeps the read context's positions starting at 0 in every row, and padded tokens are never written
to memory (the layers take token validity from the attention mask). Every batch carries a write history, at least
one token long, even when no episode has one: the write pass then runs on padding only and leaves the memory empty,
but every process still runs the same two forwards, which DDP, FSDP and DeepSpeed need.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .episodes import IGNORE_INDEX

NOT_WRITTEN = -1


def _pad(rows: Sequence[Sequence[int]], value: int, multiple: int | None, minimum: int = 0) -> torch.Tensor:
    length = max([len(row) for row in rows] + [minimum])
    if multiple:
        length = -(-length // multiple) * multiple
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


@dataclass
class DeltaMemEpisodeCollator:
    """Collate episode rows (``write_input_ids``, optional ``write_segment_ids``, ``input_ids``, ``labels``).

    Returns ``input_ids``, ``attention_mask``, ``labels`` for the read pass and ``write_input_ids``,
    ``write_attention_mask`` (and ``write_segment_ids``, ``-1`` on padding) for the write pass.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Pad a list of episode rows into a batch."""
        multiple = self.pad_to_multiple_of
        batch = {
            "input_ids": _pad([e["input_ids"] for e in examples], self.pad_token_id, multiple),
            "attention_mask": _pad([[1] * len(e["input_ids"]) for e in examples], 0, multiple),
            "labels": _pad([e["labels"] for e in examples], IGNORE_INDEX, multiple),
        }
        writes = [e["write_input_ids"] for e in examples]
        batch["write_input_ids"] = _pad(writes, self.pad_token_id, multiple, minimum=1)
        batch["write_attention_mask"] = _pad([[1] * len(w) for w in writes], 0, multiple, minimum=1)
        if "write_segment_ids" in examples[0]:
            segments = [e["write_segment_ids"] for e in examples]
            batch["write_segment_ids"] = _pad(segments, NOT_WRITTEN, multiple, minimum=1)
        return batch


__all__ = ["DeltaMemEpisodeCollator"]
