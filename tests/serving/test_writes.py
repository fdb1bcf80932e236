"""Batched writes (``serving.writes.write_groups``): the groups of several sessions written in one forward give each
memory what writing it alone gives, for groups of different lengths, memories already written and every granularity."""

from __future__ import annotations

import time

import pytest
import torch
from peft import get_peft_model

from peft_deltamem import DeltaMemConfig, MemoryState
from peft_deltamem._padding import pad_token_id
from peft_deltamem.serving.engine import TransformersEngine
from peft_deltamem.serving.window import write_messages
from peft_deltamem.serving.writes import write_groups
from tests.helpers import chat_fixtures
from tests.helpers.serving import served_model
from tests.helpers.tiny_models import randomize_adapter, tiny_model_for

CHAT = chat_fixtures.sample_conversation(system=False)
GROUPS = [  # different lengths: one message, a turn, two turns, a long single message
    CHAT[:1],
    CHAT[2:4],
    CHAT[:4],
    [{"role": "user", "content": "A much longer message, " * 12 + "to make this row the widest of the batch."}],
]


def model_for(tokenizer, granularity: str):
    config = DeltaMemConfig(task_type="CAUSAL_LM", write_granularity=granularity)
    model = get_peft_model(tiny_model_for(tokenizer, "qwen3"), config)
    randomize_adapter(model, 1, scale=0.3)
    return model.requires_grad_(False).eval()


def written_alone(model, tokenizer, memory, group):
    memory = memory.clone()
    tokens = write_messages(model, tokenizer, memory, group)[1]
    return memory, tokens


@pytest.mark.parametrize(
    ("tokenizer", "granularity"),
    [
        ("qwen3_tokenizer", "token"),  # no context before the messages: one call
        ("smollm2_tokenizer", "token"),  # a default system prompt as read-only context: two calls, one KV cache
        ("llama3_tokenizer", "token"),  # a date block as context, of the same length in every row
        ("smollm2_tokenizer", "message"),
        ("qwen3_tokenizer", "sentence"),
    ],
)
def test_a_batched_write_equals_writing_each_alone(tokenizer, granularity) -> None:
    tokenizer = getattr(chat_fixtures, tokenizer)()
    model = model_for(tokenizer, granularity)
    empty = MemoryState()
    model(input_ids=torch.tensor([[pad_token_id(tokenizer)]]), memory=empty, memory_write=True)  # sizes it
    empty = empty.zeros_like()
    # memories already written, each differently (the first one still empty)
    start = [empty] + [written_alone(model, tokenizer, empty, CHAT[4 : 5 + i % 2])[0] for i in range(len(GROUPS) - 1)]
    batched = write_groups(model, tokenizer, start, GROUPS, pad_id=pad_token_id(tokenizer))
    for memory, group, (got, tokens) in zip(start, GROUPS, batched, strict=True):
        want, want_tokens = written_alone(model, tokenizer, memory, group)
        assert tokens == want_tokens > 0
        assert got.batch_size == 1 and got.layout == want.layout
        for layer in want.layout.layers:
            assert not torch.equal(want.states[layer], memory.states[layer])  # the write changed the memory
            torch.testing.assert_close(got.states[layer], want.states[layer], atol=1e-5, rtol=0)


def test_the_engine_batches_writes_that_arrive_together() -> None:
    tokenizer = chat_fixtures.qwen3_tokenizer()
    engine = TransformersEngine(served_model(), tokenizer, max_wait_s=0.5)
    try:
        futures = [engine.submit_write(None, group) for group in GROUPS]
        results = [f.result(timeout=120) for f in futures]
        assert max(engine.write_batches) > 1  # written in one forward
        for group, (got, tokens) in zip(GROUPS, results, strict=True):
            want, want_tokens = written_alone(engine.model, tokenizer, engine.template, group)
            assert tokens == want_tokens
            for layer in want.layout.layers:
                torch.testing.assert_close(got.states[layer], want.states[layer], atol=1e-5, rtol=0)
        # a bad group fails alone; the group it was batched with is written all the same
        bad, good = (engine.submit_write(None, g) for g in ([{"role": "wizard", "content": "?"}], GROUPS[1]))
        assert isinstance(bad.exception(timeout=120), ValueError)
        assert good.result(timeout=120)[1] == results[1][1]
    finally:
        engine.shutdown()


def test_a_burst_spread_over_more_than_the_wait_still_shares_one_batch() -> None:
    # Each arrival restarts the wait: five writes 0.15 s apart (0.6 s from first to last) share one forward under a
    # 0.4 s wait, as a burst of clients does whose requests reach the engine a few milliseconds apart.
    tokenizer = chat_fixtures.qwen3_tokenizer()
    engine = TransformersEngine(served_model(), tokenizer, max_wait_s=0.4)
    try:
        engine.submit_write(None, GROUPS[0]).result(timeout=120)  # warm-up, alone
        futures = []
        for i in range(5):
            futures.append(engine.submit_write(None, GROUPS[i % len(GROUPS)]))
            time.sleep(0.15)
        for future in futures:
            future.result(timeout=120)
        assert list(engine.write_batches)[1:] == [5]
    finally:
        engine.shutdown()
