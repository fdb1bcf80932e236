"""The prompt window and write groups (docs/design.md §8) and the SQLite session store."""

from __future__ import annotations

import sqlite3
import threading

import pytest
import torch
from peft import get_peft_model

from peft_deltamem import DeltaMemConfig, MemoryState
from peft_deltamem.serving.store import SessionStore, WrittenGroup, memory_from_bytes, memory_to_bytes
from peft_deltamem.serving.window import common_prefix, group_hashes, plan_window, write_cuts, write_messages
from tests.helpers.chat_fixtures import qwen3_tokenizer
from tests.helpers.tiny_models import randomize_adapter, tiny_model


def conversation(turns: int, *, system: bool = True) -> list[dict]:
    messages = [{"role": "system", "content": "Be brief."}] if system else []
    for i in range(turns):
        messages += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
    return messages + [{"role": "user", "content": "now?"}]


@pytest.mark.parametrize("keep_last", [0, 1, 2, 3, 10])
def test_the_window_holds_keep_last_messages_and_everything_older_is_written_once_in_order(keep_last) -> None:
    messages = conversation(4)
    plan = plan_window(messages, keep_last)
    rest = messages[1:-1]
    assert plan.system == messages[:1] and plan.turn == messages[-1:]
    assert plan.window == rest[len(rest) - min(keep_last, len(rest)) :]
    assert plan.written + plan.window == rest
    assert plan.prompt == [messages[0], *plan.window, messages[-1]]


def test_groups_are_a_function_of_the_conversation_so_turn_by_turn_equals_all_at_once() -> None:
    for keep_last in range(5):
        whole = plan_window(conversation(5), keep_last).groups
        for turns in range(5):
            prefix = plan_window(conversation(turns), keep_last).groups
            assert whole[: len(prefix)] == prefix  # what an earlier request wrote is a prefix of what a later one wants
    # keep_last = 0: each group is a user message and its answer
    assert plan_window(conversation(2), 0).groups == [conversation(2)[1:3], conversation(2)[3:5]]
    assert write_cuts(["user", "assistant", "user"], 1) == [0, 1]


def test_the_hash_chain_finds_the_first_differing_group() -> None:
    groups = plan_window(conversation(5), 0).groups
    edited = [list(g) for g in groups]
    edited[2] = [{"role": "user", "content": "edited"}, groups[2][1]]
    a, b = group_hashes(groups), group_hashes(edited)
    assert common_prefix(a, b) == 2 and common_prefix(a, a) == len(a) and common_prefix(a, a[:3]) == 3
    assert a[3] != b[3]  # a chain: everything after an edit differs


@pytest.fixture(scope="module")
def model():
    model = get_peft_model(
        tiny_model("qwen3", vocab_size=len(qwen3_tokenizer())), DeltaMemConfig(task_type="CAUSAL_LM")
    )
    randomize_adapter(model, 0, scale=0.3)
    return model.requires_grad_(False).eval()


def test_store_commits_rewinds_and_survives_a_reopen(model, tmp_path) -> None:
    tok = qwen3_tokenizer()
    memory = MemoryState()
    groups = plan_window(conversation(3), 0).groups
    hashes = group_hashes(groups)
    written = []
    for group, digest in zip(groups, hashes, strict=True):
        _, tokens = write_messages(model, tok, memory, group)
        written.append(WrittenGroup(digest, group, tokens, memory_to_bytes(memory)))
    path = tmp_path / "s.db"
    store = SessionStore(path)
    store.commit("a", "owner", 0, written)
    assert store.chain("a") == hashes
    assert store.info("a", "owner").messages == 6 and store.info("a", "other") is None
    with pytest.raises(PermissionError):
        store.commit("a", "other", 0, [])
    store.commit("a", "owner", 1, [])  # rewind to the first group
    assert store.chain("a") == hashes[:1]
    first = memory_from_bytes(store.snapshot("a"))
    assert torch.equal(
        first.states[next(iter(first.states))], memory_from_bytes(written[0].snapshot).states[next(iter(first.states))]
    )
    assert store.snapshot("a", 0) is None
    store.close()

    reopened = SessionStore(path)
    assert reopened.chain("a") == hashes[:1] and reopened.integrity_check() == "ok"
    assert [s.id for s in reopened.list("owner")] == ["a"] and reopened.list("other") == []
    assert reopened.delete("a", "owner") and not reopened.exists("a")
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_failed_commit_changes_nothing(tmp_path) -> None:
    store = SessionStore(tmp_path / "s.db")
    store.commit("a", "o", 0, [WrittenGroup("h0", [{"role": "user", "content": "x"}], 1, b"snap")])
    bad = [WrittenGroup("h1", [], 1, b"s"), WrittenGroup("h1", [], 1, None)]  # NOT NULL snapshot fails mid-way
    with pytest.raises(sqlite3.IntegrityError):
        store.commit("a", "o", 0, bad)
    assert store.chain("a") == ["h0"]
    threads = [threading.Thread(target=store.commit, args=(f"s{i}", "o", 0, [])) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.count() == 9
