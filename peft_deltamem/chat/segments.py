"""Per-token message ids and sentence ids from a tokenizer's chat template (docs/design.md §1 "Write granularity", §5).

The ``message`` and ``sentence`` write granularities write one memory update per segment (the mean of the hidden
states of its tokens), so every token of a tokenised conversation needs the id of the segment it belongs to, with
``-1`` for tokens that must not be written (the system prompt, template preambles, the generation prompt).

How ids are assigned (:func:`encode_conversation`)
--------------------------------------------------

The conversation is rendered with the tokenizer's own chat template incrementally: ``messages[:1]``,
``messages[:2]``, ... (``tokenize=False``), and every rendering is tokenised with ``add_special_tokens=False``. The
tokens that rendering ``i`` adds to rendering ``i - 1`` belong to message ``i``, so the role header, the content and
the end-of-turn marker of a message all carry its index. System messages get ``-1``, wherever they are, and so do
messages whose role is not among ``write_roles`` when it is given (an adapter that writes user turns only).

* **Preamble.** Tokens a template emits before the first message (a bos token, a default system prompt such as
  SmolLM2's "You are a helpful AI assistant named SmolLM...", Llama-3.1's "Cutting Knowledge Date" block, SmolLM3's
  metadata block) are ``-1``. They are found by rendering the first message after a probe system message: the
  tokens it adds there are the message's own block (header included); what precedes that block in the real
  rendering is preamble. If the template rejects a system message or the block cannot be found, the whole first
  rendering is attributed to message 0.
* **Templates that are not prefix-stable.** Rendering ``i`` may not start with rendering ``i - 1`` (Qwen3 drops the
  empty ``<think>`` block of the last assistant turn once a user turn follows; some templates end with a trailer
  that changes with the number of messages). Then the longest common prefix ``p`` of the two token lists is kept,
  and the earlier rendering's tail beyond ``p`` is rolled back. Of that tail, the longest *suffix* that the new
  rendering repeats right after ``p`` is recovered with its old ids (Qwen3: the earlier assistant's content and
  ``<|im_end|>``); the remaining rolled-back tokens are dropped, and everything else the new rendering adds gets
  the new message's id (so a changing trailer always belongs to the newest message). If more than
  ``max_rollback_tokens`` tokens are dropped at one step, :class:`ValueError` is raised: the template rewrites
  earlier messages too much for per-message ids to be meaningful (e.g. Qwen3 removing long ``<think>`` reasoning
  from earlier assistant turns; raise the limit if that is acceptable).
* **Generation prompt.** With ``add_generation_prompt=True`` the tokens of the generation prompt (e.g.
  ``<|im_start|>assistant\\n`` plus Qwen3's ``<think>\\n\\n</think>\\n\\n`` when ``enable_thinking=False``) get
  ``-1``: they belong to no existing message and are not written (the answer that follows is not in ``messages``).
* The returned ``input_ids`` are exactly ``tokenizer(full_rendering, add_special_tokens=False)["input_ids"]``,
  where ``full_rendering`` is ``apply_chat_template(messages, tokenize=False, add_generation_prompt=...)``.
* Written ids never decrease along the sequence (ignoring ``-1``), and each message's tokens are contiguous.

Sentence ids
------------

:func:`split_sentences` splits a message's content into sentences; the character offsets of the final rendering's
tokens (``return_offsets_mapping``, fast tokenizers only) map tokens onto the sentences of their message. A token
belongs to the sentence in which its first non-whitespace character lies; a token before the first sentence (the
role header) belongs to the message's first sentence, and whitespace and trailers (``<|im_end|>``) after a sentence
belong to the sentence before them (so the end marker belongs to the last sentence). Sentence ids are a running
counter over the whole conversation (message 0's sentences are 0, 1, ..., message 1's continue from there), with no
gaps; a message whose content has no sentence (empty content) still gets one id, for its template tokens. Tokens
with message id ``-1`` have sentence id ``-1``.
"""

from __future__ import annotations

import bisect
import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..config import WRITABLE_ROLES, WRITE_GRANULARITIES

