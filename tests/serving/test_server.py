"""``deltamem serve`` through the official ``openai`` client against a real uvicorn server on 127.0.0.1 (tiny model).

Drop-in semantics (docs/design.md §8), rewinds, streaming, concurrency and batching, sessions, metrics.
"""

from __future__ import annotations

import concurrent.futures as cf

import httpx
import pytest
import torch

from peft_deltamem import MemoryState
from peft_deltamem.chat.session import MemorySession
from peft_deltamem.serving.app import ServerConfig, create_app
from peft_deltamem.serving.engine import TransformersEngine
from peft_deltamem.serving.store import SessionStore, memory_from_bytes
from peft_deltamem.serving.window import plan_window, write_messages
from tests.helpers.chat_fixtures import llama3_tokenizer, qwen3_tokenizer, smollm2_tokenizer
from tests.helpers.serving import ServerThread, served_model

SYSTEM = {"role": "system", "content": "Be brief."}
USER_TURNS = [
    "My cat is called Tom.",
    "Remember this: the secret code is blue seven.",
    "I live in Paris, the capital of France.",
    "What is the name of my cat?",
    "What is the secret code?",
    "Where do I live?",
]
GREEDY = {"max_tokens": 6, "temperature": 0}


@pytest.fixture(scope="module")
def model():
    return served_model()


def serve(model, tmp_path, tokenizer=None, **config):
    engine = TransformersEngine(model, tokenizer or qwen3_tokenizer(), model_id="tiny", max_wait_s=0.05)
    return ServerThread(create_app(engine, SessionStore(tmp_path / "sessions.db"), ServerConfig(**config)))


def server_memory(server: ServerThread, session_id: str, key: str = "none") -> MemoryState:
    response = httpx.get(f"{server.url}/v1/sessions/{session_id}/memory", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    return memory_from_bytes(response.content)


def reference_memory(model, groups) -> MemoryState:
    """A fresh memory fed the write groups in order, as a fresh session fed the conversation."""
    engine_memory = MemoryState()
    for group in groups:
        write_messages(model, qwen3_tokenizer(), engine_memory, group)
    return engine_memory


def same(a: MemoryState, b: MemoryState) -> bool:
    if b.is_empty:
        return all(not v.any() for v in a.states.values())
    return a.states.keys() == b.states.keys() and all(torch.equal(a.states[k], b.states[k]) for k in a.states)


def chat(client, messages, session_id=None, **kwargs):
    extra = {"session_id": session_id} if session_id else None
    return client.chat.completions.create(model="tiny", messages=messages, extra_body=extra, **{**GREEDY, **kwargs})


def prompt_tokens(messages, tok=None) -> int:
    tok = tok or qwen3_tokenizer()
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tok(text, add_special_tokens=False)["input_ids"])


# ----------------------------------------------------------------------------------------------------------------
# Drop-in semantics
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tokenizer", "keep_last"),
    [(qwen3_tokenizer, 0), (qwen3_tokenizer, 3), (smollm2_tokenizer, 1), (llama3_tokenizer, 2)],
    ids=["qwen3-0", "qwen3-3", "smollm2-1", "llama3-2"],
)
def test_full_conversations_give_the_answers_and_memory_of_a_memory_session(
    model, tmp_path, tokenizer, keep_last
) -> None:
    tok = tokenizer()
    session = MemorySession(model, tok, keep_last=keep_last, system=SYSTEM["content"])
    conversation = [SYSTEM]
    with serve(model, tmp_path, tok, keep_last=keep_last) as server:
        client = server.client()
        for text in USER_TURNS[:4]:
            conversation.append({"role": "user", "content": text})
            response = chat(client, conversation, "drop-in")
            plan = plan_window(conversation, keep_last)
            # the prompt holds system + the window + the new turn only
            assert response.usage.prompt_tokens == prompt_tokens(plan.prompt, tok)
            assert len(plan.window) == min(keep_last, len(conversation) - 2)
            assert same(server_memory(server, "drop-in"), session.memory)  # what the session held when answering
            answer = session.reply(text, max_new_tokens=GREEDY["max_tokens"], do_sample=False)
            assert response.choices[0].message.content == answer
            conversation.append({"role": "assistant", "content": answer})
        info = httpx.get(f"{server.url}/v1/sessions/drop-in").json()
        assert info["messages_in_memory"] == len(conversation) - 3 - keep_last  # all but the window and the last turn
        assert len(info["memory_norms"]) == 2 and all(v > 0 for v in info["memory_norms"].values())


