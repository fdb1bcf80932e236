"""A synthetic recall benchmark as a difficulty ladder (levels 1-5, and the working-style family 6-7), deterministic
per seed.

Each example is a short conversation in which the user states one or more personal facts, possibly chats
about other things, and finally asks about a fact; the last assistant message is the short answer.

======  ==========================================================================================
Level   What it tests
======  ==========================================================================================
1       one fact with a closed-set answer (colour from 10, weekday, digit); no distractors
2       as level 1, with 1-3 distractor exchanges between the fact and the question
3       three facts of different types in one conversation, 0-2 distractor exchanges among them
4       one fact stated, then updated later (0-2 distractors around); the answer is the latest value
5       open answers (a sister's name, a 3-digit locker code) with 0-2 distractors; train and test
        draw values from disjoint pools, so no test value ever appears in training data
6       working style: a preference stated once (French, one word, capitals, ...), 3-4 small-talk
        exchanges, an unrelated question; scored by whether the answer follows the preference
7       working style with two preferences at once (see :mod:`~peft_deltamem.evaluation.style`)
======  ==========================================================================================

Answers are assigned at random per conversation and balanced: each fact type draws its values from
repeated random permutations of its value set, so value counts differ by at most one. Fact types are
balanced the same way. Nothing about the answer can therefore be memorised in the weights.

Examples are TRL conversational records::

    {"messages": [system?, user(fact), assistant(ack), ..., user(question), assistant(answer)],
     "answer": "teal", "choices": [...] or None, "level": 1, "fact_type": "colour", "id": "L1-train-0-00000"}

Use :func:`history_messages` and :func:`question_messages` to split an example for the memory-only protocol.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .smalltalk import ACKNOWLEDGEMENTS, DISTRACTORS, balanced, distractor_turns
from .style import STYLE_KINDS, STYLE_LEVELS, make_style_examples

Message = dict[str, str]
Example = dict[str, Any]


@dataclass(frozen=True)
class FactType:
    """One kind of personal fact: how it is stated and asked, its values and updates (closed types only).

    An open type (L5) has no value set of its own: its values come from disjoint train/test pools (:func:`value_pool`).
    """

    name: str
    statements: tuple[str, ...]
    question: str
    values: tuple[str, ...] = ()
    updates: tuple[str, ...] = ()

    @property
    def closed(self) -> bool:
        """Whether the answer is one of a fixed set of values (L1-L4), as opposed to an open value (L5)."""
        return bool(self.values)


FACT_TYPES: dict[str, FactType] = {
    "colour": FactType(
        name="colour",
        values=("red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "black", "white"),
        statements=(
            "My favourite colour is {v}.",
            "Just so you know, my favourite colour is {v}.",
            "I love the colour {v}; it is my favourite.",
        ),
        updates=(
            "Actually, my favourite colour has changed. It is {v} now.",
            "Update: my favourite colour is now {v}.",
        ),
        question="What is my favourite colour? Answer with one word.",
    ),
    "weekday": FactType(
        name="weekday",
        values=("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
        statements=(
            "My dentist appointment is on {v}.",
            "Please remember: I see the dentist on {v}.",
            "I booked my dentist appointment for {v}.",
        ),
        updates=(
            "Change of plan: my dentist appointment moved to {v}.",
            "Update: the dentist rescheduled me to {v}.",
        ),
        question="On which day is my dentist appointment? Answer with one word.",
    ),
    "digit": FactType(
        name="digit",
        values=tuple(str(d) for d in range(10)),
        statements=(
            "My lucky number is {v}.",
            "Please remember: my lucky number is {v}.",
            "The number {v} is my lucky number.",
        ),
        updates=(
            "Actually, my lucky number is {v} now.",
            "Update: my new lucky number is {v}.",
        ),
        question="What is my lucky number? Answer with one digit.",
    ),
    # open types: values from the L5 pools below
    "name": FactType(
        name="name",
        statements=(
            "My sister's name is {v}.",
            "Please remember: my sister is called {v}.",
            "I have a sister named {v}.",
        ),
        question="What is my sister's name? Answer with one word.",
    ),
    "code": FactType(
        name="code",
        statements=(
            "Please remember: the locker code is {v}.",
            "My locker code is {v}.",
            "The code for my locker is {v}.",
        ),
        question="What is my locker code? Answer with the three digits.",
    ),
}

CLOSED_FACT_TYPES: tuple[str, ...] = ("colour", "weekday", "digit")
#: How many facts a level-3 conversation may state (``make_ladder(3, ..., facts=)``): the level as defined states one
#: of every closed type; two is a step of a curriculum over the number of facts.
LEVEL_3_FACTS: tuple[int, ...] = (2, len(CLOSED_FACT_TYPES))
OPEN_FACT_TYPES: tuple[str, ...] = ("name", "code")

# L5 value pools: a fixed split, independent of the user's seed, so train and test never share a value.
_NAMES: tuple[str, ...] = (
    "Abigail", "Adrian", "Agnes", "Alba", "Amara", "Anders", "Anika", "Arlo", "Astrid", "Aurora",
    "Bastian", "Beatrix", "Benedikt", "Bianca", "Bjorn", "Bruno", "Camila", "Casimir", "Cecilia", "Clara",
    "Cormac", "Dalia", "Damian", "Dario", "Delphine", "Desmond", "Dora", "Edith", "Elias", "Elodie",
    "Emil", "Enzo", "Esme", "Ezra", "Fabian", "Felicity", "Fenna", "Flora", "Frida", "Gideon",
    "Greta", "Gunnar", "Hana", "Hector", "Helga", "Hugo", "Ida", "Ilse", "Imogen", "Ingrid",
    "Ivo", "Jasper", "Johanna", "Jonas", "Juno", "Kasimir", "Keira", "Klara", "Lars", "Leona",
    "Lorenzo", "Lucia", "Ludwig", "Lyra", "Magnus", "Malin", "Marek", "Matilda", "Mirela", "Nadia",
    "Nika", "Nils", "Noemi", "Odette", "Olga", "Oskar", "Otto", "Paloma", "Petra", "Quentin",
    "Rafael", "Ramona", "Rosalind", "Rufus", "Selma", "Silas", "Soren", "Stella", "Svea", "Tamsin",
    "Teodor", "Thea", "Tilda", "Ulrich", "Valeria", "Vera", "Viggo", "Wilma", "Xenia", "Yara",
)  # fmt: skip
_L5_POOL_SEED = "peft_deltamem-ladder-L5-pools-v1"
_L5_TEST_FRACTION = 0.3

LEVELS: dict[int, str] = {
    1: "one closed-set fact, no distractors",
    2: "one closed-set fact, 1-3 distractor exchanges before the question",
    3: "three closed-set facts of different types, 0-2 distractor exchanges",
    4: "a closed-set fact stated then updated (answer = latest value), 0-2 distractors",
    5: "one open fact (name or 3-digit code), 0-2 distractors; disjoint train/test value pools",
    **STYLE_LEVELS,
}


def accepted_fact_types(level: int) -> tuple[str, ...]:
    """What ``make_ladder``'s ``fact_types`` may hold at ``level``: closed types (1-4), open types (5) or the
    working-style preference kinds (6-7)."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {sorted(LEVELS)}, got {level!r}")
    if level in STYLE_LEVELS:
        return STYLE_KINDS
    return OPEN_FACT_TYPES if level == 5 else CLOSED_FACT_TYPES


