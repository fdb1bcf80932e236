"""The LoCoMo-format loader, on a tiny fixture written here (LoCoMo itself is CC BY-NC and never shipped)."""

from __future__ import annotations

import copy
import json

import pytest

from peft_deltamem.evaluation.locomo import LocomoFormatError, load_locomo, parse_locomo

FIXTURE = [
    {
        "sample_id": "conv-test-1",
        "conversation": {
            "speaker_a": "Ana",
            "speaker_b": "Ben",
            "session_1_date_time": "1:00 pm on 3 March, 2023",
            "session_1": [
                {"speaker": "Ana", "dia_id": "D1:1", "text": "I started pottery classes this week."},
                {"speaker": "Ben", "dia_id": "D1:2", "text": "Nice! I went camping instead."},
                {"speaker": "Ben", "dia_id": "D1:3", "text": "Look at the lake.", "blip_caption": "a calm lake"},
            ],
            "session_10_date_time": "9:30 am on 1 April, 2023",
            "session_10": [{"speaker": "Ben", "dia_id": "D10:1", "text": "Still camping?"}],
            "session_2_date_time": "5:00 pm on 10 March, 2023",
            "session_2": [{"speaker": "Ana", "dia_id": "D2:1", "text": "My pottery bowl is finished."}],
        },
        "qa": [
            {
                "question": "What hobbies do they have?",
                "answer": "pottery, camping",
                "evidence": ["D1:1"],
                "category": 1,
            },
            {
                "question": "When did Ana start pottery?",
                "answer": "the week of 3 March 2023",
                "evidence": ["D1:1"],
                "category": 2,
            },
            {"question": "Would Ben like hiking?", "answer": "Likely yes; he camps", "evidence": [], "category": 3},
            {"question": "What did Ana finish?", "answer": "a pottery bowl", "evidence": ["D2:1"], "category": 4},
            {"question": "What did Ben finish?", "adversarial_answer": "a bowl", "evidence": ["D2:1"], "category": 5},
            {"question": "What year?", "answer": 2023, "evidence": ["D1:1"], "category": 2},
        ],
    }
]


@pytest.fixture
def fixture_path(tmp_path):
    path = tmp_path / "locomo_fixture.json"
    path.write_text(json.dumps(FIXTURE))
    return path


def test_load_fixture(fixture_path):
    (sample,) = load_locomo(fixture_path)
    assert sample.sample_id == "conv-test-1" and (sample.speaker_a, sample.speaker_b) == ("Ana", "Ben")
    assert [s.index for s in sample.sessions] == [1, 2, 10]  # numeric order, not string order
    assert sample.sessions[0].date_time == "1:00 pm on 3 March, 2023"
    assert [q.category for q in sample.qa] == [1, 2, 3, 4, 2]  # category 5 dropped
    assert sample.qa[-1].answer == "2023"  # numbers become strings
    assert sample.qa[0].evidence == ["D1:1"]


def test_sessions_as_messages(fixture_path):
    (sample,) = load_locomo(fixture_path)
    first = sample.session_messages()[0]
    assert first[0] == {
        "role": "user",
        "content": "[1:00 pm on 3 March, 2023] Ana: I started pottery classes this week.",
    }
    assert first[1] == {"role": "assistant", "content": "Ben: Nice! I went camping instead."}
    assert first[2]["content"] == "Ben: Look at the lake. [shares a photo of a calm lake]"
    all_user = sample.session_messages(roles="user", include_dates=False)
    assert {m["role"] for s in all_user for m in s} == {"user"}
    assert all_user[1] == [{"role": "user", "content": "Ana: My pottery bowl is finished."}]
    assert len(sample.history_messages()) == 5
    with pytest.raises(ValueError, match="roles"):
        sample.session_messages(roles="speaker")


def test_category_filter(fixture_path):
    (sample,) = load_locomo(fixture_path, categories=(4,))
    assert [q.question for q in sample.qa] == ["What did Ana finish?"]


def _broken(edit):
    data = copy.deepcopy(FIXTURE)
    edit(data)
    return data


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        (lambda d: d[0].pop("conversation"), r"sample 0 \(conv-test-1\): missing field 'conversation'"),
        (lambda d: d[0]["conversation"].pop("speaker_b"), r"conv-test-1.*missing field 'speaker_b'"),
        (lambda d: d[0]["conversation"]["session_1"][1].pop("text"), r"session_1\[1\]: missing field 'text'"),
        (lambda d: d[0]["conversation"]["session_2"][0].update(speaker="Cy"), r"session_2\[0\]: speaker 'Cy'"),
        (lambda d: d[0]["conversation"].update(session_2="oops"), r"field 'session_2' should be list"),
        (lambda d: d[0]["qa"][1].pop("answer"), r"qa\[1\]: missing field 'answer'"),
        (lambda d: d[0]["qa"][0].update(category="1"), r"qa\[0\]: field 'category' should be int"),
        (lambda d: d[0]["qa"][3].update(evidence="D2:1"), r"qa\[3\]: field 'evidence'"),
        (lambda d: d[0].update(qa={}), r"field 'qa' should be list"),
        (lambda d: [d[0]["conversation"].pop(k) for k in list(d[0]["conversation"]) if k.startswith("session")],
         r"no 'session_N'"),
    ],
)  # fmt: skip
def test_malformed_input_names_sample_and_field(edit, pattern):
    with pytest.raises(LocomoFormatError, match=pattern):
        parse_locomo(_broken(edit))


def test_malformed_files(tmp_path):
    with pytest.raises(LocomoFormatError, match="top level"):
        parse_locomo({"conversation": {}})
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(LocomoFormatError, match="not valid JSON"):
        load_locomo(bad)
    with pytest.raises(FileNotFoundError, match="not distributed"):
        load_locomo(tmp_path / "missing.json")