__all__ = [
    "GRANULARITIES",
    "NOT_WRITTEN",
    "VALID_ROLES",
    "SegmentedConversation",
    "encode_conversation",
    "segment_ids_for",
    "split_sentences",
    "validate_messages",
]

NOT_WRITTEN = -1  # the message / segment id of a token that is not written (padding, template-only tokens)
"""Segment id of tokens that are never written to memory."""

VALID_ROLES = ("system", "user", "assistant", "tool")
"""Message roles accepted by :func:`encode_conversation`."""

GRANULARITIES = tuple(g for g in WRITE_GRANULARITIES if g != "token")  # the segment writes
"""Segment granularities understood by :meth:`SegmentedConversation.segment_ids`."""

# apply_chat_template arguments that encode_conversation controls itself.
_RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "conversation",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "sanitize_control_tokens",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
    }
)

_PROBE_SYSTEM = {"role": "system", "content": "deltamem segmentation probe"}

# A sentence ends after one of . ! ? ; : plus any closing quotes / brackets, when whitespace follows; a blank line
# (two newlines with only non-newline whitespace between them) always ends one.
_SENTENCE_BOUNDARY = re.compile(r"(?P<end>[.!?;:][\"'”’)\]}]*)(?=\s)|\n[^\S\n]*\n")


@dataclass
class SegmentedConversation:
    """A tokenised conversation with one message id and one sentence id per token.

    Attributes:
        input_ids: the tokens of the full chat-template rendering (``add_special_tokens=False``).
        message_ids: per token, the index in ``messages`` of the message it belongs to, ``-1`` if not written
            (system messages, template preamble, generation prompt).
        sentence_ids: per token, a running sentence counter over the conversation, ``-1`` where ``message_ids`` is.
        text: the full rendering that ``input_ids`` tokenise.
        offsets: per token, its ``(start, end)`` character span in ``text``.
    """

    input_ids: list[int]
    message_ids: list[int]
    sentence_ids: list[int]
    text: str = ""
    offsets: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.input_ids)
        if len(self.message_ids) != n or len(self.sentence_ids) != n or (self.offsets and len(self.offsets) != n):
            raise ValueError(
                f"SegmentedConversation: lengths differ (input_ids {n}, message_ids {len(self.message_ids)}, "
                f"sentence_ids {len(self.sentence_ids)}, offsets {len(self.offsets)})"
            )

    def __len__(self) -> int:
        return len(self.input_ids)

    def segment_ids(self, granularity: str) -> list[int]:
        """The per-token segment ids for a write granularity: ``"message"`` or ``"sentence"``."""
        _check_granularity(granularity)
        return list(self.message_ids if granularity == "message" else self.sentence_ids)


def _check_granularity(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        hint = " (token writes need no segment ids)" if granularity == "token" else ""
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}{hint}")


