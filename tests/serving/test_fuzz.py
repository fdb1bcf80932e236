"""Bounded fuzzing of ``deltamem serve`` from its own OpenAPI schema (schemathesis): every route, valid and invalid
requests generated from ``/openapi.json``, never a 5xx, every error OpenAI-shaped, answers as the schema says, and the
store sound afterwards. Raw bytes (which no schema describes) are fuzzed with hypothesis."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from peft_deltamem.serving.app import ServerConfig, create_app
from peft_deltamem.serving.engine import TransformersEngine
from peft_deltamem.serving.store import SessionStore
from tests.helpers.chat_fixtures import qwen3_tokenizer
from tests.helpers.serving import ServerThread, served_model

# Every check schemathesis has, with two settings: a schema-valid request may still be refused (the last message must
# be a user message, the prompt must fit max_prompt_tokens: rules a JSON schema cannot state), and an invalid one may
# be refused for its size (413) before it is read.
CONFIG = schemathesis.Config.from_dict(
    {
        "checks": {
            "positive_data_acceptance": {"enabled": False},
            "negative_data_rejection": {"expected-statuses": [400, 401, 404, 413, 429]},
        }
    }
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    engine = TransformersEngine(served_model(), qwen3_tokenizer(), model_id="tiny")
    store = SessionStore(tmp_path_factory.mktemp("fuzz") / "s.db")
    config = ServerConfig(max_tokens_limit=4, max_prompt_tokens=300, max_messages=6, max_body_bytes=4096)
    with ServerThread(create_app(engine, store, config)) as running:
        running.store = store
        yield running


@pytest.fixture(scope="module")
def api(server):
    return schemathesis.openapi.from_url(server.url + "/openapi.json", config=CONFIG)


def openai_shaped_error(ctx, response, case) -> None:
    """Every error answer is ``{"error": {"message", "type", "param", "code"}}`` with a message."""
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"]


def fuzz(operations, mode: GenerationMode, examples: int) -> int:
    """Send ``examples`` generated requests to ``operations``; each answer passes every check; the count sent."""
    sent = []

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(case=operations.as_strategy(generation_mode=mode))
    def run(case) -> None:
        sent.append(case.operation.label)
        case.call_and_validate(timeout=60, additional_checks=[openai_shaped_error])

    run()
    return len(sent)


def test_the_schema_describes_the_requests(server) -> None:
    schema = httpx.get(f"{server.url}/openapi.json").json()
    chat = schema["paths"]["/v1/chat/completions"]["post"]
    body = chat["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["messages"] and body["properties"]["messages"]["maxItems"] == 6
    assert body["properties"]["max_tokens"]["anyOf"][0]["maximum"] == 4  # the server's limit
    assert schema["components"]["schemas"]["ChatMessage"]["properties"]["role"]["enum"][0] == "system"
    assert set(chat["responses"]) == {"200", "400", "401", "404", "413", "429"}
    for path in schema["paths"].values():
        for operation in path.values():
            for status, response in operation["responses"].items():
                if status != "200":
                    assert response["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_chat_completions_fuzzed_from_the_schema(api, mode) -> None:
    assert fuzz(api["/v1/chat/completions"]["POST"], mode, 80) >= 40


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_every_route_fuzzed_from_the_schema(api, mode) -> None:
    assert fuzz(api, mode, 40) >= 20


@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(content=st.binary(max_size=200))
def test_random_bytes_never_break_the_server(server, content) -> None:
    headers = {"Content-Type": "application/json"}
    response = httpx.post(f"{server.url}/v1/chat/completions", content=content, headers=headers, timeout=60)
    assert response.status_code < 500, response.text
    if response.status_code != 200:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_the_store_is_sound_after_fuzzing(server) -> None:
    assert server.store.integrity_check() == "ok"
    for info in server.store.list(""):
        assert len(server.store.chain(info.id)) == info.groups
