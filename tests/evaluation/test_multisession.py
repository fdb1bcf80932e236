"""Synthetic multi-session conversations: determinism, disjoint splits, updates, LoCoMo shape, training rows, CLI."""

from __future__ import annotations

import json
import re

import pytest

from peft_deltamem.cli import data as data_cli
from peft_deltamem.evaluation import ladder
from peft_deltamem.evaluation.locomo import load_locomo, parse_locomo
from peft_deltamem.evaluation.multisession import make_conversations, value_pool
from peft_deltamem.evaluation.tasks import locomo_task
from peft_deltamem.training.data import load_conversations
from peft_deltamem.training.multisession_data import training_rows

KINDS = ("city", "job", "pet", "brother", "instrument", "dislike", "drink")


def _turns(sample):
    conv = sample["conversation"]
    sessions = sorted(int(k.split("_")[1]) for k in conv if re.fullmatch(r"session_\d+", k))
    return {t["dia_id"]: (s, t) for s in sessions for t in conv[f"session_{s}"]}


def test_deterministic_per_seed_and_split():
    assert make_conversations(5, seed=1) == make_conversations(5, seed=1)
    assert make_conversations(5, seed=1) != make_conversations(5, seed=2)
    assert make_conversations(5, seed=1, split="test") != make_conversations(5, seed=1, split="train")


@pytest.mark.parametrize("open_values", [False, True])
def test_train_and_test_conversations_are_disjoint(open_values):
    train = make_conversations(40, seed=0, split="train", open_values=open_values)
    test = make_conversations(40, seed=0, split="test", open_values=open_values)
    speakers = [{s["conversation"]["speaker_a"] for s in split} for split in (train, test)]
    assert speakers[0] and speakers[1] and not speakers[0] & speakers[1]
    assert not {s["sample_id"] for s in train} & {s["sample_id"] for s in test}
    answers = [{q["answer"] for s in split for q in s["qa"] if q["category"] == 4} for split in (train, test)]
    if open_values:
        assert not answers[0] & answers[1]
        train_text = json.dumps(train)
        for value in answers[1]:
            assert not re.search(rf"\b{re.escape(value)}\b", train_text), value
    else:
        assert answers[0] & answers[1]  # shared closed pools: the conversations differ, the value sets do not
    for kind in KINDS:
        assert set(value_pool(kind, "test", True)).isdisjoint(value_pool(kind, "train", True))


def test_questions_point_at_their_evidence_and_updates_have_the_new_value():
    for sample in make_conversations(30, seed=3, split="test", sessions=4):
        turns = _turns(sample)
        speaker = sample["conversation"]["speaker_a"]
        assert len(sample["qa"]) == 9  # 7 facts (one of them updated) + 2 events
        updates = [q for q in sample["qa"] if "replaces" in q]
        assert len(updates) == 1
        for qa in sample["qa"]:
            session, turn = turns[qa["evidence"][0]]
            assert turn["speaker"] == speaker and speaker in qa["question"]
            if qa["category"] == 4:
                assert qa["answer"] in turn["text"]
            else:  # an event said "yesterday": the answer is the day before the session's date
                date = sample["conversation"][f"session_{session}_date_time"].split(" on ")[1].replace(",", "")
                day, month, year = date.split()
                answer_day, answer_month, answer_year = qa["answer"].split()
                assert turn["text"].startswith("Yesterday I ") and answer_year == year
                assert int(answer_day) == int(day) - 1 or (answer_month != month and day == "1")
        update = updates[0]
        old_session, old_turn = next(turns[d] for d in turns if update["replaces"] in turns[d][1]["text"])
        new_session, new_turn = turns[update["evidence"][0]]
        assert update["answer"] != update["replaces"] and old_session < new_session == 4
        assert update["replaces"] not in new_turn["text"] and update["answer"] in new_turn["text"]
        assert not any(q["question"] == update["question"] and q is not update for q in sample["qa"])


def test_the_locomo_harness_reads_them_and_training_rows_ask_one_question_each(tmp_path):
    samples = make_conversations(3, seed=0, split="test", sessions=3)
    parsed = parse_locomo(samples)
    assert [len(s.sessions) for s in parsed] == [3, 3, 3] and all(len(s.qa) == 9 for s in parsed)
    task = locomo_task(parsed)
    assert len(task.questions) == 27 and task.scoring == "locomo"
    rows = training_rows(samples)
    assert len(rows) == 27
    for row, question in zip(rows, task.questions, strict=True):
        history, ask, answer = row["messages"][:-2], row["messages"][-2], row["messages"][-1]
        assert ask == {"role": "user", "content": question.question}
        assert answer == {"role": "assistant", "content": question.answer}
        assert history == parsed[question.conversation].history_messages()
        assert [m["role"] for m in history] == ["user", "assistant"] * (len(history) // 2)
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(load_conversations(path)) == 27  # valid training data for deltamem train


def test_no_name_or_value_collides_with_the_ladder():
    ladder_words = {w.lower() for split in ("train", "test") for t in ("name",) for w in ladder.value_pool(t, split)}
    text = json.dumps(make_conversations(60, seed=0) + make_conversations(60, seed=0, split="test")).lower()
    assert not ladder_words & set(re.findall(r"[a-z]+", text))


def test_cli_writes_rows_and_locomo_json(tmp_path, capsys):
    rows, conversations = tmp_path / "train.jsonl", tmp_path / "test.json"
    assert data_cli.main(["--multi-session", "--n", "2", "--out", str(rows)]) == 0
    assert len(rows.read_text().splitlines()) == 18
    argv = ["--multi-session", "--n", "2", "--split", "test", "--format", "locomo", "--sessions", "3"]
    assert data_cli.main([*argv, "--out", str(conversations)]) == 0
    assert [s.sample_id for s in load_locomo(conversations)] == ["ms-test-0-00000", "ms-test-0-00001"]
    assert "wrote 2 multi-session test conversations (LoCoMo JSON)" in capsys.readouterr().out
    for bad in (["--multi-session", "--level", "2"], ["--format", "locomo"], ["--multi-session", "--sessions", "1"]):
        with pytest.raises(SystemExit):
            data_cli.main([*bad, "--out", str(tmp_path / "bad.json")])
    assert not (tmp_path / "bad.json").exists()