# ----------------------------------------------------------------------------------------------------------------
# Sentences
# ----------------------------------------------------------------------------------------------------------------


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Split ``text`` into sentences; returns ``(start, end)`` character spans, in order.

    Rule (exact): a sentence ends

    * after one of ``. ! ? ; :`` followed by zero or more closing quotes / brackets (``" ' ” ’ ) ] }``), when the
      next character is whitespace; or
    * at a blank line: two newlines with only non-newline whitespace between them (``"\\n\\n"``, ``"\\r\\n\\r\\n"``).

    Spans exclude the whitespace around sentences (they are stripped), so they never overlap, and empty pieces are
    dropped: whitespace-only text gives ``[]``. Abbreviations split too (``"Mr. Smith"`` is two sentences), while a
    terminator not followed by whitespace does not (``"3.14"``, ``"e.g.,"``, ``"a:b"``).

    >>> split_sentences("Hi. I am Bob!\\n\\nOK")
    [(0, 3), (4, 13), (15, 17)]
    """
    if not isinstance(text, str):
        raise TypeError(f"split_sentences expects a str, got {type(text).__name__}")
    cuts = [0]
    for m in _SENTENCE_BOUNDARY.finditer(text):
        cuts.append(m.end() if m.group("end") is not None else m.start())
    cuts.append(len(text))
    spans: list[tuple[int, int]] = []
    for a, b in itertools.pairwise(cuts):
        while a < b and text[a].isspace():
            a += 1
        while b > a and text[b - 1].isspace():
            b -= 1
        if a < b:
            spans.append((a, b))
    return spans


# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check a conversation and return it as a list of plain dicts (extra keys such as ``tool_calls`` are kept).

    Raises:
        ValueError: ``messages`` is not a non-empty list of dicts, or a message has a ``role`` outside
            :data:`VALID_ROLES` or a ``content`` that is not a string; the message's index is named.
    """
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if len(messages) == 0:
        raise ValueError("messages is empty: nothing to encode")
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(m).__name__}")
        if "role" not in m:
            raise ValueError(f"messages[{i}] has no 'role'")
        if m["role"] not in VALID_ROLES:
            raise ValueError(f"messages[{i}]: role must be one of {VALID_ROLES}, got {m['role']!r}")
        if "content" not in m:
            raise ValueError(f"messages[{i}] ({m['role']}) has no 'content'")
        if not isinstance(m["content"], str):
            raise ValueError(
                f"messages[{i}] ({m['role']}): content must be a str, got {type(m['content']).__name__} "
                "(multimodal / structured content is not supported)"
            )
        out.append(dict(m))
    return out


def _check_tokenizer(tokenizer: Any, kwargs: Mapping[str, Any]) -> None:
    if not callable(getattr(tokenizer, "apply_chat_template", None)):
        raise ValueError(f"expected a transformers tokenizer with apply_chat_template, got {type(tokenizer).__name__}")
    if not getattr(tokenizer, "chat_template", None) and not kwargs.get("chat_template"):
        raise ValueError(
            f"{type(tokenizer).__name__} has no chat template (tokenizer.chat_template is not set), so message ids "
            "cannot be derived; set tokenizer.chat_template or pass chat_template_kwargs={'chat_template': ...}"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} is not a fast tokenizer: character offsets (return_offsets_mapping) are "
            "needed to map tokens to sentences; load it with use_fast=True"
        )


# ----------------------------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------------------------


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class _Renderer:
    def __init__(self, tokenizer: Any, template_kwargs: Mapping[str, Any]):
        self.tokenizer = tokenizer
        self.kwargs = dict(template_kwargs)

    def text(self, conversation: list[dict[str, Any]], *, generation_prompt: bool = False, what: str = "") -> str:
        try:
            out = self.tokenizer.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=generation_prompt, **self.kwargs
            )
        except Exception as e:  # jinja errors, raise_exception() in templates, ...
            raise ValueError(f"the chat template failed to render {what or 'the conversation'}: {e}") from e
        if not isinstance(out, str):
            raise ValueError(f"apply_chat_template(tokenize=False) returned {type(out).__name__}, expected str")
        return out

    def ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _first_labels(
    renderer: _Renderer, first: dict[str, Any], cur: list[int], label: int, max_rollback_tokens: int
) -> list[int]:
    """Ids for the rendering of ``messages[:1]``: ``label`` for the first message's own block, -1 before it."""
    if label == NOT_WRITTEN:
        return [NOT_WRITTEN] * len(cur)
    try:
        base = renderer.ids(renderer.text([dict(_PROBE_SYSTEM)]))
        probe = renderer.ids(renderer.text([dict(_PROBE_SYSTEM), first]))
    except ValueError:  # the template does not accept a system message: no way to tell the preamble apart
        return [label] * len(cur)
    block = probe[_lcp(base, probe) :]
    if not block:
        return [label] * len(cur)
    # The block may end differently here (a trailer that counts messages): take the position where the longest
    # part of it matches, and accept it if what differs is within the rollback tolerance.
    best_pos, best_len = -1, 0
    for pos in range(len(cur)):
        if cur[pos] != block[0]:
            continue
        n = _lcp(cur[pos:], block)
        if n >= best_len:  # ties: the latest position
            best_pos, best_len = pos, n
    if (
        best_pos < 0
        or len(cur) - best_pos - best_len > max_rollback_tokens
        or len(block) - best_len > max_rollback_tokens
    ):
        return [label] * len(cur)
    return [NOT_WRITTEN] * best_pos + [label] * (len(cur) - best_pos)