def test_a_request_without_a_session_is_stateless(model, tmp_path) -> None:
    conversation = [SYSTEM, {"role": "user", "content": USER_TURNS[0]}, {"role": "assistant", "content": "Ok."}]
    conversation.append({"role": "user", "content": USER_TURNS[3]})
    with serve(model, tmp_path) as server:
        client = server.client()
        first, second = chat(client, conversation), chat(client, conversation)
        assert first.choices[0].message.content == second.choices[0].message.content
        assert httpx.get(f"{server.url}/v1/sessions").json()["data"] == []
        with_session = chat(client, conversation, "s")
        assert with_session.choices[0].message.content == first.choices[0].message.content


# ----------------------------------------------------------------------------------------------------------------
# Rewind
# ----------------------------------------------------------------------------------------------------------------


def test_an_edited_turn_rewinds_and_a_branch_returns_exactly(model, tmp_path) -> None:
    conversation = [SYSTEM]
    for i, text in enumerate(USER_TURNS):
        conversation += [{"role": "user", "content": text}, {"role": "assistant", "content": f"Noted {i}."}]
    question = {"role": "user", "content": "Tell me everything."}
    edited = [dict(m) for m in conversation]
    edited[5] = {"role": "user", "content": "I live in Rome."}  # the user message of turn 3 of 6
    with serve(model, tmp_path, keep_last=1) as server:
        client = server.client()
        chat(client, [*conversation, question], "r")
        original = server_memory(server, "r")
        assert same(original, reference_memory(model, plan_window([*conversation, question], 1).groups))

        chat(client, [*edited, question], "r")
        assert same(server_memory(server, "r"), reference_memory(model, plan_window([*edited, question], 1).groups))
        assert not same(server_memory(server, "r"), original)

        chat(client, [*conversation, question], "r")  # back to the first branch
        assert same(server_memory(server, "r"), original)
        metrics = httpx.get(f"{server.url}/metrics").text
        assert "deltamem_rewinds_total 2.0" in metrics


# ----------------------------------------------------------------------------------------------------------------
# Streaming
# ----------------------------------------------------------------------------------------------------------------


