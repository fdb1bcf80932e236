"""Request and response bodies of ``deltamem serve``, shaped like OpenAI's Chat Completions API.

Unknown request fields are ignored, as OpenAI's API does; fields we cannot honour (``n`` other than 1, tools) are
refused with an OpenAI-shaped error (:class:`APIError`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "MAX_SESSION_ID",
    "APIError",
    "AssistantMessage",
    "ChatCompletion",
    "ChatCompletionChoice",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatMessage",
    "ChunkChoice",
    "ChunkDelta",
    "ErrorDetail",
    "ErrorResponse",
    "ModelCard",
    "ModelList",
    "SessionDeleted",
    "SessionList",
    "SessionObject",
    "error_body",
]


MAX_SESSION_ID = 128  # characters of a session id (body, header or path)


class APIError(Exception):
    """An error the API reports as ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        """The JSON body of the error response."""
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(
    message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class ChatMessage(BaseModel):
    """One message of the conversation. ``content`` may be a string or a list of text parts."""

    model_config = ConfigDict(extra="ignore", strict=True)

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``; ``session_id`` (an extension, ``extra_body`` in the SDK) picks the memory.

    Strict types, as OpenAI's API and our own OpenAPI schema say: ``"seed": false``, ``"stream": 1`` or
    ``"max_tokens": 3.5`` are refused (400), not coerced (an integer where a number is asked is a number).
    """

    model_config = ConfigDict(extra="ignore", strict=True)

    messages: list[ChatMessage]
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    # A 64-bit integer, as OpenAI's schema says (format int64): torch.manual_seed refuses anything wider.
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int | None = Field(default=None, ge=1)
    session_id: str | None = Field(default=None, min_length=1, max_length=MAX_SESSION_ID)
    user: str | None = None


class Usage(BaseModel):
    """Token counts: ``prompt_tokens`` are the tokens actually in the prompt (the window, not the conversation)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The ``usage`` object."""
    return Usage(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
    ).model_dump()


def completion_body(
    *,
    id: str,
    created: int,
    model: str,
    text: str,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
    session_id: str | None,
) -> dict[str, Any]:
    """A ``chat.completion`` object."""
    choice = {"message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
    body = _chat_object("chat.completion", id, created, model, [choice], usage(prompt_tokens, completion_tokens))
    return {**body, "session_id": session_id}


def chunk_body(
    *,
    id: str,
    created: int,
    model: str,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    usage_: dict[str, int] | None = None,
    choices: bool = True,
) -> dict[str, Any]:
    """A ``chat.completion.chunk`` object (one server-sent event)."""
    choice = {"delta": delta, "finish_reason": finish_reason}
    return _chat_object("chat.completion.chunk", id, created, model, [choice] if choices else [], usage_)


def _chat_object(
    kind: str, id: str, created: int, model: str, choices: list[dict[str, Any]], usage_: dict[str, int] | None
) -> dict[str, Any]:
    """The fields every chat object shares, in OpenAI's order; each choice gets ``index`` and ``logprobs``."""
    return {
        "id": id,
        "object": kind,
        "created": created,
        "model": model,
        "choices": [{"index": i, **c, "logprobs": None} for i, c in enumerate(choices)],
        "usage": usage_,
    }


Role = Literal["system", "developer", "user", "assistant"]


# ----- response bodies, as the OpenAPI schema describes them (the routes build the same shapes as dicts) -------------
class ErrorDetail(BaseModel):
    """What went wrong: a message for people, its ``type``, the request field at fault and a machine-readable code."""

    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error body: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorDetail


class AssistantMessage(BaseModel):
    """The answer's message."""

    role: Literal["assistant"]
    content: str


class ChatCompletionChoice(BaseModel):
    """The one choice of an answer (``n=1``)."""

    index: int
    message: AssistantMessage
    logprobs: None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    """A ``chat.completion`` object (a non-streamed answer)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage
    session_id: str | None


class ChunkDelta(BaseModel):
    """What one streamed chunk adds to the answer (the first carries the role)."""

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    """The one choice of a streamed chunk."""

    index: int
    delta: ChunkDelta
    logprobs: None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionChunk(BaseModel):
    """A ``chat.completion.chunk`` object: the data of one server-sent event (``choices`` empty in the usage chunk)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None


class ModelCard(BaseModel):
    """The served model."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    """``GET /v1/models``."""

    object: Literal["list"]
    data: list[ModelCard]


class SessionObject(BaseModel):
    """A session's public fields (:meth:`SessionInfo.as_dict`), with per-layer memory norms on ``GET`` of one."""

    id: str
    object: Literal["session"]
    created: int
    updated: int
    write_groups: int
    messages_in_memory: int
    tokens_written: int
    imported_memory: bool
    memory_norms: dict[str, float] | None = None


class SessionList(BaseModel):
    """``GET /v1/sessions``: the caller's sessions."""

    object: Literal["list"]
    data: list[SessionObject]


class SessionDeleted(BaseModel):
    """``DELETE /v1/sessions/{id}``."""

    id: str
    object: Literal["session.deleted"]
    deleted: Literal[True]
