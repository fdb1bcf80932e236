"""Scoring functions on hand-written cases, and the BM25 retrieval baseline."""

from __future__ import annotations

import pytest

from peft_deltamem.evaluation.metrics import (
    bootstrap_ci,
    contains_match,
    exact_match,
    forced_choice,
    locomo_f1,
    multi_answer_f1,
    normalize_answer,
    token_f1,
)
from peft_deltamem.evaluation.retrieval import bm25_top_k


def test_normalize_and_exact_match():
    assert normalize_answer("  The Teal!  ") == "teal"
    assert normalize_answer("Salt, and pepper.") == "salt pepper"
    assert normalize_answer("an apple a day") == "apple day"
    assert exact_match("Teal.", "teal")
    assert exact_match("the Monday", "Monday")
    assert not exact_match("teal blue", "teal")
    assert not exact_match("", "teal")


def test_contains_match_is_word_level():
    assert contains_match("The answer is teal.", "teal")
    assert contains_match("It is 417.", "417")
    assert not contains_match("I would steal it.", "teal")
    assert not contains_match("4170", "417")
    assert not contains_match("anything", "")


def test_token_f1_with_porter_stemming():
    assert token_f1("paintings", "painted") == 1.0  # both stem to "paint"
    assert token_f1("She went hiking.", "hikes") == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))
    # "he was running in the park" -> [he, wa, run, in, park]; truth [run, park]: P = 2/5, R = 1.
    assert token_f1("He was running in the park", "running park") == pytest.approx(2 * 0.4 / 1.4)
    assert token_f1("", "anything") == 0.0
    assert token_f1("cats", "dogs") == 0.0
    assert token_f1("red red", "red") == pytest.approx(2 * 0.5 / 1.5)  # bags of tokens, not sets


def test_category1_multi_answer_f1():
    # Each ground-truth item is matched by its best prediction item; the item scores are averaged.
    assert multi_answer_f1("pottery, camping, swimming", "camping, painting") == pytest.approx(0.5)
    assert multi_answer_f1("swimming, camping", "camping, swimming") == 1.0
    # One prediction item "hiking and painting" -> [hike, paint] vs each single-word truth: F1 = 2/3.
    assert multi_answer_f1("hiking and painting", "painting, hiking") == pytest.approx(2 / 3)
    assert locomo_f1("pottery, camping", "camping, painting", category=1) == pytest.approx(0.5)


def test_locomo_f1_by_category():
    assert locomo_f1("7 May 2023", "7 May 2023", category=2) == 1.0
    assert locomo_f1("likely yes", "Likely yes; she mentions it twice", category=3) == 1.0  # part before ';'
    assert locomo_f1("adoption agencies", "Adoption agencies", category=4) == 1.0
    with pytest.raises(ValueError, match="1-4"):
        locomo_f1("x", "y", category=5)


def test_forced_choice():
    assert forced_choice({"red": -3.0, "blue": -0.5, "green": -2.0}) == "blue"
    assert forced_choice({"a": -1.0, "b": -1.0}) == "a"  # first wins a tie
    assert forced_choice({"only": float("-inf")}) == "only"
    with pytest.raises(ValueError):
        forced_choice({})


def test_bootstrap_ci():
    values = [1] * 30 + [0] * 20
    mean, lo, hi = bootstrap_ci(values, seed=0)
    assert mean == pytest.approx(0.6)
    assert lo < mean < hi and 0.4 < lo and hi < 0.8
    assert bootstrap_ci(values, seed=0) == (mean, lo, hi)  # deterministic per seed
    _, lo_big, hi_big = bootstrap_ci(values * 16, seed=0)
    assert hi_big - lo_big < (hi - lo) / 2  # ~1/sqrt(16) as wide
    assert bootstrap_ci([1, 1, 1]) == (1.0, 1.0, 1.0)
    _, lo90, hi90 = bootstrap_ci(values, alpha=0.1)
    assert hi90 - lo90 < hi - lo
    with pytest.raises(ValueError):
        bootstrap_ci([])


HISTORY = [
    {"role": "user", "content": "Can you suggest a quick breakfast?"},
    {"role": "assistant", "content": "Oatmeal with fruit is quick and filling."},
    {"role": "user", "content": "Please remember: the locker code is 417."},
    {"role": "assistant", "content": "Noted!"},
    {"role": "user", "content": "My dentist appointment is on Friday."},
    {"role": "assistant", "content": "Got it, I will remember that."},
]


def test_bm25_returns_matching_turn():
    assert bm25_top_k(HISTORY, "What is my locker code?", 1) == [HISTORY[2]]
    assert bm25_top_k(HISTORY, "When do I see the dentist?", 1) == [HISTORY[4]]
    # Several turns come back in their original order; stemming matches "appointments" to "appointment".
    assert bm25_top_k(HISTORY, "locker code and dentist appointments", 2) == [HISTORY[2], HISTORY[4]]


def test_bm25_edge_cases():
    assert bm25_top_k(HISTORY, "locker", 0) == []
    assert bm25_top_k([], "locker", 3) == []
    assert bm25_top_k(HISTORY, "locker", 10) == HISTORY
    with_system = [{"role": "system", "content": "locker locker"}, *HISTORY]
    assert bm25_top_k(with_system, "locker", 1) == [HISTORY[2]]
    # No word in common: ties go to the most recent turns, deterministically.
    assert bm25_top_k(HISTORY, "zebra", 2) == HISTORY[4:]
    assert bm25_top_k(HISTORY, "?!", 1) == [HISTORY[5]]
    with pytest.raises(ValueError):
        bm25_top_k(HISTORY, "x", -1)
