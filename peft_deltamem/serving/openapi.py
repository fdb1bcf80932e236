"""The OpenAPI description of ``deltamem serve``: request bodies, limits and every error response.

The chat route parses its body itself (so that a non-UTF-8 body, bad JSON and a body over the size limit each get
their own OpenAI-shaped error, docs/serving.md), which leaves FastAPI nothing to describe. This module writes the
description from the same pydantic models the route validates with, with the server's limits (:class:`ServerConfig`)
as schema bounds, so that ``/openapi.json`` tells a client - and a schema fuzzer (tests/serving/test_fuzz.py) - what
a valid request is and what every answer looks like.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, get_args

from pydantic import BaseModel

from .schemas import MAX_SESSION_ID, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ErrorResponse, Role

if TYPE_CHECKING:
    from fastapi import FastAPI

    from .app import ServerConfig

__all__ = ["chat_operation", "chat_responses", "errors", "install_components", "memory_put_operation"]

_REF = "#/components/schemas/{model}"
_WHY = {
    400: "Invalid request (body, field or limit)",
    401: "Missing or invalid API key",
    404: "No such session (or it belongs to another key)",
    413: "Request body over the size limit",
    429: "Too many open streams",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` entry of a route for the error statuses it can answer, each an :class:`ErrorResponse`."""
    return {status: {"model": ErrorResponse, "description": _WHY[status]} for status in statuses}


def chat_responses() -> dict[int | str, dict[str, Any]]:
    """``responses`` of ``POST /v1/chat/completions``: a completion, or with ``stream`` server-sent events."""
    payload = {"anyOf": [{"$ref": _REF.format(model=m)} for m in ("ChatCompletionChunk", "ErrorResponse")]}
    event = {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {
                "anyOf": [
                    {"const": "[DONE]"},
                    {"type": "string", "contentMediaType": "application/json", "contentSchema": payload},
                ]
            }
        },
        "description": "One server-sent event: a chat.completion.chunk, an error after the stream began, or [DONE].",
    }
    stream = {"text/event-stream": {"schema": event}}
    return {200: {"model": ChatCompletion, "content": stream}, **errors(400, 401, 404, 413, 429)}


def _schema(model: type[BaseModel]) -> tuple[dict[str, Any], dict[str, Any]]:
    schema = model.model_json_schema(ref_template=_REF)
    return schema, schema.pop("$defs", {})


def _bound(prop: dict[str, Any], **bounds: Any) -> None:
    """Add ``bounds`` to the non-null branch of an optional property (pydantic writes ``anyOf: [X, null]``)."""
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") != "null":
            branch.update(bounds)


def chat_operation(config: ServerConfig) -> dict[str, Any]:
    """``openapi_extra`` of ``POST /v1/chat/completions``: the request body with the server's limits, the header."""
    schema, defs = _schema(ChatCompletionRequest)
    props = schema["properties"]
    props["messages"].update(minItems=1, maxItems=config.max_messages)
    _bound(props["max_tokens"], maximum=config.max_tokens_limit)
    _bound(props["max_completion_tokens"], maximum=config.max_tokens_limit)
    _bound(props["n"], maximum=1)
    for branch in props["stop"]["anyOf"]:
        if branch.get("type") == "array":
            branch["maxItems"] = 4
    message = defs["ChatMessage"]["properties"]
    message["role"] = {"type": "string", "enum": list(get_args(Role)), "title": "Role"}
    text_parts = {
        "type": "object",
        "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
        "required": ["type", "text"],
    }  # the only content parts understood; a message without text is refused
    message["content"] = {"anyOf": [{"type": "string"}, {"type": "array", "items": text_parts}], "title": "Content"}
    defs["ChatMessage"]["required"] = ["role", "content"]
    return {
        "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
        "parameters": [
            {
                "name": "X-Session-Id",
                "in": "header",
                "required": False,
                "description": "The session whose memory the request reads and writes (or `session_id` in the body); "
                "empty = none.",
                "schema": {"type": "string", "maxLength": MAX_SESSION_ID},
            }
        ],
        "x-components": {
            **defs,
            **_schema(ChatCompletionChunk)[1],
            "ChatCompletionChunk": _schema(ChatCompletionChunk)[0],
        },
    }


def memory_put_operation() -> dict[str, Any]:
    """``openapi_extra`` of ``PUT /v1/sessions/{id}/memory``: the body is a file written by ``MemoryState.save``."""
    binary = {"schema": {"type": "string", "format": "binary"}}
    return {"requestBody": {"required": True, "content": {"application/octet-stream": binary}}}


def install_components(app: FastAPI) -> None:
    """Make ``app.openapi()`` move the models the routes' ``openapi_extra`` refer to into ``components.schemas``."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = copy.deepcopy(build())
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                components.update(operation.pop("x-components", {}))
                # FastAPI documents a 422 for routes with parameters; this server answers 400 for every bad request
                operation.get("responses", {}).pop("422", None)
        for unused in ("HTTPValidationError", "ValidationError"):
            components.pop(unused, None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
