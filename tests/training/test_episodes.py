"""Episode construction (write history / read context / labels), the episode collator and data checking."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from peft_deltamem.chat.segments import encode_conversation
from peft_deltamem.training.collator import DeltaMemEpisodeCollator
from peft_deltamem.training.data import DataError, check_conversation, load_conversations
from peft_deltamem.training.episodes import IGNORE_INDEX, EpisodeOptions, build_episodes
from tests.helpers.chat_fixtures import qwen3_tokenizer, sample_conversation, smollm2_tokenizer

TOK = smollm2_tokenizer()
SYS, U0, A0, U1, A1, U2, A2 = sample_conversation()
ANSWER = "Your cat is called Tom.<|im_end|>\n"


def chatml(*messages: dict) -> str:
    """SmolLM2's ChatML rendering, written out by hand."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def ids(text: str) -> list[int]:
    return TOK(text, add_special_tokens=False)["input_ids"]


def check_read(episode, read_messages: tuple, answer: str) -> None:
    """input_ids are the rendering of the read messages; labels are exactly the answer's tokens."""
    prompt, final = read_messages[:-1], read_messages[-1]
    assert episode.input_ids == ids(chatml(*read_messages))
    start = len(ids(chatml(*prompt) + "<|im_start|>assistant\n"))
    assert episode.labels[:start] == [IGNORE_INDEX] * start
    assert episode.labels[start:] == episode.input_ids[start:]
    assert TOK.decode(episode.labels[start:]) == answer == f"{final['content']}<|im_end|>\n"


@pytest.mark.parametrize(
    ("recent", "history", "read"),
    [
        (0, (SYS, U0, A0, U1, A1, U2), (SYS, A2)),
        (1, (SYS, U0, A0, U1, A1), (SYS, U2, A2)),
        (2, (SYS, U0, A0, U1), (SYS, A1, U2, A2)),
    ],
)
def test_final_turn_episode_for_recent_messages(recent: int, history: tuple, read: tuple) -> None:
    (episode,) = build_episodes(TOK, sample_conversation(), EpisodeOptions(recent_messages=recent))
    assert TOK.decode(episode.write_input_ids) == chatml(*history)
    assert episode.write_input_ids == ids(chatml(*history))
    assert episode.write_segment_ids is None  # token writes need no segment ids
    check_read(episode, read, ANSWER)


def test_every_assistant_turn_is_an_episode() -> None:
    first, second, third = build_episodes(TOK, sample_conversation(), EpisodeOptions(episode_turns="all"))
    # The first answer has nothing before its recent message: no write history, it trains from an empty memory.
    assert first.write_input_ids == []
    check_read(first, (SYS, U0, A0), f"{A0['content']}<|im_end|>\n")
    assert second.write_input_ids == ids(chatml(SYS, U0, A0))
    check_read(second, (SYS, U1, A1), f"{A1['content']}<|im_end|>\n")
    assert third.write_input_ids == ids(chatml(SYS, U0, A0, U1, A1))
    check_read(third, (SYS, U2, A2), ANSWER)


def test_long_histories_are_left_truncated_with_their_segment_ids() -> None:
    full = ids(chatml(SYS, U0, A0, U1, A1))
    (episode,) = build_episodes(TOK, sample_conversation(), EpisodeOptions(max_write_length=12))
    assert episode.write_input_ids == full[-12:]  # the most recent 12 tokens: the end of A1
    assert TOK.decode(episode.write_input_ids).endswith("Anything else?<|im_end|>\n")
    options = EpisodeOptions(max_write_length=12, write_granularity="message")
    (segmented,) = build_episodes(TOK, sample_conversation(), options)
    assert segmented.write_input_ids == full[-12:]
    assert segmented.write_segment_ids == [4] * 12  # all of them belong to A1, message 4 of the write history
    untruncated = build_episodes(TOK, sample_conversation(), EpisodeOptions(write_granularity="message"))[0]
    expected = encode_conversation(TOK, [SYS, U0, A0, U1, A1]).message_ids
    assert untruncated.write_segment_ids == expected
    assert sorted(set(expected)) == [-1, 1, 2, 3, 4]  # the system prompt is never written
    sentences = build_episodes(TOK, sample_conversation(), EpisodeOptions(write_granularity="sentence"))[0]
    assert sentences.write_segment_ids == encode_conversation(TOK, [SYS, U0, A0, U1, A1]).sentence_ids


def test_long_read_contexts_are_truncated_and_answerless_episodes_dropped() -> None:
    prompt = len(ids(chatml(SYS, U2) + "<|im_start|>assistant\n"))
    (episode,) = build_episodes(TOK, sample_conversation(), EpisodeOptions(max_length=prompt + 2))
    assert len(episode.input_ids) == prompt + 2
    assert sum(label != IGNORE_INDEX for label in episode.labels) == 2
    assert build_episodes(TOK, sample_conversation(), EpisodeOptions(max_length=prompt)) == []


