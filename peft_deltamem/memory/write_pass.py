"""The write pass: one model call that writes a batch of (right-padded) histories into a memory, computing no logits.

Training (``DeltaMemSFTTrainer``, with gradients) and evaluation (``write_memories``, without) both write through it, so
an adapter is evaluated with exactly the write pass it was trained with.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .._compat import cache_kwargs

if TYPE_CHECKING:
    from .state import MemoryState


def write_pass(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    memory: MemoryState,
    *,
    segment_ids: torch.Tensor | None = None,
    reads: bool = True,
    record_write_gates: bool = False,
    writes: bool = True,
    position_ids: torch.Tensor | None = None,
    cache: Any = None,
) -> None:
    """Write ``input_ids`` (padding, ``attention_mask == 0``, is never written) into ``memory`` in place.

    Args:
        segment_ids: ``[batch, tokens]`` message / sentence ids for segment-write adapters (``-1``: not written).
        reads: ``False`` for a write-only pass: the layers write but add no corrections (the CPU recipe's
            ``write_pass_reads: false``).
        record_write_gates: keep the call's write gates on the memory (``memory.take_write_gates()``).
        writes: ``False`` for read-only context: tokens that the written tokens of a later call see through ``cache``
            (token writes split over calls, as the server writes a message after its context).
        position_ids: the tokens' positions, for left-padded rows or tokens that follow a cached context.
        cache: a KV cache that the call extends (and so a call with ``use_cache=True``); None: no cache.
    """
    kwargs: dict[str, Any] = {}
    if segment_ids is not None:
        kwargs["memory_segment_ids"] = segment_ids
    if not reads:
        kwargs["memory_read"] = False
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    if cache is not None:
        kwargs.update(cache_kwargs(model, cache))
    model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        memory=memory,
        memory_write=writes,
        memory_record_write_gates=record_write_gates,
        use_cache=cache is not None,
        # An empty index tensor selects no position: the write pass never projects onto the vocabulary.
        logits_to_keep=torch.zeros(0, dtype=torch.long, device=input_ids.device),
        **kwargs,
    )
