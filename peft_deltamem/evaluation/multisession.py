"""Synthetic multi-session conversations in LoCoMo's shape: persona facts, dated events, preferences and updates.

Each conversation is between two people: speaker A (the persona the questions are about) and speaker B, a friend. It
has ``sessions`` dated sessions (LoCoMo's ``"1:56 pm on 8 May, 2023"`` format, 3-14 days apart). Across them A
mentions persona facts (home city, job, a pet's name, a brother's name, the instrument A is learning), preferences (a
food A dislikes, a favourite drink), dated events ("Yesterday I ran a half marathon") and one **update**: in a later
session A's city or job changes, and its question asks for the new value. B answers every statement with a reply
that carries no value, and small talk between statements carries none either. Every fact has one question with its
gold answer, the dialogue id of its evidence and LoCoMo's category (4 single-hop for facts, preferences and the
update; 2 temporal for events, whose answer is the event's date, "7 May 2023").

:func:`make_conversations` returns samples as LoCoMo's JSON (a list of ``{"sample_id", "conversation", "qa"}``
objects), so :func:`~peft_deltamem.evaluation.locomo.parse_locomo` and ``deltamem eval locomo`` read them as they
read LoCoMo itself. Deterministic per ``(n, seed, split, sessions, open_values)``. Speaker A's name comes from
disjoint train / test pools, so no test conversation is a training one; with ``open_values=True`` every answer value
(cities, jobs, names, ...) also comes from disjoint pools, so test answers never occur in training data (the L5 way).
No name here occurs in the recall ladder's pools (a test checks it), so mixing this data with ladder training data
keeps the ladder's level-5 test values unseen.
"""

from __future__ import annotations

import datetime as _dt
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

Sample = dict[str, Any]

_MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip
_TIMES = ("9:05 am", "10:40 am", "12:15 pm", "1:56 pm", "4:30 pm", "6:20 pm", "8:45 pm")

_SPEAKER_A = (
    "Maya", "Tomas", "Lena", "Omar", "Priya", "Jonah", "Sofia", "Mateo", "Leila", "Ravi", "Hanna", "Kofi",
    "Ines", "Yusuf", "Carla", "Dmitri", "Aisha", "Felix", "Nora", "Kenji", "Mila", "Rohan", "Zara", "Luca",
    "Ayla", "Bram", "Celine", "Dev", "Eva", "Farid", "Gwen", "Hiro", "Iris", "Jules", "Kira", "Leo",
)  # fmt: skip
_SPEAKER_B = ("Sam", "Alex", "Robin", "Jamie", "Morgan", "Taylor", "Casey", "Jordan")

_POOLS: dict[str, tuple[str, ...]] = {
    "city": ("Lisbon", "Porto", "Dublin", "Krakow", "Valencia", "Leeds", "Bergen", "Utrecht", "Lyon", "Graz",
             "Turin", "Tampere", "Seville", "Ghent", "Brno", "Aarhus"),
    "job": ("nurse", "teacher", "architect", "baker", "pilot", "librarian", "chemist", "carpenter", "journalist",
            "dentist", "gardener", "translator", "plumber", "pharmacist", "electrician", "surveyor"),
    "pet": ("Biscuit", "Pepper", "Mochi", "Waffles", "Pickle", "Noodle", "Ziggy", "Toffee", "Juniper", "Marble",
            "Pumpkin", "Sprout", "Domino", "Nugget", "Pebble", "Tinker"),
    "brother": ("Aurelio", "Benno", "Caspar", "Dorian", "Evander", "Florin", "Gustav", "Henrik", "Ignatius",
                "Jarek", "Konstantin", "Leander", "Mikkel", "Nikolai", "Orson", "Pavel"),
    "instrument": ("cello", "banjo", "flute", "drums", "harp", "ukulele", "saxophone", "violin", "piano",
                   "trumpet", "clarinet", "accordion", "mandolin", "oboe", "trombone", "harmonica"),
    "dislike": ("olives", "mushrooms", "coriander", "anchovies", "celery", "liquorice", "tofu", "okra", "beetroot",
                "capers", "blue cheese", "radishes", "sardines", "eggplant", "kale", "pickles"),
    "drink": ("green tea", "espresso", "lemonade", "hot chocolate", "ginger beer", "mint tea", "iced coffee",
              "apple juice", "chai", "matcha", "cold brew", "hibiscus tea", "oat latte", "cider", "kombucha",
              "tomato juice"),
}  # fmt: skip
_POOL_SEED = "peft_deltamem-multisession-pools-v1"


@dataclass(frozen=True)
class _Fact:
    statement: str  # by speaker A, "{v}" is the value
    question: str  # "{a}" is speaker A's name
    update: str | None = None  # how A states a new value later, for the facts that can change


