"""``write_roles``: an adapter that writes only some roles' messages (user turns, say). A token adapter then writes the
tokens whose segment id is not −1 and reads, without writing, the others (docs/design.md §1: an unwritten token is
context only), and every path that writes a history (training episodes, evaluation, serving) marks the other roles'
tokens −1 from the chat template's message ids."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import get_peft_model
from transformers import DynamicCache

from peft_deltamem import DeltaMemConfig, MemoryState
from peft_deltamem._compat import cache_kwargs
from peft_deltamem.chat.segments import NOT_WRITTEN, encode_conversation
from peft_deltamem.evaluation.memories import write_memories
from peft_deltamem.evaluation.settings import EvalSettings
from peft_deltamem.evaluation.tasks import Conversation, MemoryTask
from peft_deltamem.serving.window import write_messages
from peft_deltamem.training.episodes import EpisodeOptions, encode_write_history
from tests.helpers import chat_fixtures
from tests.helpers.tiny_models import random_ids, randomize_adapter, tiny_model, tiny_model_for

CHAT = chat_fixtures.sample_conversation(system=True)


def token_model(heads: int = 1, **config):
    config = DeltaMemConfig(
        task_type="CAUSAL_LM",
        num_state_heads=heads,
        init_delta_heads="base_slice",
        delta_heads=["q", "v", "o"],
        **config,
    )
    model = get_peft_model(tiny_model("qwen3", seed=3), config)
    randomize_adapter(model, seed=5, scale=0.4)
    return model.requires_grad_(False).eval()


def prefilled(model, seed: int = 9) -> MemoryState:
    """A memory with something in it, so that reads (and so an unwritten token's logits) are not zero."""
    memory = MemoryState()
    with torch.no_grad():
        model(input_ids=random_ids(1, 6, seed=seed), memory=memory)
    return memory


def runs_of(ids: list[int]) -> list[tuple[bool, int, int]]:
    runs, start = [], 0
    for t in range(1, len(ids) + 1):
        if t == len(ids) or (ids[t] != NOT_WRITTEN) != (ids[start] != NOT_WRITTEN):
            runs.append((ids[start] != NOT_WRITTEN, start, t))
            start = t
    return runs


def split_into_runs(
    model, tokens: torch.Tensor, ids: list[int], memory: MemoryState, read: bool = True
) -> torch.Tensor:
    """The reference: written and unwritten runs as separate calls sharing a KV cache, the unwritten ones read-only
    (``memory_write=False``), as the server writes a message after its context. Returns every token's logits."""
    cache, logits = DynamicCache(), []
    for written, start, end in runs_of(ids):
        out = model(
            input_ids=tokens[:, start:end],
            attention_mask=torch.ones(1, end, dtype=torch.long),
            use_cache=True,
            memory=memory,
            memory_write=written,
            memory_read=read,
            **cache_kwargs(model, cache),
        )
        logits.append(out.logits)
    return torch.cat(logits, dim=1)


@settings(max_examples=12, deadline=None)
@given(written=st.lists(st.booleans(), min_size=2, max_size=14), heads=st.sampled_from([1, 2]))
def test_unwritten_tokens_are_read_but_leave_the_memory_as_separate_read_only_calls_do(written, heads) -> None:
    model = token_model(heads)
    tokens = random_ids(1, len(written), seed=len(written))
    ids = [i if flag else NOT_WRITTEN for i, flag in enumerate(written)]
    one_call, by_runs = prefilled(model), prefilled(model)
    with torch.no_grad():
        logits = model(input_ids=tokens, memory=one_call, memory_segment_ids=torch.tensor([ids])).logits
        expected = split_into_runs(model, tokens, ids, by_runs)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    for key, state in by_runs.states.items():
        torch.testing.assert_close(one_call.states[key], state, atol=1e-5, rtol=1e-5)


def test_a_call_that_writes_no_token_reads_like_a_read_only_call_and_changes_nothing() -> None:
    model = token_model(2)
    tokens = random_ids(2, 7, seed=3)
    memory = prefilled(model)
    memory = MemoryState.cat([memory, memory.clone()])
    before = memory.clone()
    with torch.no_grad():
        skipped = model(input_ids=tokens, memory=memory, memory_segment_ids=torch.full((2, 7), NOT_WRITTEN)).logits
        read_only = model(input_ids=tokens, memory=before.clone(), memory_write=False).logits
        base = model.get_base_model()(input_ids=tokens).logits
    assert all(torch.equal(memory.states[k], v) for k, v in before.states.items())
    torch.testing.assert_close(skipped, read_only, atol=1e-6, rtol=1e-6)
    assert (skipped - base).abs().max() > 1e-3  # the tokens did read the memory: the comparison can fail


def test_without_segment_ids_a_token_adapter_writes_every_token() -> None:
    model = token_model()
    tokens = random_ids(1, 8, seed=2)
    all_ids, none = prefilled(model), prefilled(model)
    with torch.no_grad():
        model(input_ids=tokens, memory=all_ids, memory_segment_ids=torch.arange(8).unsqueeze(0))
        model(input_ids=tokens, memory=none)
    for key, state in none.states.items():
        torch.testing.assert_close(all_ids.states[key], state, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    ("roles", "message"),
    [
        ("user", "a non-empty list"),
        ([], "a non-empty list"),
        (["system"], "system messages are never written"),
        (["user", "bot"], "['user', 'assistant', 'tool']"),
        (["user", "user"], "duplicates"),
    ],
)
def test_bad_write_roles_are_refused_naming_the_field(roles, message) -> None:
    with pytest.raises(ValueError, match="DeltaMemConfig.write_roles") as err:
        DeltaMemConfig(task_type="CAUSAL_LM", write_roles=roles)
    assert message in str(err.value)


def test_write_roles_survive_save_and_load(tmp_path) -> None:
    config = DeltaMemConfig(task_type="CAUSAL_LM", write_roles=("user",))
    assert config.write_roles == ["user"]
    config.save_pretrained(tmp_path)
    assert DeltaMemConfig.from_pretrained(tmp_path).write_roles == ["user"]
    assert DeltaMemConfig(task_type="CAUSAL_LM").write_roles is None


def test_message_ids_mark_the_other_roles_as_not_written() -> None:
    tokenizer = chat_fixtures.qwen3_tokenizer()
    every = encode_conversation(tokenizer, CHAT)
    users = encode_conversation(tokenizer, CHAT, write_roles=["user"])
    assert users.input_ids == every.input_ids
    roles = {i: m["role"] for i, m in enumerate(CHAT)}
    assert {roles[i] for i in set(every.message_ids) - {NOT_WRITTEN}} == {"user", "assistant"}
    for before, after in zip(every.message_ids, users.message_ids, strict=True):
        assert after == (before if before != NOT_WRITTEN and roles[before] == "user" else NOT_WRITTEN)
    assert set(users.sentence_ids) - {NOT_WRITTEN} and all(
        s == NOT_WRITTEN for s, m in zip(users.sentence_ids, users.message_ids, strict=True) if m == NOT_WRITTEN
    )


def test_a_token_write_history_of_some_roles_carries_message_ids() -> None:
    tokenizer = chat_fixtures.qwen3_tokenizer()
    ids, segments = encode_write_history(tokenizer, CHAT, EpisodeOptions())
    assert segments is None  # as before: every token written
    ids_u, segments_u = encode_write_history(tokenizer, CHAT, EpisodeOptions(write_roles=["user"]))
    assert ids_u == ids
    assert segments_u == encode_conversation(tokenizer, CHAT, write_roles=["user"]).message_ids
    truncated = encode_write_history(tokenizer, CHAT, EpisodeOptions(write_roles=["user"], max_write_length=9))
    assert truncated == (ids[-9:], segments_u[-9:])


@pytest.mark.parametrize("reads", [True, False])
def test_evaluation_writes_what_separate_calls_by_runs_write(reads: bool) -> None:
    """Two independent paths: the evaluation's write pass (one call; the system prompt and the assistant's tokens by
    segment ids) and written / unwritten runs as separate calls sharing a KV cache (the server's way; with
    ``reads`` it is the server's own ``write_messages``)."""
    tokenizer = chat_fixtures.qwen3_tokenizer()
    config = DeltaMemConfig(task_type="CAUSAL_LM", num_state_heads=2, write_roles=["user"])
    model = get_peft_model(tiny_model_for(tokenizer, "qwen3"), config)
    randomize_adapter(model, 2, scale=0.3)
    model.requires_grad_(False).eval()
    task = MemoryTask("roles", [Conversation("c0", [CHAT[1:5]], system=CHAT[0]["content"])], [])
    evaluated = write_memories(model, tokenizer, task, EvalSettings(progress=False, write_pass_reads=reads))
    expected = MemoryState()
    if reads:
        assert write_messages(model, tokenizer, expected, CHAT[:5])[1] > 0
    else:
        segmented = encode_conversation(tokenizer, CHAT[:5], write_roles=["user"])
        with torch.no_grad():
            split_into_runs(model, torch.tensor([segmented.input_ids]), segmented.message_ids, expected, read=False)
    assert evaluated.states.keys() == expected.states.keys()
    for key, state in expected.states.items():
        torch.testing.assert_close(evaluated.states[key], state, atol=1e-5, rtol=1e-5)
    model.peft_config["default"].write_roles = None
    try:
        written_all = write_memories(model, tokenizer, task, EvalSettings(progress=False, write_pass_reads=reads))
    finally:
        model.peft_config["default"].write_roles = ["user"]
    assert any((written_all.states[k] - s).abs().max() > 1e-3 for k, s in evaluated.states.items())  # can fail


def test_a_write_of_assistant_turns_only_leaves_the_memory_of_a_user_only_adapter_empty() -> None:
    tokenizer = chat_fixtures.qwen3_tokenizer()
    config = DeltaMemConfig(task_type="CAUSAL_LM", write_roles=["user"])
    model = get_peft_model(tiny_model_for(tokenizer, "qwen3"), config)
    randomize_adapter(model, 2, scale=0.3)
    model.eval()
    memory = MemoryState()
    _, written = write_messages(model, tokenizer, memory, [CHAT[2]])  # an assistant message
    assert CHAT[2]["role"] == "assistant" and written == 0 and memory.is_empty