def level_fact_types(level: int, fact_types: Sequence[str] | None) -> tuple[str, ...] | None:
    """The part of ``fact_types`` that ``level`` accepts, or None (the level's default) when no part of it does.

    One ``--fact-types`` list can then serve several levels: ``colour,capitals`` restricts levels 1-4 to colours and
    levels 6-7 to capitals, and leaves level 5 at its open types. Use :func:`check_fact_types` first, so that a type
    no requested level accepts is an error rather than silently dropped.
    """
    if not fact_types:
        return None
    kept = tuple(t for t in fact_types if t in accepted_fact_types(level))
    return kept or None


def check_fact_types(levels: Sequence[int], fact_types: Sequence[str] | None) -> None:
    """Raise ValueError naming the fact types that none of ``levels`` accepts."""
    accepted = {t for level in levels for t in accepted_fact_types(level)}
    unknown = [t for t in fact_types or () if t not in accepted]
    if unknown:
        raise ValueError(
            f"fact types {unknown} are not used by level(s) {list(levels)}; they accept {sorted(accepted)}"
        )


def _l5_pools() -> dict[str, dict[str, tuple[str, ...]]]:
    rng = random.Random(_L5_POOL_SEED)
    pools: dict[str, dict[str, tuple[str, ...]]] = {}
    for fact_type, values in (("name", list(_NAMES)), ("code", [str(c) for c in range(100, 1000)])):
        rng.shuffle(values)
        n_test = round(len(values) * _L5_TEST_FRACTION)
        pools[fact_type] = {"test": tuple(sorted(values[:n_test])), "train": tuple(sorted(values[n_test:]))}
    return pools


