"""The recall ladder: determinism, structure, balance, and L5's disjoint value pools."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from peft_deltamem.evaluation.ladder import (
    ACKNOWLEDGEMENTS,
    CLOSED_FACT_TYPES,
    DISTRACTORS,
    FACT_TYPES,
    OPEN_FACT_TYPES,
    answer_message,
    history_messages,
    make_ladder,
    question_messages,
    value_pool,
)

LEVELS = (1, 2, 3, 4, 5)


@pytest.mark.parametrize("level", LEVELS)
def test_deterministic_per_seed(level):
    assert make_ladder(level, 40, seed=3) == make_ladder(level, 40, seed=3)
    assert make_ladder(level, 40, seed=3) != make_ladder(level, 40, seed=4)
    assert make_ladder(level, 40, seed=3, split="train") != make_ladder(level, 40, seed=3, split="test")


@pytest.mark.parametrize("level", LEVELS)
def test_record_structure(level):
    for ex in make_ladder(level, 30, seed=0, split="test", system="Be brief."):
        messages = ex["messages"]
        assert set(ex) == {"messages", "answer", "choices", "level", "fact_type", "id"}
        assert ex["level"] == level and ex["id"].startswith(f"L{level}-test-0-")
        assert messages[0] == {"role": "system", "content": "Be brief."}
        roles = [m["role"] for m in messages[1:]]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
        assert messages[-1] == {"role": "assistant", "content": ex["answer"]} == answer_message(ex)
        assert messages[-2]["content"] == FACT_TYPES[ex["fact_type"]].question
        history = history_messages(ex)
        assert history == messages[1:-2] and history
        assert question_messages(ex) == [messages[0], messages[-2]]
        assert not any(ex["answer"] in m["content"] for m in question_messages(ex))
        if level == 5:
            assert ex["choices"] is None and ex["fact_type"] in OPEN_FACT_TYPES
        else:
            assert ex["answer"] in ex["choices"] and ex["fact_type"] in CLOSED_FACT_TYPES


def test_no_system_message_by_default():
    ex = make_ladder(1, 1, seed=0)[0]
    assert ex["messages"][0]["role"] == "user"
    assert question_messages(ex) == [ex["messages"][-2]]


def _distractor_count(ex):
    prompts = {q for q, _ in DISTRACTORS}
    return sum(m["content"] in prompts for m in history_messages(ex))


def test_level_shapes():
    for ex in make_ladder(1, 30, seed=1):
        assert len(history_messages(ex)) == 2 and ex["answer"] in history_messages(ex)[0]["content"]
    assert {_distractor_count(ex) for ex in make_ladder(2, 60, seed=1)} == {1, 2, 3}
    for ex in make_ladder(2, 60, seed=1):
        assert ex["answer"] in history_messages(ex)[0]["content"]  # fact first, distractors in between
    for ex in make_ladder(3, 60, seed=1):
        facts = [m for m in history_messages(ex) if m["role"] == "user" and m["content"] not in dict(DISTRACTORS)]
        assert len(facts) == 3 and _distractor_count(ex) <= 2
    for ex in make_ladder(4, 60, seed=1):
        users = [m["content"] for m in history_messages(ex) if m["role"] == "user"]
        facts = [re.findall(r"\w+", u) for u in users if u not in dict(DISTRACTORS)]
        assert len(facts) == 2 and ex["answer"] in facts[1] and ex["answer"] not in facts[0]
    assert {_distractor_count(ex) for ex in make_ladder(5, 60, seed=1)} == {0, 1, 2}


@pytest.mark.parametrize("level", LEVELS)
def test_answers_balanced(level):
    examples = make_ladder(level, 210, seed=7)
    type_counts = Counter(ex["fact_type"] for ex in examples)
    assert max(type_counts.values()) - min(type_counts.values()) <= 1
    for fact_type in type_counts:
        counts = Counter(ex["answer"] for ex in examples if ex["fact_type"] == fact_type)
        pool = value_pool(fact_type, "train")
        if len(pool) <= type_counts[fact_type]:
            assert set(counts) == set(pool)
        assert max(counts.values()) - min(counts.values()) <= 1


def test_single_fact_type_option():
    examples = make_ladder(1, 50, seed=0, fact_types=("colour",))
    assert {ex["fact_type"] for ex in examples} == {"colour"}
    assert Counter(ex["answer"] for ex in examples) == Counter({c: 5 for c in FACT_TYPES["colour"].values})
    with pytest.raises(ValueError, match="fact types"):
        make_ladder(1, 5, seed=0, fact_types=("name",))
    with pytest.raises(ValueError, match="fact types"):
        make_ladder(5, 5, seed=0, fact_types=("colour",))


def test_l5_pools_disjoint_and_splits_never_overlap():
    for fact_type in OPEN_FACT_TYPES:
        train, test = set(value_pool(fact_type, "train")), set(value_pool(fact_type, "test"))
        assert train and test and not train & test
    train_answers = {ex["answer"] for seed in range(3) for ex in make_ladder(5, 300, seed=seed, split="train")}
    test_answers = {ex["answer"] for seed in range(3) for ex in make_ladder(5, 300, seed=seed, split="test")}
    assert not train_answers & test_answers
    assert all(re.fullmatch(r"[1-9]\d\d", a) or a.isalpha() for a in train_answers | test_answers)
    # No test value appears anywhere in any training conversation, of any level.
    train_text = " ".join(
        m["content"]
        for level in LEVELS
        for ex in make_ladder(level, 300, seed=0, split="train")
        for m in ex["messages"]
    )
    train_words = set(re.findall(r"\w+", train_text))
    for fact_type in OPEN_FACT_TYPES:
        assert not set(value_pool(fact_type, "test")) & train_words


def test_distractors_and_acknowledgements_carry_no_answer_values():
    values = set()
    for fact_type in FACT_TYPES:
        values |= {v.lower() for split in ("train", "test") for v in value_pool(fact_type, split)}
    for text in [t for pair in DISTRACTORS for t in pair] + list(ACKNOWLEDGEMENTS):
        words = set(re.findall(r"\w+", text.lower()))
        assert not words & values, (text, words & values)
        assert not re.search(r"\d", text)


def _fact_statements(example):
    return [m for m in history_messages(example) if m["role"] == "user" and m["content"] not in dict(DISTRACTORS)]


def test_level_3_with_two_facts_a_curriculum_step():
    """facts=2 states the asked fact and one other of a different type; the default (3) is the level as defined."""
    examples = make_ladder(3, 90, seed=2, facts=2)
    assert make_ladder(3, 90, seed=2, facts=3) == make_ladder(3, 90, seed=2)
    others = Counter()
    for ex in examples:
        facts = _fact_statements(ex)
        assert len(facts) == 2 and _distractor_count(ex) <= 2
        stated = [
            t
            for t in CLOSED_FACT_TYPES
            for f in facts
            if any(f["content"] == s.format(v=v) for s in FACT_TYPES[t].statements for v in FACT_TYPES[t].values)
        ]
        assert sorted(stated) == sorted(set(stated)) and ex["fact_type"] in stated  # two types, one asked
        assert any(ex["answer"] in f["content"] for f in facts)
        others.update(set(stated) - {ex["fact_type"]})
    assert set(others) == set(CLOSED_FACT_TYPES)  # the other fact is drawn from every other type
    assert Counter(ex["fact_type"] for ex in examples) == Counter({t: 30 for t in CLOSED_FACT_TYPES})
    for level, facts in ((1, 2), (3, 1), (3, 4), (6, 2)):
        with pytest.raises(ValueError, match="facts applies to level 3 only and must be 2 or 3"):
            make_ladder(level, 1, seed=0, facts=facts)


def test_bad_arguments():
    with pytest.raises(ValueError, match="level"):
        make_ladder(8, 1, seed=0)
    with pytest.raises(ValueError, match="split"):
        make_ladder(1, 1, seed=0, split="dev")
    assert make_ladder(1, 0, seed=0) == []
