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

from .._padding import pad_rows
from ..chat.segments import NOT_WRITTEN
from .episodes import IGNORE_INDEX


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
            "input_ids": pad_rows([e["input_ids"] for e in examples], self.pad_token_id, multiple=multiple),
            "attention_mask": pad_rows([[1] * len(e["input_ids"]) for e in examples], 0, multiple=multiple),
            "labels": pad_rows([e["labels"] for e in examples], IGNORE_INDEX, multiple=multiple),
        }
        writes = [e["write_input_ids"] for e in examples]
        batch["write_input_ids"] = pad_rows(writes, self.pad_token_id, multiple=multiple, minimum=1)
        batch["write_attention_mask"] = pad_rows([[1] * len(w) for w in writes], 0, multiple=multiple, minimum=1)
        if "write_segment_ids" in examples[0]:
            segments = [e["write_segment_ids"] for e in examples]
            batch["write_segment_ids"] = pad_rows(segments, NOT_WRITTEN, multiple=multiple, minimum=1)
        return batch


__all__ = ["DeltaMemEpisodeCollator"]