def _extend_labels(
    renderer: _Renderer,
    prev: list[int],
    prev_labels: list[int],
    cur: list[int],
    label: int,
    max_rollback_tokens: int,
    what: str,
) -> list[int]:
    """Ids for rendering ``cur`` given the ids of the previous rendering ``prev`` (see the module docstring)."""
    p = _lcp(prev, cur)
    old_tail, new_tail = prev[p:], cur[p:]
    if not old_tail:
        return prev_labels + [label] * len(new_tail)
    k = min(len(old_tail), len(new_tail))
    while k > 0 and new_tail[:k] != old_tail[len(old_tail) - k :]:
        k -= 1
    dropped = len(old_tail) - k
    if dropped > max_rollback_tokens:
        tok = renderer.tokenizer
        old_txt = tok.decode(old_tail[: len(old_tail) - k])
        new_txt = tok.decode(new_tail[: min(len(new_tail), 40)])
        raise ValueError(
            f"chat template is not prefix-stable: adding {what} rewrites {dropped} tokens of the previous rendering "
            f"(more than max_rollback_tokens={max_rollback_tokens}). Dropped: {old_txt[:200]!r}; the new rendering "
            f"continues with {new_txt[:200]!r}. The template renders earlier messages differently once later ones "
            "follow (e.g. it removes <think> reasoning from earlier assistant turns or rewrites a header); strip "
            "that content from the messages, fix the template, or raise max_rollback_tokens."
        )
    return prev_labels[:p] + prev_labels[len(prev) - k :] + [label] * (len(new_tail) - k)


def _sentence_starts(text: str, lo: int, hi: int, content: str) -> list[int]:
    """Character positions in ``text[lo:hi]`` where the sentences of ``content`` start (located ones only)."""
    for cand in (content, content.strip()):
        if cand:
            at = text.rfind(cand, lo, hi)
            if at >= 0:
                return [at + s for s, _ in split_sentences(cand)]
    # The template transformed the content (e.g. removed a <think> block): locate the sentences one by one.
    starts: list[int] = []
    cursor = lo
    for s, e in split_sentences(content):
        at = text.find(content[s:e], cursor, hi)
        if at >= 0:
            starts.append(at)
            cursor = at + (e - s)
    return starts


def _sentence_ids(
    text: str, offsets: list[tuple[int, int]], message_ids: list[int], messages: list[dict[str, Any]]
) -> list[int]:
    by_message: dict[int, list[int]] = {}
    for t, mid in enumerate(message_ids):
        if mid != NOT_WRITTEN:
            by_message.setdefault(mid, []).append(t)
    out = [NOT_WRITTEN] * len(message_ids)
    counter = 0
    for mid in sorted(by_message):
        toks = by_message[mid]
        lo = min(offsets[t][0] for t in toks)
        hi = max(offsets[t][1] for t in toks)
        starts = _sentence_starts(text, lo, hi, messages[mid]["content"])
        local: list[int] = []
        for t in toks:
            a, b = offsets[t]
            c = a
            while c < b and text[c].isspace():
                c += 1
            if c == b:  # an all-whitespace token belongs to the sentence before it
                c = a
            local.append(max(bisect.bisect_right(starts, c) - 1, 0))
        # Renumber densely (a located sentence may own no token start, e.g. with unusual tokenizers).
        dense = {j: n for n, j in enumerate(sorted(set(local)))}
        for t, j in zip(toks, local, strict=True):
            out[t] = counter + dense[j]
        counter += len(dense)
    return out


