"""Writing the message groups of several sessions in one forward: their memories as the rows of one ``MemoryState``.

:func:`~peft_deltamem.serving.window.write_messages` writes one group into one memory. When requests of different
sessions arrive together, :func:`write_groups` writes one group per session in one batched model call and gives each
memory what writing it alone gives (the same tokens written, the same context read; within float rounding):

* ``message`` / ``sentence`` adapters: one call, rows right-padded; padding is masked and its segment id is
  ``NOT_WRITTEN``, as the template-only tokens already are.
* ``token`` adapters: a group rendered alone is [context the template adds (a bos token, a default system prompt),
  read only] + [the messages, written]. The contexts go first in one read-only call, left-padded so that every row's
  messages start right after its own context, sharing a KV cache with a second call that writes the messages,
  right-padded. A row whose tokens do not have that shape is written alone (:func:`write_messages`).

Position ids follow each row's own tokens, so padding shifts nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .._padding import pad_rows
from ..chat.segments import NOT_WRITTEN, encode_conversation
from ..memory.state import MemoryState
from ..memory.write_pass import write_pass
from ..model import active_deltamem_adapter
from .window import write_messages, written_runs

__all__ = ["write_groups"]


@dataclass
class _Row:
    """One session's group, encoded: its token ids, how many lead the row as read-only context, its segment ids."""

    ids: list[int]
    context: int
    segments: list[int]
    written: int


def _encode(tokenizer: Any, group: Sequence[Mapping[str, Any]], config: Any, kwargs: dict) -> _Row | None:
    """The row of ``group``, or None if it cannot share a batch (its written tokens are not one run after a context)."""
    granularity = config.write_granularity
    seg = encode_conversation(
        tokenizer, [dict(m) for m in group], chat_template_kwargs=kwargs, write_roles=config.write_roles
    )
    written = sum(m != NOT_WRITTEN for m in seg.message_ids)
    if granularity != "token":
        return _Row(list(seg.input_ids), 0, seg.segment_ids(granularity), written)
    runs = written_runs(seg.message_ids)  # the runs write_messages writes one by one
    if [flag for flag, _ in runs] not in ([True], [False, True]):
        return None
    end = sum(length for _, length in runs)
    context = runs[0][1] if not runs[0][0] else 0
    return _Row(list(seg.input_ids[:end]), context, [], written)


def write_groups(
    model: Any,
    tokenizer: Any,
    memories: Sequence[MemoryState],
    groups: Sequence[Sequence[Mapping[str, Any]]],
    *,
    pad_id: int,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> list[tuple[MemoryState, int]]:
    """Write ``groups[i]`` into a copy of ``memories[i]`` (one row each), batched; ``(memory, tokens written)`` each.

    The memories must belong to the model's active δ-mem adapter and be sized (``MemoryState.cat`` stacks them);
    ``pad_id`` pads the rows (it is never written or attended to).
    """
    if len(memories) != len(groups):
        raise ValueError(f"write_groups: {len(memories)} memories for {len(groups)} groups; give one memory per group.")
    active = active_deltamem_adapter(model)
    if active is None:
        raise TypeError(f"write_groups needs a PeftModel whose active adapter is δ-mem, got {type(model).__name__}")
    granularity = active[1].write_granularity
    kwargs = dict(chat_template_kwargs or {})
    rows = [_encode(tokenizer, group, active[1], kwargs) for group in groups]
    out: list[tuple[MemoryState, int] | None] = [None] * len(groups)
    batch = [i for i, row in enumerate(rows) if row is not None and row.written > 0]
    if len(batch) == 1:  # nothing to share the call with: the reference path, bit for bit what MemorySession writes
        rows[batch.pop()] = None
    for i, row in enumerate(rows):
        if row is None:  # alone (also a template whose tokens are not context + messages), as MemorySession writes
            memory = memories[i].clone()
            out[i] = (memory, write_messages(model, tokenizer, memory, groups[i], chat_template_kwargs=kwargs)[1])
        elif row.written == 0:
            out[i] = (memories[i].clone(), 0)
    if batch:
        memory = MemoryState.cat([memories[i] for i in batch]).clone()
        chosen = [rows[i] for i in batch]
        with torch.no_grad():
            if granularity == "token":
                _token_writes(model, memory, chosen, pad_id)
            else:
                _segment_writes(model, memory, chosen, pad_id)
        for j, i in enumerate(batch):
            out[i] = (memory[j].clone(), chosen[j].written)  # its own storage, not a view of the batch
    return out  # type: ignore[return-value]


def _segment_writes(model: Any, memory: MemoryState, rows: list[_Row], pad_id: int) -> None:
    device = next(model.parameters()).device
    ids = pad_rows([r.ids for r in rows], pad_id).to(device)
    mask = pad_rows([[1] * len(r.ids) for r in rows], 0).to(device)
    segments = pad_rows([r.segments for r in rows], NOT_WRITTEN).to(device)
    write_pass(model, ids, mask, memory, segment_ids=segments)


def _token_writes(model: Any, memory: MemoryState, rows: list[_Row], pad_id: int) -> None:
    from transformers import DynamicCache

    device = next(model.parameters()).device
    contexts = [r.ids[: r.context] for r in rows]
    messages = [r.ids[r.context :] for r in rows]
    width = max(len(c) for c in contexts)
    cache, mask = None, torch.zeros(len(rows), 0, dtype=torch.long, device=device)
    if width:  # the contexts, read only, left-padded: each row's messages follow its own context
        cache = DynamicCache(config=model.config)
        mask = pad_rows([[1] * len(c) for c in contexts], 0, left=True).to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        context_ids = pad_rows(contexts, pad_id, left=True).to(device)
        write_pass(model, context_ids, mask, memory, writes=False, position_ids=positions, cache=cache)
    written = pad_rows([[1] * len(m) for m in messages], 0).to(device)
    starts = torch.tensor([len(c) for c in contexts], device=device).unsqueeze(1)
    write_pass(
        model,
        pad_rows(messages, pad_id).to(device),
        torch.cat([mask, written], dim=1),
        memory,
        position_ids=starts + torch.arange(written.shape[1], device=device),
        cache=cache,
    )
