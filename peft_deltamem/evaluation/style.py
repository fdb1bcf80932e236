"""The working-style family of the ladder (levels 6 and 7): a preference stated once, then followed from memory.

The user states how they want to be answered (answer in French; in one word; in capitals; start every answer with a
form of address; no more than N words; as bullet points), the assistant acknowledges, 3-4 small-talk exchanges
follow, then the user asks an unrelated everyday question. In the memory-only protocol the preference is only in the
memory: the question prompt holds the question alone. Level 6 states one preference, level 7 two compatible ones
(each in its own turn, in random order). Answers are scored by :mod:`~peft_deltamem.evaluation.style_scoring`: the
share of answers that follow every preference (``followed``), and each preference on its own.

Training targets: the final assistant message is a templated answer that follows the stated preferences,
composed by :func:`style_answer` from the question's pieces in :mod:`~peft_deltamem.evaluation.style_bank` (a plain
sentence, at most 4 words, one word, or two bullet points; in English or French; prefixed with the form of address;
upper-cased for capitals). Every target passes its own scorers and the plain sentence fails all of them (tests check
both), so the loss teaches exactly what is scored. The small-talk answers before the question are the ladder's plain
English ones: they follow no preference, so the style can only come from the statement, not from imitating earlier
answers in the history.

Kinds and values are balanced over a split (repeated random permutations, as in the ladder); the questions of the
train and test splits are disjoint (14 and 6); the forms of address, N and the language are the same in both splits.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

from .smalltalk import balanced, distractor_turns
from .style_bank import STYLE_ITEMS, StyleItem

Message = dict[str, str]
Example = dict[str, Any]

STYLE_LEVELS: dict[int, str] = {
    6: "working style: one preference stated once (French, one word, capitals, a form of address, at most N words, "
    "bullet points), 3-4 small-talk exchanges, then an unrelated question",
    7: "working style: two compatible preferences at once, 3-4 small-talk exchanges, then an unrelated question",
}

STYLE_KINDS: tuple[str, ...] = ("language", "one_word", "capitals", "address", "max_words", "bullets")
"""The kinds of preference, in the order reports list them."""

STYLE_VALUES: dict[str, tuple[Any, ...]] = {
    "language": ("French",),
    "one_word": (None,),
    "capitals": (None,),
    "address": ("Captain", "Professor", "Boss", "Chef", "Doctor", "Commander", "Coach", "Your Majesty"),
    "max_words": (4, 6, 8),
    "bullets": (None,),
}
"""The values each kind takes (None: the kind has no value)."""

STYLE_PAIRS: tuple[tuple[str, str], ...] = (
    ("capitals", "language"),
    ("address", "language"),
    ("language", "max_words"),
    ("bullets", "language"),
    ("capitals", "one_word"),
    ("address", "capitals"),
    ("capitals", "max_words"),
    ("bullets", "capitals"),
    ("address", "bullets"),
)
"""The pairs level 7 states together. Left out: pairs that contradict each other (one word with bullets, a word
limit or a form of address), pairs where one implies the other, and French with one word (a language identifier
cannot judge a single word)."""

STATEMENTS: dict[str, tuple[str, ...]] = {
    "language": (
        "Please answer me in {v} from now on.",
        "From now on, I would like all your answers in {v}.",
        "Could you always reply in {v}, please?",
    ),
    "one_word": (
        "Please answer every question in one word from now on.",
        "From now on, reply with a single word only.",
        "Keep every answer to one single word, please.",
    ),
    "capitals": (
        "Please write all your answers in capital letters.",
        "From now on, answer only in uppercase letters.",
        "I would like every reply written in capitals.",
    ),
    "address": (
        'Please start every answer with "{v}".',
        "From now on, begin each reply by calling me {v}.",
        "Always address me as {v} at the start of your answers.",
    ),
    "max_words": (
        "Please keep every answer to at most {v} words.",
        "From now on, answer in no more than {v} words.",
        "Never use more than {v} words in a reply, please.",
    ),
    "bullets": (
        "Please format all your answers as bullet points.",
        "From now on, give me your answers as a bulleted list.",
        "I prefer answers written as bullet points, please.",
    ),
}
"""How the user states each preference (``{v}``: its value)."""

STYLE_ACKNOWLEDGEMENTS: tuple[str, ...] = (
    "Understood, I will do that from now on.",
    "Sure, I will keep to that.",
    "Okay, noted for all my answers.",
)

STYLE_MIN_NEW_TOKENS = 64
"""Greedy answers of these levels get at least this many new tokens: a word limit or a list cannot be judged on an
answer cut after a few tokens (a cut answer would pass "at most N words" by construction)."""


def style_answer(item: StyleItem, preferences: Sequence[Mapping[str, Any]]) -> str:
    """The training target: ``item``'s answer written the way ``preferences`` ask (see the module docstring)."""
    chosen = {p["kind"]: p.get("value") for p in preferences}
    language = "fr" if "language" in chosen else "en"
    if "one_word" in chosen:
        body = item.word
    elif "max_words" in chosen:
        body = item.short[language]
    elif "bullets" in chosen:
        body = "\n".join(f"- {point}" for point in item.points[language])
    else:
        body = item.sentence[language]
    if "address" in chosen:
        address = chosen["address"]
        body = f"{address}:\n{body}" if "bullets" in chosen else f"{address}, {body[:1].lower()}{body[1:]}"
    return body.upper() if "capitals" in chosen else body