_POOLS = _l5_pools()


def value_pool(fact_type: str, split: str = "train") -> tuple[str, ...]:
    """The values a fact type can take in ``split``: the full set for closed types, a disjoint pool for open ones."""
    _check_split(split)
    if fact_type not in FACT_TYPES:
        raise ValueError(f"unknown fact type {fact_type!r}; known: {sorted(FACT_TYPES)}")
    spec = FACT_TYPES[fact_type]
    return spec.values if spec.closed else _POOLS[fact_type][split]


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def _fact_turns(rng: random.Random, text: str) -> list[Message]:
    return [{"role": "user", "content": text}, {"role": "assistant", "content": rng.choice(ACKNOWLEDGEMENTS)}]


def _state(rng: random.Random, fact_type: str, value: str) -> str:
    return rng.choice(FACT_TYPES[fact_type].statements).format(v=value)


def _build_history(
    rng: random.Random, level: int, fact_type: str, answer: str, split: str, facts: int = LEVEL_3_FACTS[-1]
) -> list[Message]:
    """History turns (fact statements, distractors) that lead up to a question about ``fact_type``."""
    if level == 1:
        return _fact_turns(rng, _state(rng, fact_type, answer))
    if level in (2, 5):
        blocks = [_fact_turns(rng, _state(rng, fact_type, answer))]
        blocks += distractor_turns(rng, rng.randint(1, 3) if level == 2 else rng.randint(0, 2))
        return [m for block in blocks for m in block]
    if level == 3:
        others = [t for t in CLOSED_FACT_TYPES if t != fact_type]
        if facts < len(CLOSED_FACT_TYPES):  # fewer facts: a curriculum step (ARMT's 1 -> 2 -> 3 pairs)
            others = rng.sample(others, facts - 1)
        values = {t: rng.choice(value_pool(t, split)) for t in others}
        values[fact_type] = answer
        order = list(values)
        rng.shuffle(order)
        blocks = [_fact_turns(rng, _state(rng, t, values[t])) for t in order]
        for distractor in distractor_turns(rng, rng.randint(0, 2)):
            blocks.insert(rng.randint(1, len(blocks)), distractor)  # never before the first fact
        return [m for block in blocks for m in block]
    if level == 4:
        old = rng.choice([v for v in value_pool(fact_type, split) if v != answer])
        update = rng.choice(FACT_TYPES[fact_type].updates).format(v=answer)
        distractors = distractor_turns(rng, rng.randint(0, 2))
        cut = rng.randint(0, len(distractors))
        blocks = [_fact_turns(rng, _state(rng, fact_type, old)), *distractors[:cut], _fact_turns(rng, update)]
        blocks += distractors[cut:]
        return [m for block in blocks for m in block]
    raise ValueError(f"level must be 1-5, got {level!r}")


