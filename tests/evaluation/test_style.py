"""The working-style family (ladder levels 6-7): scorers on hand-written answers, targets, determinism, splits."""

from __future__ import annotations

import re
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peft_deltamem.evaluation.ladder import (
    OPEN_FACT_TYPES,
    check_fact_types,
    history_messages,
    level_fact_types,
    make_ladder,
    question_messages,
    value_pool,
)
from peft_deltamem.evaluation.style import (
    STATEMENTS,
    STYLE_KINDS,
    STYLE_PAIRS,
    STYLE_VALUES,
    style_answer,
)
from peft_deltamem.evaluation.style_bank import STYLE_ITEMS
from peft_deltamem.evaluation.style_scoring import detect_language, follows, style_scores, words

STYLE_LEVELS = (6, 7)


# ------------------------------------------------------------------------------------------------------ scorers


@pytest.mark.parametrize(
    ("kind", "value", "text", "expected"),
    [
        ("language", "French", "Les flocons d'avoine avec des fruits sont rapides et nourrissants.", True),
        ("language", "French", "CAPITAINE, GONFLEZ VOS PNEUS À LA BONNE PRESSION.", True),
        ("language", "French", "- Buvez de l'eau\n- Dormez bien", True),
        ("language", "French", "Oatmeal with fruit is quick and filling.", False),
        ("language", "French", "Los copos de avena con fruta son rápidos y nutritivos.", False),  # Spanish
        ("language", "French", "", False),
        ("language", "French", "42 !", False),
        ("one_word", None, "Oatmeal.", True),
        ("one_word", None, "  VINEGAR  ", True),
        ("one_word", None, "Stir-fry!", True),
        ("one_word", None, "Oatmeal with fruit.", False),
        ("one_word", None, "", False),
        ("one_word", None, "- Oatmeal", True),  # the list marker is not a word
        ("capitals", None, "PLAN YOUR MEALS AHEAD.", True),
        ("capitals", None, "ÉTEIGNEZ LES APPAREILS INUTILISÉS.", True),
        ("capitals", None, "PLAN YOUR MEALS aHEAD.", False),
        ("capitals", None, "Plan your meals ahead.", False),
        ("capitals", None, "OK 123", True),
        ("capitals", None, "A", False),  # one letter says nothing
        ("capitals", None, "123 !", False),
        ("address", "Captain", "Captain, plan your meals ahead.", True),
        ("address", "Captain", "CAPTAIN: plan your meals.", True),
        ("address", "Captain", '"Captain" - here you go.', True),
        ("address", "Captain", "Captains are busy people.", False),  # whole word only
        ("address", "Captain", "Plan your meals, Captain.", False),  # it must come first
        ("address", "Your Majesty", "Your Majesty, take a walk.", True),
        ("address", "Your Majesty", "Your meals, Majesty.", False),
        ("max_words", 4, "Plan meals ahead.", True),
        ("max_words", 4, "Plan your meals well ahead.", False),
        ("max_words", 6, "Plan your meals well ahead.", True),
        ("max_words", 8, "", False),
        ("max_words", 4, "- Plan - meals - ahead", True),  # dashes are not words
        ("bullets", None, "- Plan your meals\n- Buy store brands", True),
        ("bullets", None, "Captain:\n* Plan your meals\n* Buy store brands", True),
        ("bullets", None, "Tips:\n1. Plan\n2) Buy", True),
        ("bullets", None, "• un\n• deux", True),
        ("bullets", None, "- Plan your meals ahead.", False),  # one item is not a list
        ("bullets", None, "Plan your meals - and buy store brands - every week.", False),
        ("bullets", None, "-Plan\n-Buy", False),  # a marker needs a space after it
    ],
)
def test_scorers_on_hand_written_answers(kind, value, text, expected):
    assert follows(text, kind, value) is expected