def style_statement(rng: random.Random, kind: str, value: Any) -> str:
    """One way of stating the preference ``kind`` (with ``value``)."""
    return rng.choice(STATEMENTS[kind]).format(v=value)


def style_combinations(level: int, kinds: Sequence[str]) -> list[tuple[str, ...]]:
    """The preference combinations of ``level`` drawn from ``kinds``: single kinds (6) or :data:`STYLE_PAIRS` (7)."""
    if level == 6:
        return [(kind,) for kind in kinds]
    if level == 7:
        return [pair for pair in STYLE_PAIRS if set(pair) <= set(kinds)]
    raise ValueError(f"the working-style levels are {sorted(STYLE_LEVELS)}, got {level!r}")


def make_style_examples(
    level: int, n: int, seed: int, split: str, kinds: Sequence[str] | None, system: str | None
) -> list[Example]:
    """``n`` working-style conversations of ``level`` (6 or 7); deterministic in ``(level, n, seed, split, kinds)``.

    Records have the ladder's fields (``messages``, ``answer`` = the templated target, ``choices`` = None, ``level``,
    ``fact_type`` = the kinds joined by ``+``, ``id``) plus ``preferences``: ``[{"kind", "value"}, ...]``.
    The entry point is ``make_ladder(6 or 7, ...)``: it checks the level, ``n`` and the split, holds the defaults and
    passes its ``fact_types`` as ``kinds``.
    """
    kinds = tuple(kinds) if kinds is not None else STYLE_KINDS
    unknown = [k for k in kinds if k not in STYLE_KINDS]
    if not kinds or unknown:
        raise ValueError(f"level {level} accepts preference kinds from {STYLE_KINDS}, got {tuple(kinds)!r}")
    combinations = style_combinations(level, kinds)
    if not combinations:
        raise ValueError(f"no compatible pair of preferences among {kinds}; level 7 pairs: {STYLE_PAIRS}")
    rng = random.Random(f"ladder/L{level}/{split}/{seed}/{','.join(kinds)}")
    combination_stream = balanced(rng, combinations)
    value_streams = {kind: balanced(rng, STYLE_VALUES[kind]) for kind in kinds}
    item_stream = balanced(rng, STYLE_ITEMS[split])
    examples: list[Example] = []
    for i in range(n):
        chosen = next(combination_stream)
        preferences = [{"kind": kind, "value": next(value_streams[kind])} for kind in chosen]
        stated = list(preferences)
        rng.shuffle(stated)
        messages: list[Message] = [{"role": "system", "content": system}] if system is not None else []
        for preference in stated:
            messages += [
                {"role": "user", "content": style_statement(rng, preference["kind"], preference["value"])},
                {"role": "assistant", "content": rng.choice(STYLE_ACKNOWLEDGEMENTS)},
            ]
        for exchange in distractor_turns(rng, rng.randint(3, 4)):
            messages += exchange
        item = next(item_stream)
        answer = style_answer(item, preferences)
        messages += [{"role": "user", "content": item.question}, {"role": "assistant", "content": answer}]
        examples.append(
            {
                "messages": messages,
                "answer": answer,
                "choices": None,
                "level": level,
                "fact_type": "+".join(chosen),
                "preferences": preferences,
                "id": f"L{level}-{split}-{seed}-{i:05d}",
            }
        )
    return examples


__all__ = [
    "STATEMENTS",
    "STYLE_ACKNOWLEDGEMENTS",
    "STYLE_KINDS",
    "STYLE_LEVELS",
    "STYLE_MIN_NEW_TOKENS",
    "STYLE_PAIRS",
    "STYLE_VALUES",
    "make_style_examples",
    "style_answer",
    "style_combinations",
    "style_statement",
]