_FACTS: dict[str, _Fact] = {
    "city": _Fact(
        "I live in {v}, it's lovely this time of year.",
        "Where does {a} live?",
        "Big news: we moved, I live in {v} now.",
    ),
    "job": _Fact(
        "I work as {an} {v}, and I really like it.", "What is {a}'s job?", "I changed jobs, I'm {an} {v} now."
    ),
    "pet": _Fact("My dog is called {v}, he is full of energy.", "What is the name of {a}'s dog?"),
    "brother": _Fact("My brother {v} came over for dinner.", "What is the name of {a}'s brother?"),
    "instrument": _Fact("I've started learning to play the {v}.", "Which instrument is {a} learning to play?"),
    "dislike": _Fact("Honestly, I can't stand {v}.", "Which food does {a} dislike?"),
    "drink": _Fact("My favourite drink is {v}.", "What is {a}'s favourite drink?"),
}

_EVENTS: tuple[tuple[str, str], ...] = (  # (A says "Yesterday I ...", the question asks "When did {a} ...?")
    ("ran a half marathon", "run a half marathon"),
    ("went to a pottery class", "go to a pottery class"),
    ("visited family in the countryside", "visit family in the countryside"),
    ("painted the kitchen", "paint the kitchen"),
    ("saw a jazz concert", "see a jazz concert"),
    ("planted tomatoes in the garden", "plant tomatoes"),
    ("went kayaking on the lake", "go kayaking"),
    ("baked bread for the first time", "bake bread for the first time"),
)

_REPLIES: tuple[str, ...] = (
    "Oh nice, thanks for telling me!",
    "That sounds great.",
    "I'll remember that.",
    "Really? Tell me more some time.",
    "Good to know!",
    "Wow, that is interesting.",
)
_SMALL_TALK: tuple[tuple[str, str], ...] = (
    ("The weather has been strange lately.", "Yes, sunny one hour and rainy the next."),
    ("I finally finished that long book.", "Was the ending worth it?"),
    ("Work has been busy this week.", "Hang in there, the weekend is close."),
    ("I tried a new recipe yesterday evening.", "Did it turn out well?"),
    ("My neighbours are renovating again.", "That must be noisy."),
    ("I watched a documentary about whales.", "They are such amazing animals."),
    ("I need a holiday soon.", "Same here, somewhere quiet would be nice."),
    ("The bus was late again this morning.", "That happens far too often."),
)
_GREETINGS: tuple[str, ...] = ("Hey {b}! How have you been?", "Hi {b}, good to talk again!", "Hello {b}!")
_GREETING_REPLIES: tuple[str, ...] = ("Hi {a}! All good here.", "Hey {a}, great to hear from you.")


def _split_pool(name: str, values: Sequence[str]) -> dict[str, tuple[str, ...]]:
    shuffled = list(values)
    random.Random(f"{_POOL_SEED}/{name}").shuffle(shuffled)
    half = len(shuffled) // 2
    return {"train": tuple(sorted(shuffled[half:])), "test": tuple(sorted(shuffled[:half]))}


def value_pool(kind: str, split: str, open_values: bool = False) -> tuple[str, ...]:
    """The values a fact ``kind`` takes in ``split``: shared by both splits, or disjoint halves with ``open_values``.

    ``kind="speaker"`` is speaker A's name pool, always split (so train and test conversations never coincide).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if kind == "speaker":
        return _split_pool(kind, _SPEAKER_A)[split]
    if kind not in _POOLS:
        raise ValueError(f"unknown fact kind {kind!r}; known: {sorted(_POOLS)}")
    return _split_pool(kind, _POOLS[kind])[split] if open_values else _POOLS[kind]


def _date_time(day: _dt.date, time: str) -> str:
    return f"{time} on {day.day} {_MONTHS[day.month - 1]}, {day.year}"


def _answer_date(day: _dt.date) -> str:
    return f"{day.day} {_MONTHS[day.month - 1]} {day.year}"


class _Builder:
    """Accumulates one conversation's sessions, dialogue ids and QA items."""

    def __init__(self, rng: random.Random, a: str, b: str) -> None:
        self.rng, self.a, self.b = rng, a, b
        self.sessions: list[list[dict[str, str]]] = []
        self.qa: list[dict[str, Any]] = []

    def new_session(self) -> None:
        self.sessions.append([])
        self.say(self.a, self.rng.choice(_GREETINGS).format(b=self.b))
        self.say(self.b, self.rng.choice(_GREETING_REPLIES).format(a=self.a))

    def say(self, speaker: str, text: str) -> str:
        session = self.sessions[-1]
        dia_id = f"D{len(self.sessions)}:{len(session) + 1}"
        session.append({"speaker": speaker, "dia_id": dia_id, "text": text})
        return dia_id

    def statement(self, text: str) -> str:
        dia_id = self.say(self.a, text)
        self.say(self.b, self.rng.choice(_REPLIES))
        return dia_id

    def small_talk(self) -> None:
        first, reply = self.rng.choice(_SMALL_TALK)
        self.say(self.a, first)
        self.say(self.b, reply)