def test_style_scores_all_and_per_preference():
    preferences = [{"kind": "capitals", "value": None}, {"kind": "address", "value": "Boss"}]
    assert style_scores("BOSS, TAKE A WALK.", preferences) == {
        "followed": 1.0,
        "followed_capitals": 1.0,
        "followed_address": 1.0,
    }
    assert style_scores("Boss, take a walk.", preferences) == {
        "followed": 0.0,
        "followed_capitals": 0.0,
        "followed_address": 1.0,
    }
    with pytest.raises(ValueError, match="unknown preference kind 'emoji'"):
        follows("hi", "emoji")
    with pytest.raises(ValueError, match="unknown language 'Klingon'"):
        follows("hi", "language", "Klingon")
    with pytest.raises(ValueError, match="at least one preference"):
        style_scores("hi", [])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(categories=("L", "Nd")), min_size=1, max_size=8), max_size=12))
def test_word_count_scorers_agree_with_the_word_list(tokens):
    text = " ".join(tokens)
    assert len(words(text)) == len(tokens)
    assert follows(text, "one_word") is (len(tokens) == 1)
    for limit in (4, 6, 8):
        assert follows(text, "max_words", limit) is (1 <= len(tokens) <= limit)


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet="abcdefXYZ éà-,.!\n", max_size=40))
def test_capitals_follow_exactly_when_no_letter_is_lower_case(text):
    letters = [ch for ch in text if ch.isalpha()]
    assert follows(text.upper(), "capitals") is (len(letters) >= 2)
    assert follows(text, "capitals") is (len(letters) >= 2 and text == text.upper())


# --------------------------------------------------------------------------------------------- targets and bank


def _all_preference_sets():
    single = [[{"kind": k, "value": v}] for k in STYLE_KINDS for v in STYLE_VALUES[k]]
    pairs = [
        [{"kind": a, "value": va}, {"kind": b, "value": vb}]
        for a, b in STYLE_PAIRS
        for va in STYLE_VALUES[a]
        for vb in STYLE_VALUES[b]
    ]
    return single + pairs


def test_every_target_follows_its_preferences_and_the_plain_sentence_follows_none():
    for split in ("train", "test"):
        for item in STYLE_ITEMS[split]:
            for preferences in _all_preference_sets():
                target = style_answer(item, preferences)
                assert style_scores(target, preferences)["followed"] == 1.0, (item.question, preferences, target)
            plain = style_answer(item, [])
            assert plain == item.sentence["en"] and detect_language(plain) == "en"
            for kind in STYLE_KINDS:
                for value in STYLE_VALUES[kind]:
                    assert not follows(plain, kind, value), (plain, kind, value)
            assert detect_language(item.sentence["fr"]) == "fr", item.sentence["fr"]


def test_bank_splits_are_disjoint_and_questions_carry_no_preference():
    train = {item.question for item in STYLE_ITEMS["train"]}
    test = {item.question for item in STYLE_ITEMS["test"]}
    assert len(train) == 14 and len(test) == 6 and not train & test
    hints = re.compile(
        r"french|word|capital|upper|bullet|list|captain|professor|boss|chef|doctor|commander|coach|majesty"
    )
    for question in train | test:
        assert not hints.search(question.lower()), question


# ------------------------------------------------------------------------------------------------- generation


@pytest.mark.parametrize("level", STYLE_LEVELS)
def test_deterministic_per_seed_and_split(level):
    assert make_ladder(level, 30, seed=3) == make_ladder(level, 30, seed=3)
    assert make_ladder(level, 30, seed=3) != make_ladder(level, 30, seed=4)
    assert make_ladder(level, 30, seed=3, split="train") != make_ladder(level, 30, seed=3, split="test")


def _stated_order(stated, preferences):
    """The preferences in the order the history states them (each statement names its kind's template)."""
    ordered = []
    for message in stated:
        for preference in preferences:
            if message["content"] in {t.format(v=preference["value"]) for t in STATEMENTS[preference["kind"]]}:
                ordered.append(preference)
                break
    return ordered