def test_answer_without_prompt_labels_only_its_content() -> None:
    # No system message and recent_messages=0: the read context is the answer alone (after SmolLM2's default system).
    (episode,) = build_episodes(TOK, sample_conversation(system=False), EpisodeOptions(recent_messages=0))
    labelled = [t for t in episode.labels if t != IGNORE_INDEX]
    assert TOK.decode(labelled) == ANSWER
    assert TOK.decode(episode.input_ids).endswith("<|im_start|>assistant\n" + ANSWER)


def test_chat_template_kwargs_reach_the_template() -> None:
    tok = qwen3_tokenizer()
    options = EpisodeOptions(chat_template_kwargs={"enable_thinking": False})
    (episode,) = build_episodes(tok, sample_conversation(), options)
    start = episode.labels.index(next(t for t in episode.labels if t != IGNORE_INDEX))
    # Thinking off: the empty think block is part of the prompt, the labels are the answer alone.
    assert tok.decode(episode.input_ids[:start]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert tok.decode(episode.labels[start:]) == ANSWER


@pytest.mark.parametrize(
    ("options", "field"),
    [
        (dict(recent_messages=-1), "recent_messages"),
        (dict(episode_turns="last"), "episode_turns"),
        (dict(max_write_length=0), "max_write_length"),
        (dict(write_granularity="word"), "write_granularity"),
    ],
)
def test_bad_episode_options_name_the_field(options: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        EpisodeOptions(**options)


# ----- collator ----------------------------------------------------------------------------------------------------
def test_collator_right_pads_both_passes_and_keeps_empty_histories_empty() -> None:
    rows = [
        {"write_input_ids": [], "write_segment_ids": [], "input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"write_input_ids": [8, 9], "write_segment_ids": [-1, 0], "input_ids": [5], "labels": [5]},
    ]
    batch = DeltaMemEpisodeCollator(pad_token_id=0)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]
    assert batch["write_input_ids"].tolist() == [[0, 0], [8, 9]]
    assert batch["write_attention_mask"].tolist() == [[0, 0], [1, 1]]
    assert batch["write_segment_ids"].tolist() == [[-1, -1], [-1, 0]]
    # A batch without any history still gets a (fully masked) write pass, one token long.
    empty = DeltaMemEpisodeCollator(pad_token_id=0, pad_to_multiple_of=4)([{**rows[0], "write_segment_ids": []}])
    assert empty["write_input_ids"].shape == (1, 4) and empty["write_attention_mask"].sum() == 0
    assert empty["input_ids"].shape == (1, 4) and all(v.dtype == torch.long for v in empty.values())


# ----- data --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ("hello", "not a list"),
        ([], "is empty"),
        ([{"role": "user", "content": "Hi"}], "no assistant turn"),
        (
            [{"role": "bot", "content": "Hi"}, {"role": "assistant", "content": "Hi"}],
            "message 0 has unknown role 'bot'",
        ),
        (
            [{"role": "user", "content": " "}, {"role": "assistant", "content": "Hi"}],
            "message 0 (user) has empty content",
        ),
        ([{"role": "user"}, {"role": "assistant", "content": "Hi"}], "message 0 (user) has no text content"),
        ([{"role": "user", "content": "Hi"}, {"role": "system", "content": "S"}], "only the first message"),
        (["Hi"], "message 0 is not an object"),
    ],
)
def test_malformed_conversations_are_named(messages, problem: str) -> None:
    assert problem in check_conversation(messages)


def test_valid_conversation_passes() -> None:
    assert check_conversation(sample_conversation()) is None


def _write_jsonl(path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_jsonl_errors_name_the_file_and_line(tmp_path) -> None:
    good = json.dumps({"messages": sample_conversation()})
    path = tmp_path / "data.jsonl"
    _write_jsonl(path, [good, '{"messages": [oops', good, json.dumps({"messages": [{"role": "user", "content": "x"}]})])
    with pytest.raises(DataError) as err:
        load_conversations(path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: line 2 (row 1): not valid JSON")
    assert "(2 malformed rows in all)" in message and "invalid_rows='skip'" in message


def test_skipping_drops_malformed_rows_and_reports_them(tmp_path, caplog) -> None:
    good = {"messages": sample_conversation(), "extra": 1}
    path = tmp_path / "data.json"
    path.write_text(json.dumps([good, {"messages": [{"role": "robot", "content": "x"}]}, good, {"text": "x"}]))
    with caplog.at_level(logging.WARNING):
        dataset = load_conversations(path, invalid_rows="skip")
    assert len(dataset) == 2 and dataset.column_names == ["messages"]
    assert dataset[0]["messages"] == sample_conversation()
    assert "skipping 2 malformed rows: row 1: message 0 has unknown role 'robot'" in caplog.text
    assert "row 3: 'messages' is missing" in caplog.text


def test_datasets_are_checked_too() -> None:
    from datasets import Dataset, DatasetDict

    rows = [{"messages": sample_conversation()}, {"messages": [{"role": "user", "content": "no answer"}]}]
    with pytest.raises(DataError, match=r"^dataset \[train\]: row 1: no assistant turn to train on"):
        load_conversations(DatasetDict(train=Dataset.from_list(rows)))
    with pytest.raises(DataError, match="no 'messages' column"):
        load_conversations(Dataset.from_list([{"text": "plain"}]))
    assert len(load_conversations(Dataset.from_list(rows), invalid_rows="skip")) == 1