def _conversation(
    rng: random.Random, index: int, split: str, seed: int, sessions: int, open_values: bool, speaker: str
) -> Sample:
    b = rng.choice(_SPEAKER_B)
    values = {kind: rng.choice(value_pool(kind, split, open_values)) for kind in _FACTS}
    updated = rng.choice(("city", "job"))
    new_value = rng.choice([v for v in value_pool(updated, split, open_values) if v != values[updated]])
    events = rng.sample(_EVENTS, 2)
    # What each session says: the facts spread over all but the last session; the events anywhere after the first;
    # the update in the last session, so it always comes after the value it replaces.
    kinds = list(_FACTS)
    rng.shuffle(kinds)
    plan: list[list[tuple[str, Any]]] = [[] for _ in range(sessions)]
    for i, kind in enumerate(kinds):
        plan[i % max(sessions - 1, 1)].append(("fact", kind))
    for event in events:
        plan[rng.randrange(1, sessions) if sessions > 1 else 0].append(("event", event))
    plan[-1].append(("update", updated))

    day = _dt.date(2023, 1, 2) + _dt.timedelta(days=rng.randrange(0, 300))
    builder = _Builder(rng, speaker, b)
    conversation: dict[str, Any] = {"speaker_a": speaker, "speaker_b": b}
    for s, items in enumerate(plan, start=1):
        if s > 1:
            day += _dt.timedelta(days=rng.randint(3, 14))
        conversation[f"session_{s}_date_time"] = _date_time(day, rng.choice(_TIMES))
        builder.new_session()
        rng.shuffle(items)
        for what, item in items:
            if rng.random() < 0.5:
                builder.small_talk()
            if what == "fact":
                spec = _FACTS[item]
                dia_id = builder.statement(_fill(spec.statement, values[item]))
                if item != updated:
                    builder.qa.append(_qa(spec.question.format(a=speaker), values[item], dia_id, 4))
            elif what == "event":
                said, asked = item
                dia_id = builder.statement(f"Yesterday I {said}.")
                answer = _answer_date(day - _dt.timedelta(days=1))
                builder.qa.append(_qa(f"When did {speaker} {asked}?", answer, dia_id, 2))
            else:
                spec = _FACTS[item]
                dia_id = builder.statement(_fill(spec.update, new_value))
                builder.qa.append(_qa(spec.question.format(a=speaker), new_value, dia_id, 4, update=values[item]))
        builder.small_talk()
        conversation[f"session_{s}"] = builder.sessions[-1]
    return {"sample_id": f"ms-{split}-{seed}-{index:05d}", "conversation": conversation, "qa": builder.qa}


def _fill(template: str, value: str) -> str:
    return template.format(v=value, an="an" if value[:1].lower() in "aeiou" else "a")


def _qa(question: str, answer: str, dia_id: str, category: int, update: str | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {"question": question, "answer": answer, "evidence": [dia_id], "category": category}
    if update is not None:
        item["replaces"] = update  # the earlier value this answer updates (LoCoMo readers ignore the field)
    return item


def make_conversations(
    n: int, *, seed: int = 0, split: str = "train", sessions: int = 4, open_values: bool = False
) -> list[Sample]:
    """``n`` synthetic multi-session conversations in LoCoMo's JSON shape (see the module docstring).

    Args:
        n: number of conversations.
        seed: random seed; the train and test splits use different streams and speaker pools.
        split: ``"train"`` or ``"test"``.
        sessions: sessions per conversation (2-10): facts spread over all but the last, the update in the last.
        open_values: draw every answer from a per-split half of its pool, so no test answer occurs in training.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 2 <= sessions <= 10:
        raise ValueError(f"sessions must be between 2 and 10, got {sessions}")
    speakers = value_pool("speaker", split)
    rng = random.Random(f"multisession/{split}/{seed}/{sessions}/{open_values}")
    order = list(speakers)
    samples = []
    for i in range(n):
        if i % len(order) == 0:
            rng.shuffle(order)
        samples.append(_conversation(rng, i, split, seed, sessions, open_values, order[i % len(order)]))
    return samples


__all__ = ["make_conversations", "value_pool"]
