"""Bounded fuzzing of ``POST /v1/chat/completions`` (hypothesis): random bodies, near-valid requests and raw bytes never
give a 5xx, every error is OpenAI-shaped, and the store stays sound."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peft_deltamem.serving.app import ServerConfig, create_app
from peft_deltamem.serving.engine import TransformersEngine
from peft_deltamem.serving.store import SessionStore
from tests.helpers.chat_fixtures import qwen3_tokenizer
from tests.helpers.serving import ServerThread, served_model

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
ROLES = st.sampled_from(["system", "developer", "user", "assistant", "tool", "function", "", "USER"])
CONTENT = st.text(max_size=40) | st.none() | st.integers() | st.lists(st.dictionaries(st.sampled_from(["type", "text"]), st.text(max_size=8) | st.sampled_from(["text"]), max_size=2), max_size=2)  # fmt: skip
MESSAGE = st.fixed_dictionaries({"role": ROLES, "content": CONTENT}) | st.dictionaries(
    st.text(max_size=6), JSON, max_size=3
)
FIELDS = {
    "messages": st.lists(MESSAGE, max_size=5) | JSON,
    "max_tokens": st.integers(-3, 40) | JSON,
    "temperature": st.floats(-1, 3, allow_nan=False) | JSON,
    "top_p": st.floats(-1, 2, allow_nan=False),
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=6) | JSON,
    "seed": st.integers(-5, 2**70) | JSON,
    "stream": st.booleans() | JSON,
    "n": st.integers(-1, 3),
    "session_id": st.text(max_size=140) | JSON,
    "stream_options": JSON,
}
NEAR_VALID = st.fixed_dictionaries({}, optional=FIELDS)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    engine = TransformersEngine(served_model(), qwen3_tokenizer(), model_id="tiny")
    store = SessionStore(tmp_path_factory.mktemp("fuzz") / "s.db")
    config = ServerConfig(max_tokens_limit=4, max_prompt_tokens=300, max_messages=6, max_body_bytes=4096)
    with ServerThread(create_app(engine, store, config)) as running:
        running.store = store
        yield running


def check(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text
    if response.status_code != 200:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)


def send(server, content: bytes) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    return httpx.post(f"{server.url}/v1/chat/completions", content=content, headers=headers, timeout=60)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(body=NEAR_VALID | JSON)
def test_random_bodies_never_break_the_server(server, body) -> None:
    check(send(server, json.dumps(body).encode()))


@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(content=st.binary(max_size=200))
def test_random_bytes_never_break_the_server(server, content) -> None:
    check(send(server, content))


def test_the_store_is_sound_after_fuzzing(server) -> None:
    assert server.store.integrity_check() == "ok"
    for info in server.store.list(""):
        assert len(server.store.chain(info.id)) == info.groups
