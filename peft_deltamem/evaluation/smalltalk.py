"""Small talk shared by the recall ladder and the working-style family: acknowledgements, distractor exchanges, and
balanced random streams (every prefix of a stream holds each item a number of times that differs by at most one)."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

ACKNOWLEDGEMENTS: tuple[str, ...] = (
    "Got it, I will remember that.",
    "Noted!",
    "Thanks, I have made a note of it.",
    "Okay, I will keep that in mind.",
)

# Small talk with no colour, weekday, digit, number or person name in it (a test checks this).
DISTRACTORS: tuple[tuple[str, str], ...] = (
    ("Can you suggest a quick breakfast?", "Oatmeal with fruit is quick and filling."),
    ("How do I keep basil fresh?", "Keep it in a glass of water on the counter, like cut flowers."),
    ("Any tips for falling asleep faster?", "Keep a regular bedtime and avoid screens late in the evening."),
    ("What is a good way to learn new words?", "Read widely and review new words with flashcards."),
    ("How often should I water a cactus?", "Only when the soil is completely dry, which is not often."),
    ("Is walking good exercise?", "Yes, brisk walking is gentle on the joints and good for the heart."),
    ("How can I make my coffee less bitter?", "Use slightly coarser grounds or water that is not boiling."),
    ("What should I pack for a rainy hike?", "A waterproof jacket, spare socks and a warm layer."),
    ("Do you have a tip for remembering names?", "Repeat the name back when you are introduced."),
    ("How do I clean a cast iron pan?", "Rinse it with hot water, dry it well and rub in a little oil."),
    ("Why do onions make me cry?", "Cutting them releases a gas that irritates the eyes."),
    ("How can I be more productive at work?", "Plan your tasks the evening before and tackle the hardest first."),
    ("What is a nice hobby to start?", "Sketching is cheap, relaxing and easy to pick up."),
    ("Should I stretch before running?", "A short dynamic warm-up works better than long static stretches."),
    ("How do I stop my glasses from fogging?", "A drop of dish soap rubbed on the lenses helps."),
    ("Any idea for a quick dinner?", "A vegetable stir-fry with rice takes very little time."),
)


def balanced(rng: random.Random, items: Sequence[str]) -> Iterator[str]:
    """Endless stream of random permutations of ``items``: any prefix is balanced to within one."""
    while True:
        block = list(items)
        rng.shuffle(block)
        yield from block


def distractor_turns(rng: random.Random, count: int) -> list[list[dict[str, str]]]:
    """``count`` distinct small-talk exchanges drawn from :data:`DISTRACTORS`, each a [user, assistant] pair."""
    pairs = rng.sample(DISTRACTORS, count)
    return [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in pairs]


__all__ = ["ACKNOWLEDGEMENTS", "DISTRACTORS", "balanced", "distractor_turns"]
