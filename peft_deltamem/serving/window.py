"""The prompt window and the memory writes it implies (docs/design.md §8), shared by ``MemorySession`` and the server.

A reply's prompt is the system message(s) + the last ``keep_last`` non-system messages + the new turn. Every
non-system message that has left that window is in the memory, written once, in order. Which messages are written
together (one *write group*, rendered alone with the chat template as one model call) is a function of the
conversation only, never of the order requests arrived in:

* each user message at position ``i`` of the non-system messages (the new turn included) defines a *cut*
  ``max(0, i - keep_last)``: when a prompt is built for that user message, everything before the cut has left the
  window;
* the messages between two successive cuts form one write group.

So a chat driven turn by turn (``MemorySession.reply``) and the same conversation sent in full with every request (an
OpenAI client talking to ``deltamem serve``) write the same groups: with ``keep_last = 0`` each group is a user message
and its answer, written right after the answer.

:func:`plan_window` computes the prompt and the groups; :func:`group_hashes` chains the groups' hashes (the
transcript hash chain of the session store); :func:`common_prefix` says how many written groups a new conversation
keeps (the memory rewinds to the snapshot after them); :func:`write_messages` writes one group into a memory.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..chat.segments import NOT_WRITTEN, encode_conversation
from ..chat.templates import common_prefix  # on two hash chains: how many written groups a conversation keeps
from ..model import active_deltamem_adapter

__all__ = [
    "SYSTEM_ROLES",
    "WindowPlan",
    "common_prefix",
    "gate_stats",
    "group_hashes",
    "merge_stats",
    "plan_window",
    "write_cuts",
    "write_messages",
    "written_runs",
]

SYSTEM_ROLES = frozenset({"system"})
"""Roles that are part of every prompt and never written."""

Message = dict[str, Any]


@dataclass(frozen=True)
class WindowPlan:
    """What one reply needs: the prompt's parts and the write groups of everything that has left the window.

    Attributes:
        system: the system messages (every prompt starts with them; never written).
        groups: the write groups, in order: every non-system message before the window, each exactly once.
        window: the last ``keep_last`` non-system messages before the new turn (in the prompt, not in the memory).
        turn: the new turn (the messages after the last cut that are not in the window: the final user message).
    """

    system: list[Message]
    groups: list[list[Message]]
    window: list[Message]
    turn: list[Message] = field(default_factory=list)

    @property
    def prompt(self) -> list[Message]:
        """The prompt's messages: system + window + new turn."""
        return [*self.system, *self.window, *self.turn]

    @property
    def written(self) -> list[Message]:
        """Every message the memory holds when the reply is generated, in order."""
        return [m for group in self.groups for m in group]


def write_cuts(roles: Sequence[str], keep_last: int) -> list[int]:
    """The cut positions of a non-system conversation whose last message is the new turn (see the module doc).

    ``roles`` are the non-system messages' roles, the new turn included; the result is non-decreasing, one cut per
    user message, the new turn's cut (``len(roles) - 1 - keep_last``, at least 0) last.
    """
    if keep_last < 0:
        raise ValueError(f"keep_last must be >= 0, got {keep_last}")
    cuts = [max(0, i - keep_last) for i, role in enumerate(roles) if role == "user"]
    last = max(0, len(roles) - 1 - keep_last)
    if not cuts or cuts[-1] != last:
        cuts.append(last)
    return cuts


def plan_window(messages: Sequence[Mapping[str, Any]], keep_last: int) -> WindowPlan:
    """Split a conversation whose last message is the new turn into system, write groups, window and turn."""
    system = [dict(m) for m in messages if m["role"] in SYSTEM_ROLES]
    rest = [dict(m) for m in messages if m["role"] not in SYSTEM_ROLES]
    if not rest:
        return WindowPlan(system=system, groups=[], window=[], turn=[])
    cuts = write_cuts([m["role"] for m in rest], keep_last)
    groups, start = [], 0
    for cut in cuts:
        if cut > start:
            groups.append(rest[start:cut])
            start = cut
    return WindowPlan(system=system, groups=groups, window=rest[start:-1], turn=rest[-1:])