def test_streamed_chunks_concatenate_to_the_answer(model, tmp_path) -> None:
    conversation = [SYSTEM, {"role": "user", "content": USER_TURNS[0]}]
    with serve(model, tmp_path) as server:
        client = server.client()
        whole = chat(client, conversation, max_tokens=12).choices[0].message.content
        chunks = list(
            client.chat.completions.create(
                model="tiny",
                messages=conversation,
                stream=True,
                max_tokens=12,
                temperature=0,
                stream_options={"include_usage": True},
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole and len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
        assert chunks[0].choices[0].delta.role == "assistant"
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
        assert chunks[-1].usage.prompt_tokens == prompt_tokens(conversation)
        raw = httpx.post(
            f"{server.url}/v1/chat/completions", json={"messages": conversation, "stream": True, "max_tokens": 3}
        )
        assert raw.text.rstrip().endswith("data: [DONE]")


# ----------------------------------------------------------------------------------------------------------------
# Concurrency
# ----------------------------------------------------------------------------------------------------------------


def test_concurrent_sessions_answer_as_alone_and_are_batched(model, tmp_path) -> None:
    conversations = {
        f"c{i}": [
            {"role": "user", "content": USER_TURNS[i % 3]},
            {"role": "assistant", "content": f"Ok {i}."},
            {"role": "user", "content": USER_TURNS[3 + i % 3]},
        ]
        for i in range(8)
    }
    with serve(model, tmp_path) as server:
        client = server.client()
        alone = {sid: chat(client, conv, sid).choices[0].message.content for sid, conv in conversations.items()}
        engine = server.server.config.app.state.server.engine
        engine.batches.clear()
        with cf.ThreadPoolExecutor(len(conversations)) as pool:
            futures = {sid: pool.submit(chat, client, conv, sid) for sid, conv in conversations.items()}
            together = {sid: f.result(timeout=120).choices[0].message.content for sid, f in futures.items()}
        assert together == alone
        assert max(engine.batches) > 1  # some requests shared a generation
        assert "deltamem_batch_size_count" in httpx.get(f"{server.url}/metrics").text


def test_one_session_hit_concurrently_keeps_arrival_order(model, tmp_path) -> None:
    base = [{"role": "user", "content": USER_TURNS[0]}, {"role": "assistant", "content": "Ok."}]
    with serve(model, tmp_path) as server:
        client = server.client()
        with cf.ThreadPoolExecutor(4) as pool:
            futures = []
            for i in range(4):
                futures.append(pool.submit(chat, client, [*base, {"role": "user", "content": f"q{i}"}], "same"))
            [f.result(timeout=120) for f in futures]
        # whatever the order, the memory is a function of the conversation: the shared first turn only
        assert same(server_memory(server, "same"), reference_memory(model, [base]))
        assert httpx.get(f"{server.url}/v1/sessions/same").json()["write_groups"] == 1


def test_streams_in_one_batch_each_give_their_answer_and_a_disconnect_leaves_the_session_consistent(
    model, tmp_path
) -> None:
    conversations = [[{"role": "user", "content": text}] for text in USER_TURNS[:4]]
    with serve(model, tmp_path) as server:
        client = server.client()
        alone = [chat(client, conv, max_tokens=10).choices[0].message.content for conv in conversations]
        engine = server.server.config.app.state.server.engine
        engine.batches.clear()

        def streamed(conv):
            stream = client.chat.completions.create(
                model="tiny", messages=conv, stream=True, max_tokens=10, temperature=0
            )
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

        with cf.ThreadPoolExecutor(4) as pool:
            assert list(pool.map(streamed, conversations, timeout=120)) == alone
        assert max(engine.batches) > 1

        # A client that goes away mid-stream: the request's writes are committed, its partial answer never written.
        history = [{"role": "user", "content": USER_TURNS[0]}, {"role": "assistant", "content": "Ok."}]
        body = {"messages": [*history, {"role": "user", "content": "?"}], "stream": True, "max_tokens": 50}
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**body, "session_id": "gone"}) as r:
            next(r.iter_lines())
        # (the next request of the session waits for the abandoned answer: only then is the model free for the test)
        assert chat(client, body["messages"], "gone").choices[0].finish_reason in ("stop", "length")
        assert same(server_memory(server, "gone"), reference_memory(model, [history]))
        assert httpx.get(f"{server.url}/v1/sessions/gone").json()["write_groups"] == 1


def test_sampling_with_a_seed_is_reproducible_and_models_and_metrics_answer(model, tmp_path) -> None:
    conversation = [{"role": "user", "content": USER_TURNS[0]}]
    with serve(model, tmp_path) as server:
        client = server.client()
        sampled = [
            chat(client, conversation, temperature=1.0, top_p=0.9, seed=7, max_tokens=8).choices[0].message.content
            for _ in range(2)
        ]
        assert sampled[0] == sampled[1]
        stopped = chat(client, conversation, max_tokens=12, stop=["e"]).choices[0]
        assert "e" not in stopped.message.content
        assert [m.id for m in client.models.list()] == ["tiny"]
        metrics = httpx.get(f"{server.url}/metrics").text
        for name in ("deltamem_requests_total", "deltamem_prompt_tokens_total", "deltamem_completion_tokens_total"):
            assert name in metrics


def test_a_stream_batched_with_a_longer_request_stops_at_its_own_max_tokens(model, tmp_path) -> None:
    conversation = [{"role": "user", "content": USER_TURNS[1]}]
    with serve(model, tmp_path) as server:
        client = server.client()
        short = chat(client, conversation, max_tokens=3).choices[0].message.content

        def streamed():
            stream = client.chat.completions.create(
                model="tiny", messages=conversation, stream=True, max_tokens=3, temperature=0
            )
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

        with cf.ThreadPoolExecutor(2) as pool:
            long = pool.submit(chat, client, [{"role": "user", "content": USER_TURNS[2]}], None, max_tokens=20)
            assert pool.submit(streamed).result(timeout=120) == short
            long.result(timeout=120)
