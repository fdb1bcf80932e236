"""The conversations' memories: written with the training write pass, paired for the other-memory control."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch

from .._padding import pad_batch, pad_token_id
from ..chat.segments import NOT_WRITTEN
from ..memory.state import MemoryState
from ..memory.write_pass import write_pass
from ..model import active_deltamem_adapter
from ..training.episodes import EpisodeOptions, encode_write_history
from ._batching import batches, model_device, progress
from .prompts import system_prefix
from .settings import BASE_SYSTEMS, EvalSettings
from .tasks import MemoryTask, Message, Question


def zero_memory(memory: MemoryState) -> MemoryState:
    """A memory of the same layout and rows with every state zero (what a fresh memory reads)."""
    return memory.detach().zeros_like()


def _session_ids(tokenizer: Any, system: str | None, session: Sequence[Message], settings: EvalSettings, config: Any):
    """A session's write tokens and segment ids exactly as training encodes a write history for this adapter."""
    options = EpisodeOptions(
        max_write_length=settings.max_write_length,
        write_granularity=config.write_granularity,
        write_roles=config.write_roles,
        chat_template_kwargs=settings.chat_template_kwargs,
    )
    return encode_write_history(tokenizer, [*system_prefix(system), *session], options)


def needed_conversations(task: MemoryTask, systems: Sequence[str], other_seed: int = 0) -> list[int]:
    """The conversations whose memories ``systems`` read for ``task``'s questions, in order.

    Each question's own conversation, plus, with ``deltamem_other_memory``, the conversation whose memory it reads
    (:func:`other_memory_pairing` over *all* the task's conversations, so selecting questions never changes which
    memory a question reads). With a subset of a benchmark's questions (``--max-questions``) only these need writing.
    """
    own = {q.conversation for q in task.questions}
    needed = set(own)
    if "deltamem_other_memory" in systems and len(task.conversations) >= 2:
        pairing = other_memory_pairing(len(task.conversations), other_seed)
        needed |= {pairing[c] for c in own}
    return sorted(needed)


@torch.no_grad()
def write_memories(
    model: Any, tokenizer: Any, task: MemoryTask, settings: EvalSettings, conversations: Sequence[int] | None = None
) -> MemoryState:
    """Write every conversation's sessions into its own fresh memory; returns one memory row per conversation.

    Sessions are written in order, one model call per session (positions restart at 0, no KV cache between
    sessions), batching the same session index across conversations. Right padding: padded tokens are never written.
    With ``conversations`` (indices, e.g. :func:`needed_conversations`) only those are written; the rows of the
    others stay empty (all-zero) memories, so the result keeps one row per conversation of the task.
    """
    config = active_deltamem_adapter(model)[1]
    device, pad = model_device(model), pad_token_id(tokenizer)
    memories: list[MemoryState | None] = [None] * len(task.conversations)
    chosen = set(range(len(task.conversations)) if conversations is None else conversations)
    max_sessions = max((len(c.sessions) for c in task.conversations), default=0)
    jobs = []
    for s in range(max_sessions):
        rows = [
            c
            for c, conv in enumerate(task.conversations)
            if c in chosen and len(conv.sessions) > s and conv.sessions[s]
        ]
        jobs += [(s, [rows[i] for i in batch]) for batch in batches(len(rows), settings.batch_size)]
    for s, rows in progress(jobs, "write memories", settings.progress):
        encoded = [
            _session_ids(tokenizer, task.conversations[c].system, task.conversations[c].sessions[s], settings, config)
            for c in rows
        ]
        ids, mask = pad_batch([e[0] for e in encoded], pad, device)
        segments = None
        if encoded[0][1] is not None:  # segment writes, or token writes of some roles only
            segments, _ = pad_batch([e[1] for e in encoded], NOT_WRITTEN, device)
            segments = segments.masked_fill(mask == 0, NOT_WRITTEN)
        fresh = all(memories[c] is None for c in rows)
        if not fresh:  # a conversation whose earlier sessions were empty starts from a zero memory
            template = next(m for m in memories if m is not None)
            for c in rows:
                memories[c] = memories[c] if memories[c] is not None else empty_like(template)
        memory = MemoryState() if fresh else MemoryState.cat([memories[c] for c in rows])
        write_pass(model, ids, mask, memory, segment_ids=segments, reads=settings.write_pass_reads)
        for i, c in enumerate(rows):
            memories[c] = memory[i]
    if any(m is None for m in memories):  # conversations with no history at all read an empty memory
        template = next((m for m in memories if m is not None), None)
        if template is None:
            raise ValueError("no conversation has any history to write into memory")
        memories = [m if m is not None else empty_like(template) for m in memories]
    return MemoryState.cat(memories)


def empty_like(memory: MemoryState) -> MemoryState:
    return zero_memory(memory[0])


def other_memory_pairing(n: int, seed: int = 0) -> list[int]:
    """``pairing[c]``: whose memory conversation ``c`` reads in ``deltamem_other_memory``.

    A uniformly random cyclic permutation (Sattolo's algorithm), so no conversation gets its own memory, and,
    unlike a fixed shift, the pairing is independent of how the benchmark orders its answers (the ladder balances
    answers in blocks, so neighbours never share one: a shift by one would make a perfect memory score 0 on this
    control instead of chance).
    """
    order = list(range(n))
    rng = random.Random(f"other-memory/{seed}")
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)  # j < i: every element moves, the result is one cycle
        order[i], order[j] = order[j], order[i]
    return order


def memory_rows(
    system_name: str, questions: Sequence[Question], memories: MemoryState | None, pairing: Sequence[int]
) -> MemoryState | None:
    if system_name in BASE_SYSTEMS:
        return None
    if system_name == "deltamem_other_memory":
        rows = [pairing[q.conversation] for q in questions]
    else:
        rows = [q.conversation for q in questions]
    selected = memories[torch.tensor(rows, dtype=torch.long)]
    return zero_memory(selected) if system_name == "deltamem_empty_memory" else selected