def encode_conversation(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = False,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    max_rollback_tokens: int = 16,
    write_roles: Sequence[str] | None = None,
) -> SegmentedConversation:
    """Tokenise a conversation with the tokenizer's chat template and give every token a message and sentence id.

    Args:
        tokenizer: a fast ``transformers`` tokenizer with a chat template.
        messages: ``[{"role": "system" | "user" | "assistant" | "tool", "content": str, ...}, ...]``.
        add_generation_prompt: append the template's generation prompt (its tokens get id ``-1``).
        chat_template_kwargs: extra arguments for ``apply_chat_template`` / the template, e.g.
            ``{"enable_thinking": False}``, ``{"tools": [...]}``, ``{"chat_template": "..."}``.
        max_rollback_tokens: how many tokens of an earlier rendering the template may rewrite when a message is
            added (see the module docstring) before this is an error.
        write_roles: the roles whose messages are written (an adapter's ``write_roles``); the tokens of messages of
            other roles get id ``-1`` too (read as context, never written). None: every non-system message.

    Cost: the template is rendered and tokenised ``len(messages) + 2`` times (every prefix, plus two probes for the
    preamble), so time grows quadratically with the number of messages (about 1.5 s for 180 messages / 4.6k tokens
    on one CPU core with Qwen3's template); tokenise a dataset once, up front.

    Returns:
        :class:`SegmentedConversation` whose ``input_ids`` equal
        ``tokenizer(apply_chat_template(messages, tokenize=False, add_generation_prompt=...),
        add_special_tokens=False)["input_ids"]``.

    Raises:
        ValueError: invalid messages (the index is named), a tokenizer without a chat template or not fast, reserved
            or invalid arguments, a template that fails to render, or one that is not prefix-stable beyond
            ``max_rollback_tokens``.
    """
    kwargs = dict(chat_template_kwargs or {})
    bad = sorted(_RESERVED_TEMPLATE_KWARGS.intersection(kwargs))
    if bad:
        raise ValueError(f"chat_template_kwargs may not contain {bad}: encode_conversation sets them itself")
    if not isinstance(max_rollback_tokens, int) or max_rollback_tokens < 0:
        raise ValueError(f"max_rollback_tokens must be an int >= 0, got {max_rollback_tokens!r}")
    _check_tokenizer(tokenizer, kwargs)
    msgs = validate_messages(messages)
    renderer = _Renderer(tokenizer, kwargs)

    prev: list[int] = []
    labels: list[int] = []
    text = ""
    written_roles = set(WRITABLE_ROLES if write_roles is None else write_roles)
    for i, m in enumerate(msgs):
        label = i if m["role"] in written_roles else NOT_WRITTEN
        what = f"messages[{i}] ({m['role']})"
        text = renderer.text(msgs[: i + 1], what=f"messages[:{i + 1}]")
        cur = renderer.ids(text)
        if i == 0:
            labels = _first_labels(renderer, m, cur, label, max_rollback_tokens)
        else:
            labels = _extend_labels(renderer, prev, labels, cur, label, max_rollback_tokens, what)
        prev = cur
    if add_generation_prompt:
        text = renderer.text(msgs, generation_prompt=True, what="the conversation with the generation prompt")
        cur = renderer.ids(text)
        labels = _extend_labels(renderer, prev, labels, cur, NOT_WRITTEN, max_rollback_tokens, "the generation prompt")
        prev = cur

    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(enc["input_ids"])
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    if input_ids != prev or len(labels) != len(input_ids):  # pragma: no cover - tokenisation is deterministic
        raise RuntimeError("internal error: incremental tokenisation does not match the full rendering")
    sentence_ids = _sentence_ids(text, offsets, labels, msgs)
    return SegmentedConversation(
        input_ids=input_ids, message_ids=labels, sentence_ids=sentence_ids, text=text, offsets=offsets
    )


def segment_ids_for(
    tokenizer: Any, messages: Sequence[Mapping[str, Any]], granularity: str, **kwargs: Any
) -> tuple[list[int], list[int]]:
    """``(input_ids, segment_ids)`` of a conversation for a write granularity (``"message"`` or ``"sentence"``).

    ``kwargs`` are passed to :func:`encode_conversation` (``add_generation_prompt``, ``chat_template_kwargs``,
    ``max_rollback_tokens``)."""
    _check_granularity(granularity)
    seg = encode_conversation(tokenizer, messages, **kwargs)
    return seg.input_ids, seg.segment_ids(granularity)