def _canonical(message: Mapping[str, Any]) -> str:
    return json.dumps(dict(message), sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


def group_hashes(groups: Sequence[Sequence[Mapping[str, Any]]], previous: str = "") -> list[str]:
    """The hash chain of write groups: each hash covers the previous hash and the group's messages (SHA-256 hex)."""
    out = []
    for group in groups:
        digest = hashlib.sha256(previous.encode())
        digest.update(b"\x00" + json.dumps([_canonical(m) for m in group]).encode())
        previous = digest.hexdigest()
        out.append(previous)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Writing one group
# ----------------------------------------------------------------------------------------------------------------


def gate_stats(write_gates: Mapping[str, tuple[torch.Tensor, torch.Tensor]], heads: int) -> dict[str, dict]:
    """Per layer: number of writes, and sum / count / max of the write gates β over the written steps."""
    stats = {}
    for layer, (beta, written) in write_gates.items():
        beta, written = beta.detach().float(), written.detach().bool()  # [B·n, steps, g], [B·n, steps]
        chosen = beta[written]  # [writes·n, g]
        stats[layer] = {
            "writes": int(written.sum().item()) // max(heads, 1),
            "beta_sum": float(chosen.sum().item()),
            "beta_count": int(chosen.numel()),
            "beta_max": float(chosen.max().item()) if chosen.numel() else 0.0,
        }
    return stats


def merge_stats(total: dict[str, dict], new: Mapping[str, dict]) -> None:
    """Add the statistics ``new`` (from :func:`gate_stats`) into ``total``, in place."""
    for layer, s in new.items():
        t = total.setdefault(layer, {"writes": 0, "beta_sum": 0.0, "beta_count": 0, "beta_max": 0.0})
        t["writes"] += s["writes"]
        t["beta_sum"] += s["beta_sum"]
        t["beta_count"] += s["beta_count"]
        t["beta_max"] = max(t["beta_max"], s["beta_max"])


def write_messages(
    model: Any,
    tokenizer: Any,
    memory: Any,
    messages: Sequence[Mapping[str, Any]],
    *,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> tuple[dict[str, dict], int]:
    """Write one group of messages into ``memory`` (one row): rendered alone with the chat template, one model call.

    Tokens the template attributes to no message (a bos token, a default system prompt, system messages) are context
    only: read, never written. ``token`` adapters feed them in separate read-only calls sharing a KV cache with the
    written ones (exact, by the continuity of token writes); ``message`` / ``sentence`` adapters get
    ``memory_segment_ids``. Returns the write-gate statistics (:func:`gate_stats`) and the number of tokens written.
    """
    active = active_deltamem_adapter(model)
    if active is None:
        raise TypeError(
            f"write_messages needs a PeftModel whose active adapter is a δ-mem adapter, got {type(model).__name__}"
        )
    config = active[1]
    seg = encode_conversation(
        tokenizer,
        list(messages),
        chat_template_kwargs=dict(chat_template_kwargs or {}),
        write_roles=config.write_roles,
    )
    written_tokens = sum(m != NOT_WRITTEN for m in seg.message_ids)
    if written_tokens == 0:
        return {}, 0
    device = next(model.parameters()).device
    ids = torch.tensor([seg.input_ids], device=device)
    heads = config.num_state_heads
    stats: dict[str, dict] = {}
    with torch.no_grad():
        if config.write_granularity == "token":
            _write_token_runs(model, memory, ids, seg.message_ids, stats, heads)
        else:
            segment_ids = torch.tensor([seg.segment_ids(config.write_granularity)], device=device)
            model(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                memory=memory,
                memory_write=True,
                memory_segment_ids=segment_ids,
                memory_record_write_gates=True,
                use_cache=False,
            )
            merge_stats(stats, gate_stats(memory.take_write_gates(), heads))
    return stats, written_tokens


def written_runs(message_ids: Sequence[int]) -> list[tuple[bool, int]]:
    """The runs of a token write: ``(written, length)`` in order; ``NOT_WRITTEN`` tokens are read-only context.

    A trailing read-only run is dropped (it influences nothing that is written). Every engine writes a group by
    these runs (:func:`write_messages` here, a history write with unwritten ranges on vLLM).
    """
    runs = [(flag, len(list(group))) for flag, group in itertools.groupby(m != NOT_WRITTEN for m in message_ids)]
    while runs and not runs[-1][0]:
        runs.pop()
    return runs


def _write_token_runs(
    model: Any, memory: Any, ids: torch.Tensor, message_ids: list[int], stats: dict, heads: int
) -> None:
    """Token writes of the tokens that belong to a message; the others are read-only context.

    Runs of written / unwritten tokens go through the model in turn, sharing a KV cache, so every token sees the
    same context as in one call (continuity of token writes, docs/design.md §3).
    """
    from transformers import DynamicCache

    from .._compat import cache_kwargs

    runs = written_runs(message_ids)
    cache = DynamicCache(config=model.config) if len(runs) > 1 else None
    start = 0
    for written, length in runs:
        end = start + length
        model(
            input_ids=ids[:, start:end],
            attention_mask=torch.ones(1, end, dtype=ids.dtype, device=ids.device),
            use_cache=cache is not None,
            **cache_kwargs(model, cache),
            memory=memory,
            memory_write=written,
            memory_record_write_gates=written,
        )
        if written:
            merge_stats(stats, gate_stats(memory.take_write_gates(), heads))
        start = end
