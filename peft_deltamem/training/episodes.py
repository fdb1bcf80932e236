"""Episode construction for the δ-mem objective (docs/design.md §5).

A conversation becomes one episode per supervised assistant turn (the final one by default, or every one). For the
assistant message at index ``a``, with ``P`` the non-system messages before it:

* **read context**: the system message (if any) + the last ``recent_messages`` messages of ``P`` + the answer. It is
  tokenised with the chat template; the labels are the answer's tokens (everything the full rendering adds after the
  prompt rendered with the generation prompt, TRL's prompt-completion convention), ``-100`` elsewhere.
* **write history**: the system message + the rest of ``P`` (everything before the recent messages), rendered with the
  chat template and left-truncated to ``max_write_length`` tokens. If ``P`` has nothing before the recent messages the
  history is empty and the episode trains from an empty memory. For ``message`` / ``sentence`` writes every history
  token also gets its segment id from :func:`peft_deltamem.chat.segments.encode_conversation` (system = ``-1``).

Conversations are expected to be valid (see :mod:`peft_deltamem.training.data`): a list of role/content dicts whose
only system message, if any, comes first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..chat.segments import encode_conversation
from ..chat.templates import common_prefix, render_ids
from ..config import WRITE_GRANULARITIES

IGNORE_INDEX = -100
"""Label of tokens that carry no loss."""

EPISODE_TURNS = ("final", "all")
"""Which assistant turns become episodes."""


Message = Mapping[str, Any]


@dataclass(frozen=True)
class EpisodeOptions:
    """How conversations are cut into episodes.

    Attributes:
        recent_messages: non-system messages before the answer that stay in the read context (0 = none).
        episode_turns: ``"final"`` (the last assistant message) or ``"all"`` (every assistant message).
        max_write_length: write histories longer than this many tokens keep their last tokens.
        max_length: read contexts longer than this are truncated (``None``: never).
        truncation_mode: ``"keep_start"`` (cut the end of a long read context) or ``"keep_end"``.
        write_granularity: the adapter's write granularity; ``message`` / ``sentence`` need segment ids.
        write_roles: the adapter's ``write_roles``: only those roles' messages are written (token writes then need
            segment ids too, ``-1`` on the tokens read as context); None: every message.
        chat_template_kwargs: extra template arguments, e.g. ``{"enable_thinking": False}``.
    """

    recent_messages: int = 1
    episode_turns: str = "final"
    max_write_length: int = 8192
    max_length: int | None = None
    truncation_mode: str = "keep_start"
    write_granularity: str = "token"
    write_roles: Sequence[str] | None = None
    chat_template_kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def segmented(self) -> bool:
        """Whether write histories carry segment ids (segment writes, or token writes of some roles only)."""
        return self.write_granularity != "token" or self.write_roles is not None

    def __post_init__(self) -> None:
        if isinstance(self.recent_messages, bool) or not isinstance(self.recent_messages, int):
            raise ValueError(f"recent_messages must be an integer >= 0, got {self.recent_messages!r}")
        if self.recent_messages < 0:
            raise ValueError(f"recent_messages must be an integer >= 0, got {self.recent_messages!r}")
        if self.episode_turns not in EPISODE_TURNS:
            raise ValueError(f"episode_turns must be one of {list(EPISODE_TURNS)}, got {self.episode_turns!r}")
        if isinstance(self.max_write_length, bool) or not isinstance(self.max_write_length, int):
            raise ValueError(f"max_write_length must be a positive integer, got {self.max_write_length!r}")
        if self.max_write_length <= 0:
            raise ValueError(f"max_write_length must be a positive integer, got {self.max_write_length!r}")
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length <= 0):
            raise ValueError(f"max_length must be a positive integer or None, got {self.max_length!r}")
        if self.truncation_mode not in ("keep_start", "keep_end"):
            raise ValueError(f"truncation_mode must be 'keep_start' or 'keep_end', got {self.truncation_mode!r}")
        if self.write_granularity not in WRITE_GRANULARITIES:
            raise ValueError(
                f"write_granularity must be one of {list(WRITE_GRANULARITIES)}, got {self.write_granularity!r}"
            )


@dataclass
class Episode:
    """One training episode, as token ids.

    Attributes:
        write_input_ids: the write history (empty: train from an empty memory).
        write_segment_ids: per history token its message / sentence id (``-1`` = not written); ``None`` for token
            writes.
        input_ids: the read context.
        labels: ``input_ids`` on the answer tokens, ``-100`` elsewhere.
    """

    write_input_ids: list[int]
    write_segment_ids: list[int] | None
    input_ids: list[int]
    labels: list[int]

    def as_dict(self) -> dict[str, list[int]]:
        """The episode as a dataset row (``write_segment_ids`` only when present)."""
        row = {"write_input_ids": self.write_input_ids, "input_ids": self.input_ids, "labels": self.labels}
        if self.write_segment_ids is not None:
            row["write_segment_ids"] = self.write_segment_ids
        return row


def answer_indices(messages: Sequence[Message], episode_turns: str = "final") -> list[int]:
    """Indices of the assistant messages that become episodes (all of them, or only the last)."""
    indices = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if episode_turns not in EPISODE_TURNS:
        raise ValueError(f"episode_turns must be one of {list(EPISODE_TURNS)}, got {episode_turns!r}")
    return indices if episode_turns == "all" else indices[-1:]


def split_episode(
    messages: Sequence[Message], answer_index: int, recent_messages: int
) -> tuple[list[Message], list[Message]]:
    """``(write messages, read prompt messages)`` for the answer at ``answer_index`` (docs/design.md §5).

    The write messages are empty when nothing precedes the recent messages, so such an episode reads an empty memory.
    """
    system = [messages[0]] if messages and messages[0]["role"] == "system" else []
    before = list(messages[len(system) : answer_index])
    cut = max(len(before) - recent_messages, 0)
    history, recent = before[:cut], before[cut:]
    return (system + history if history else []), system + recent


def encode_write_history(
    tokenizer: Any, messages: Sequence[Message], options: EpisodeOptions
) -> tuple[list[int], list[int] | None]:
    """Token ids (and, when ``options.segmented``, segment ids) of a write history, left-truncated to
    ``max_write_length``."""
    segmented = options.segmented
    if not messages:
        return [], ([] if segmented else None)
    if segmented:
        encoded = encode_conversation(
            tokenizer, messages, chat_template_kwargs=options.chat_template_kwargs, write_roles=options.write_roles
        )
        # Token writes of some roles: the message ids say which tokens are written (-1: read as context).
        granularity = "message" if options.write_granularity == "token" else options.write_granularity
        ids, segments = encoded.input_ids, encoded.segment_ids(granularity)
    else:
        _, ids = render_ids(tokenizer, messages, options.chat_template_kwargs)
        segments = None
    # Left truncation keeps the most recent history, which is what the read context follows on from.
    keep = slice(max(len(ids) - options.max_write_length, 0), None)
    return ids[keep], (segments[keep] if segments is not None else None)


def encode_read_context(
    tokenizer: Any, prompt: Sequence[Message], answer: Message, options: EpisodeOptions
) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of a read context: labels on the answer tokens only, then truncated to ``max_length``."""
    kwargs = options.chat_template_kwargs
    full_text, full = render_ids(tokenizer, [*prompt, answer], kwargs)
    if prompt:
        _, prompt_ids = render_ids(tokenizer, prompt, kwargs, add_generation_prompt=True)
        start = common_prefix(prompt_ids, full)
    else:
        # Templates refuse an empty conversation, so there is no prompt rendering to compare with: the answer starts
        # at the token holding the first character of its content (the role header stays unlabelled).
        start = _content_start(tokenizer, full_text, answer["content"])
    labels = [IGNORE_INDEX] * start + full[start:]
    if options.max_length is not None and len(full) > options.max_length:
        keep = (
            slice(None, options.max_length)
            if options.truncation_mode == "keep_start"
            else slice(-options.max_length, None)
        )
        full, labels = full[keep], labels[keep]
    return full, labels


def _content_start(tokenizer: Any, text: str, content: str) -> int:
    position = text.rfind(content) if content else -1
    if position < 0:
        return 0
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return next((i for i, (_, end) in enumerate(offsets) if end > position), len(offsets))


def build_episodes(tokenizer: Any, messages: Sequence[Message], options: EpisodeOptions) -> list[Episode]:
    """All episodes of one (valid) conversation; episodes whose labels were all truncated away are dropped."""
    episodes = []
    for index in answer_indices(messages, options.episode_turns):
        write_messages, prompt = split_episode(messages, index, options.recent_messages)
        write_ids, write_segments = encode_write_history(tokenizer, write_messages, options)
        input_ids, labels = encode_read_context(tokenizer, prompt, messages[index], options)
        if all(label == IGNORE_INDEX for label in labels):
            continue
        episodes.append(Episode(write_ids, write_segments, input_ids, labels))
    return episodes


__all__ = [
    "EPISODE_TURNS",
    "IGNORE_INDEX",
    "Episode",
    "EpisodeOptions",
    "answer_indices",
    "build_episodes",
    "encode_read_context",
    "encode_write_history",
    "split_episode",
]