@pytest.mark.parametrize("level", STYLE_LEVELS)
def test_record_structure_and_the_preference_is_only_in_the_history(level):
    for ex in make_ladder(level, 60, seed=0, split="test", system="Be helpful."):
        assert set(ex) == {"messages", "answer", "choices", "level", "fact_type", "preferences", "id"}
        assert ex["level"] == level and ex["choices"] is None and ex["id"].startswith(f"L{level}-test-0-")
        assert len(ex["preferences"]) == level - 5
        assert ex["fact_type"] == "+".join(p["kind"] for p in ex["preferences"])
        messages = ex["messages"]
        assert messages[0]["role"] == "system" and messages[-1] == {"role": "assistant", "content": ex["answer"]}
        assert style_scores(ex["answer"], ex["preferences"])["followed"] == 1.0
        history = history_messages(ex)
        stated = history[0 : 2 * len(ex["preferences"]) : 2]
        for message, preference in zip(stated, _stated_order(stated, ex["preferences"]), strict=True):
            assert message["role"] == "user"
            assert message["content"] in {t.format(v=preference["value"]) for t in STATEMENTS[preference["kind"]]}
        distractors = (len(history) - 2 * len(ex["preferences"])) // 2
        assert distractors in (3, 4)
        prompt = " ".join(m["content"] for m in question_messages(ex)).lower()
        assert prompt.replace("be helpful. ", "") in {i.question.lower() for i in STYLE_ITEMS["test"]}
        for preference in ex["preferences"]:
            for template in STATEMENTS[preference["kind"]]:
                assert template.format(v=preference["value"]).lower() not in prompt
            if preference["value"] is not None:
                assert str(preference["value"]).lower() not in prompt.split()


def test_splits_use_disjoint_questions():
    for level in STYLE_LEVELS:
        train = {ex["messages"][-2]["content"] for ex in make_ladder(level, 200, seed=1, split="train")}
        test = {ex["messages"][-2]["content"] for ex in make_ladder(level, 200, seed=1, split="test")}
        assert train == {i.question for i in STYLE_ITEMS["train"]}
        assert test == {i.question for i in STYLE_ITEMS["test"]}


def test_kinds_values_and_pairs_are_balanced():
    single = make_ladder(6, 60, seed=2)
    assert set(Counter(ex["fact_type"] for ex in single).values()) == {10}
    addresses = Counter(
        p["value"] for ex in make_ladder(6, 6 * 16, seed=2) for p in ex["preferences"] if p["kind"] == "address"
    )
    assert set(addresses.values()) == {2}
    pairs = Counter(ex["fact_type"] for ex in make_ladder(7, 9 * 4, seed=2))
    assert set(pairs) == {"+".join(p) for p in STYLE_PAIRS} and set(pairs.values()) == {4}


def test_kinds_restrict_the_family_and_bad_kinds_fail():
    assert {ex["fact_type"] for ex in make_ladder(6, 20, seed=0, fact_types=("capitals",))} == {"capitals"}
    assert {ex["fact_type"] for ex in make_ladder(7, 20, seed=0, fact_types=("capitals", "language"))} == {
        "capitals+language"
    }
    with pytest.raises(ValueError, match="preference kinds"):
        make_ladder(6, 2, seed=0, fact_types=("colour",))
    with pytest.raises(ValueError, match="no compatible pair"):
        make_ladder(7, 2, seed=0, fact_types=("one_word", "bullets"))


def test_one_fact_types_list_serves_several_levels():
    assert level_fact_types(1, ("colour", "capitals")) == ("colour",)
    assert level_fact_types(6, ("colour", "capitals")) == ("capitals",)
    assert level_fact_types(5, ("colour",)) is None and level_fact_types(6, None) is None
    check_fact_types([1, 6], ("colour", "capitals"))
    with pytest.raises(ValueError, match=r"\['capitals'\] are not used by level\(s\) \[1, 2\]"):
        check_fact_types([1, 2], ("colour", "capitals"))


def test_style_training_text_carries_no_l5_test_value():
    text = " ".join(m["content"] for level in STYLE_LEVELS for ex in make_ladder(level, 200) for m in ex["messages"])
    tokens = set(re.findall(r"\w+", text))
    for fact_type in OPEN_FACT_TYPES:
        assert not set(value_pool(fact_type, "test")) & tokens