def make_ladder(
    level: int,
    n: int,
    *,
    seed: int = 0,
    split: str = "train",
    fact_types: Sequence[str] | None = None,
    system: str | None = None,
    facts: int | None = None,
) -> list[Example]:
    """Generate ``n`` examples of ladder ``level`` (1-7); deterministic in ``(level, n, seed, split, fact_types)``.

    Args:
        level: difficulty, see :data:`LEVELS`.
        n: number of examples.
        seed: random seed; train and test splits use different streams for the same seed.
        split: ``"train"`` or ``"test"``; at level 5 it also selects the disjoint value pool.
        fact_types: the asked-about fact types, balanced over the examples. Default: all closed types
            (colour, weekday, digit) for levels 1-4, the open types (name, code) for level 5. Pass e.g.
            ``("colour",)`` for the classic single-type level 1. At levels 6-7 (the working-style family,
            :mod:`~peft_deltamem.evaluation.style`) these are preference kinds, e.g. ``("capitals",)``.
        system: an optional system message put first in every conversation.
        facts: level 3 only: how many facts of different closed types each conversation states, 2 or 3 (the
            default, the level as defined); 2 is a step of a curriculum over the number of facts.

    Returns:
        TRL conversational records, see the module docstring. ``choices`` is the closed answer set (for
        forced choice) or None at level 5.
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {sorted(LEVELS)}, got {level!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    _check_split(split)
    if facts is not None and (level != 3 or facts not in LEVEL_3_FACTS):
        raise ValueError(f"facts applies to level 3 only and must be 2 or 3, got facts={facts!r} at level {level}")
    if level in STYLE_LEVELS:
        return make_style_examples(level, n, seed, split, fact_types, system)
    allowed = OPEN_FACT_TYPES if level == 5 else CLOSED_FACT_TYPES
    types = tuple(fact_types) if fact_types is not None else allowed
    if not types or any(t not in allowed for t in types):
        raise ValueError(f"level {level} accepts fact types from {allowed}, got {fact_types!r}")

    facts = facts or LEVEL_3_FACTS[-1]
    # the default keeps its stream (and so every conversation generated so far); fewer facts get their own
    stream = f"ladder/L{level}/{split}/{seed}/{','.join(types)}" + (
        "" if facts == LEVEL_3_FACTS[-1] else f"/facts{facts}"
    )
    rng = random.Random(stream)
    type_stream = balanced(rng, types)
    answer_streams = {t: balanced(rng, value_pool(t, split)) for t in types}
    examples: list[Example] = []
    for i in range(n):
        fact_type = next(type_stream)
        answer = next(answer_streams[fact_type])
        messages: list[Message] = [{"role": "system", "content": system}] if system is not None else []
        messages += _build_history(rng, level, fact_type, answer, split, facts)
        messages += [
            {"role": "user", "content": FACT_TYPES[fact_type].question},
            {"role": "assistant", "content": answer},
        ]
        examples.append(
            {
                "messages": messages,
                "answer": answer,
                "choices": list(FACT_TYPES[fact_type].values) if FACT_TYPES[fact_type].closed else None,
                "level": level,
                "fact_type": fact_type,
                "id": f"L{level}-{split}-{seed}-{i:05d}",
            }
        )
    return examples


def history_messages(example: Example) -> list[Message]:
    """The turns to write into memory: everything before the final question, system message excluded."""
    return [m for m in example["messages"][:-2] if m["role"] != "system"]


def question_messages(example: Example) -> list[Message]:
    """The prompt for the memory-only protocol: the system message (if any) and the final question, no answer."""
    system = [m for m in example["messages"][:1] if m["role"] == "system"]
    return [*system, example["messages"][-2]]


def answer_message(example: Example) -> Message:
    """The final assistant message (the reference answer)."""
    return example["messages"][-1]


__all__ = [
    "ACKNOWLEDGEMENTS",
    "CLOSED_FACT_TYPES",
    "DISTRACTORS",
    "FACT_TYPES",
    "LEVELS",
    "LEVEL_3_FACTS",
    "OPEN_FACT_TYPES",
    "FactType",
    "accepted_fact_types",
    "answer_message",
    "check_fact_types",
    "history_messages",
    "level_fact_types",
    "make_ladder",
    "question_messages",
    "value_pool",
]
