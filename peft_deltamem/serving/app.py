"""The FastAPI app of ``deltamem serve``: OpenAI's chat completions with a δ-mem memory per session.

:func:`create_app` wires an :class:`~peft_deltamem.serving.engine.Engine`, a
:class:`~peft_deltamem.serving.store.SessionStore` and :class:`ServerConfig` into the routes. What a request does
(docs/design.md §8): the conversation it sends is split by :func:`~peft_deltamem.serving.window.plan_window` into write
groups (everything that has left the prompt window), the window and the new turn; the session's memory keeps the
longest prefix of groups it has already written (rewinding to the snapshot after them), writes the rest, commits them
with their snapshots, and the answer is generated from system + window + turn, reading the memory. The server never
writes its own answer: it is written when the client sends it back and it leaves the window.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, GenerationJob, SamplingParams
from .metrics import Metrics
from .openapi import chat_operation, chat_responses, errors, install_components, memory_put_operation
from .schemas import (
    MAX_SESSION_ID,
    APIError,
    ChatCompletionRequest,
    ModelList,
    SessionDeleted,
    SessionList,
    SessionObject,
    chunk_body,
    completion_body,
    error_body,
    usage,
)
from .store import SessionStore, WrittenGroup, memory_from_bytes, memory_to_bytes
from .window import common_prefix, group_hashes, plan_window

__all__ = ["ServerConfig", "create_app"]

log = logging.getLogger("peft_deltamem.serving")


@dataclass
class ServerConfig:
    """The server's settings and limits (each limit refused with an OpenAI-shaped error, changing nothing)."""

    keep_last: int = 0
    api_keys: tuple[str, ...] = ()
    max_body_bytes: int = 1 << 20
    max_messages: int = 512
    max_prompt_tokens: int = 4096
    max_tokens_limit: int = 2048
    default_max_tokens: int = 256
    max_open_streams: int = 64


_GREEDY_BELOW = 1e-5  # a temperature under this decodes greedily


def _owner(key: str | None) -> str:
    return "" if key is None else hashlib.sha256(key.encode()).hexdigest()[:32]


def _error_param(body: Any, location: tuple[str | int, ...]) -> str | None:
    """The request field a validation error names, as ``messages[0].content``: the error's location followed only as
    far as it indexes into the body (pydantic appends the union member it tried, e.g. ``.str``, which is no field)."""
    param, node = "", body
    for part in location:
        if isinstance(part, int) and isinstance(node, list) and 0 <= part < len(node):
            param, node = f"{param}[{part}]", node[part]
        elif isinstance(part, str) and isinstance(node, dict):
            param = f"{param}.{part}" if param else part
            if part not in node:  # a missing field is named too (``messages`` of ``{}``), and nothing after it
                break
            node = node[part]
        else:  # the union tag after a present value: no field of the body
            break
    return param or None


class _Server:
    """The state behind the routes: engine, store, settings, per-session locks, open streams, metrics."""

    def __init__(self, engine: Engine, store: SessionStore, config: ServerConfig) -> None:
        self.engine, self.store, self.config = engine, store, config
        self.metrics = Metrics(store)
        self.locks: dict[str, asyncio.Lock] = {}
        self.open_streams = 0

    # ----- request parsing -----------------------------------------------------------------------------------------
    def authenticate(self, request: Request) -> str:
        if not self.config.api_keys:
            return _owner(None)
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or key.strip() not in self.config.api_keys:
            raise APIError(401, "Missing or invalid API key (Authorization: Bearer KEY).", code="invalid_api_key")
        return _owner(key.strip())

    async def body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.config.max_body_bytes:
            raise APIError(413, f"Request body over {self.config.max_body_bytes} bytes.", code="body_too_large")
        data = await request.body()
        if len(data) > self.config.max_body_bytes:
            raise APIError(413, f"Request body over {self.config.max_body_bytes} bytes.", code="body_too_large")
        return data

    async def json_body(self, request: Request) -> Any:
        data = await self.body(request)
        try:
            return json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise APIError(400, f"The request body is not UTF-8 ({err.reason}).", code="invalid_body") from err
        except ValueError as err:
            raise APIError(400, f"The request body is not valid JSON ({err}).", code="invalid_json") from err

    def messages(self, req: ChatCompletionRequest) -> list[dict[str, str]]:
        out = []
        if not req.messages:
            raise APIError(400, "messages must hold at least one message.", param="messages", code="empty_messages")
        if len(req.messages) > self.config.max_messages:
            raise APIError(
                400, f"{len(req.messages)} messages, over the limit of {self.config.max_messages}.", param="messages"
            )
        for i, m in enumerate(req.messages):
            role = "system" if m.role == "developer" else m.role
            if role not in ("system", "user", "assistant"):
                raise APIError(
                    400,
                    f"messages[{i}]: role {m.role!r} is not supported (system, developer, user, assistant).",
                    param=f"messages[{i}].role",
                    code="unsupported_role",
                )
            content = m.content
            if isinstance(content, list):
                parts = []
                for part in content:
                    if part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise APIError(
                            400,
                            f"messages[{i}]: only text content parts are supported.",
                            param=f"messages[{i}].content",
                        )
                    parts.append(part["text"])
                content = "".join(parts)
            if not isinstance(content, str):
                raise APIError(400, f"messages[{i}] has no text content.", param=f"messages[{i}].content")
            out.append({"role": role, "content": content})
        if out[-1]["role"] != "user":
            raise APIError(400, "The last message must be a user message.", param="messages", code="last_not_user")
        return out

    def params(self, req: ChatCompletionRequest) -> SamplingParams:
        if req.n not in (None, 1):
            raise APIError(400, "Only n=1 is supported.", param="n")
        max_tokens = req.max_completion_tokens or req.max_tokens
        max_tokens = max_tokens or min(self.config.default_max_tokens, self.config.max_tokens_limit)
        if max_tokens > self.config.max_tokens_limit:
            raise APIError(
                400, f"max_tokens {max_tokens} is over the limit of {self.config.max_tokens_limit}.", param="max_tokens"
            )
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        if len(stop) > 4:
            raise APIError(400, "At most 4 stop sequences.", param="stop")
        temperature = 1.0 if req.temperature is None else req.temperature
        if temperature < _GREEDY_BELOW:  # logits / 1e-320 overflow to inf (a 500); so small a temperature is greedy
            temperature = 0.0
        return SamplingParams(max_tokens, temperature, 1.0 if req.top_p is None else req.top_p, stop, req.seed)

    def session_of(self, session_id: str, owner: str) -> None:
        """404 if the session exists but belongs to another key."""
        if self.store.exists(session_id) and self.store.info(session_id, owner) is None:
            raise APIError(404, f"No session {session_id!r}.", param="session_id", code="session_not_found")

    # ----- the memory of a request ---------------------------------------------------------------------------------
    def _commit(self, session_id: str, owner: str, keep: int, new: list[tuple]) -> None:
        """Commit ``new`` (hash, group, tokens, memory) after the first ``keep`` groups, each with its snapshot."""
        groups = [WrittenGroup(digest, group, tokens, memory_to_bytes(memory)) for digest, group, tokens, memory in new]
        self.store.commit(session_id, owner, keep, groups)

    async def prepare_memory(self, session_id: str | None, owner: str, groups: list[list[dict]]) -> Any:
        """Rewind to the longest written prefix of ``groups``, write the rest, commit; return the memory (or None)."""
        hashes = group_hashes(groups)
        keep, memory, written = 0, None, []
        if session_id is not None:
            written = await asyncio.to_thread(self.store.chain, session_id)
            keep = common_prefix(written, hashes)
            snapshot = await asyncio.to_thread(self.store.snapshot, session_id, keep)
            memory = memory_from_bytes(snapshot) if snapshot is not None else None
            if keep < len(written):
                self.metrics.rewinds.inc()
        new = []  # (hash, group, tokens, memory after it)
        for group, digest in zip(groups[keep:], hashes[keep:], strict=True):
            memory, tokens = await asyncio.wrap_future(self.engine.submit_write(memory, group))
            self.metrics.memory_writes.inc()
            self.metrics.tokens_written.inc(tokens)
            new.append((digest, group, tokens, memory))
        if session_id is not None and (new or keep < len(written) or not self.store.exists(session_id)):
            try:
                # Serialising the snapshots runs beside the commit, off the event loop: other sessions' requests
                # reach the engine meanwhile and share its next batch.
                await asyncio.to_thread(self._commit, session_id, owner, keep, new)
            except PermissionError as err:
                raise APIError(
                    404, f"No session {session_id!r}.", param="session_id", code="session_not_found"
                ) from err
        return memory

    async def chat(self, request: Request) -> Response:
        owner = self.authenticate(request)
        raw = await self.json_body(request)
        try:
            req = ChatCompletionRequest.model_validate(raw)
        except ValidationError as err:
            first = err.errors()[0]
            param = _error_param(raw, first.get("loc", ()))
            raise APIError(400, f"Invalid request: {param}: {first.get('msg')}", param=param) from err
        messages, params = self.messages(req), self.params(req)
        header = request.headers.get("x-session-id") or None
        session_id = req.session_id or header  # the body's field wins; a bad header is refused all the same
        if header is not None and len(header) > MAX_SESSION_ID:  # as the body's field is checked
            raise APIError(
                400,
                f"The session id is over {MAX_SESSION_ID} characters.",
                param="X-Session-Id",
                code="invalid_session_id",
            )
        if session_id is not None:
            self.session_of(session_id, owner)
        plan = plan_window(messages, self.config.keep_last)
        prompt_ids = self.engine.encode_prompt(plan.prompt)
        if len(prompt_ids) > self.config.max_prompt_tokens:
            raise APIError(
                400,
                f"The prompt (system + last {self.config.keep_last} messages + the new turn) has {len(prompt_ids)} "
                f"tokens, over the limit of {self.config.max_prompt_tokens}.",
                param="messages",
                code="context_length_exceeded",
            )
        if req.stream and self.open_streams >= self.config.max_open_streams:
            raise APIError(429, "Too many open streams; retry later.", type="rate_limit_error", code="too_many_streams")
        lock = self.locks.setdefault(session_id, asyncio.Lock()) if session_id is not None else None
        if lock is not None:
            await lock.acquire()
        try:
            memory = await self.prepare_memory(session_id, owner, plan.groups)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        model = req.model or self.engine.model_id
        self.metrics.prompt_tokens.inc(len(prompt_ids))
        if not req.stream:
            try:
                job = GenerationJob(prompt_ids, memory, params)
                result = await asyncio.wrap_future(self.engine.submit_generate(job))
            finally:
                if lock is not None:
                    lock.release()
            self.metrics.observe(result)
            body = completion_body(
                id=completion_id,
                created=created,
                model=model,
                text=result.text,
                finish_reason=result.finish_reason,
                prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens,
                session_id=session_id,
            )
            return JSONResponse(body)
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        return StreamingResponse(
            self.stream(prompt_ids, memory, params, lock, completion_id, created, model, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def stream(
        self,
        prompt_ids: list[int],
        memory: Any,
        params: SamplingParams,
        lock: asyncio.Lock | None,
        completion_id: str,
        created: int,
        model: str,
        include_usage: bool,
    ) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue = asyncio.Queue()
        job = GenerationJob(
            prompt_ids, memory, params, on_delta=lambda d: loop.call_soon_threadsafe(deltas.put_nowait, d)
        )
        future = asyncio.wrap_future(self.engine.submit_generate(job))
        future.add_done_callback(lambda _: deltas.put_nowait(None))
        self.open_streams += 1
        self.metrics.open_streams.inc()

        def event(**kwargs: Any) -> str:
            return "data: " + json.dumps(chunk_body(id=completion_id, created=created, model=model, **kwargs)) + "\n\n"

        try:
            yield event(delta={"role": "assistant", "content": ""})
            while True:
                delta = await deltas.get()
                if delta is None:
                    break
                yield event(delta={"content": delta})
            try:
                result = future.result()
            except Exception as err:  # the stream has started: report in-band as OpenAI does
                log.exception("generation failed")
                yield "data: " + json.dumps(error_body(f"Generation failed: {err}", type="server_error")) + "\n\n"
                return
            self.metrics.observe(result)
            yield event(delta={}, finish_reason=result.finish_reason)
            if include_usage:
                yield event(delta={}, usage_=usage(result.prompt_tokens, result.completion_tokens), choices=False)
            yield "data: [DONE]\n\n"
        finally:
            self.open_streams -= 1
            self.metrics.open_streams.dec()
            if lock is not None:
                if future.done():
                    lock.release()
                else:  # a client that went away: the session's next request waits until the answer is generated
                    future.add_done_callback(lambda _: lock.release())

    # ----- sessions ------------------------------------------------------------------------------------------------
    def session_info(self, session_id: str, owner: str) -> dict[str, Any]:
        info = self.store.info(session_id, owner)
        if info is None:
            raise APIError(404, f"No session {session_id!r}.", param="session_id", code="session_not_found")
        body = info.as_dict()
        snapshot = self.store.snapshot(session_id)
        norms: dict[str, float] = {}
        if snapshot is not None:
            memory = memory_from_bytes(snapshot)
            norms = {k: float(v.pow(2).sum().sqrt()) for k, v in memory.norms().items()}
        body["memory_norms"] = norms
        return body


def create_app(engine: Engine, store: SessionStore, config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI app serving ``engine`` with sessions in ``store``."""
    server = _Server(engine, store, config or ServerConfig())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        # uvicorn has finished the requests in flight (graceful shutdown); their writes are committed
        await asyncio.to_thread(engine.shutdown)
        store.close()

    app = FastAPI(title="deltamem serve", version="1", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.server = server
    install_components(app)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(err.detail), type=kind), status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(f"Invalid request: {err.errors()[:1]}"), status_code=400)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(error_body(f"Internal error: {type(err).__name__}", type="server_error"), status_code=500)

    @app.middleware("http")
    async def _access_log(request: Request, call_next: Any) -> Response:
        started = time.monotonic()
        response = await call_next(request)
        elapsed = time.monotonic() - started
        server.metrics.requests.labels(
            request.url.path.split("/")[2]
            if request.url.path.startswith("/v1/")
            else request.url.path.strip("/") or "root",
            str(response.status_code),
        ).inc()
        log.info(
            json.dumps(
                {
                    "method": request.method,
                    "path": request.url.path,
                    "status": response.status_code,
                    "seconds": round(elapsed, 4),
                }
            )
        )
        return response

    @app.post(
        "/v1/chat/completions",
        openapi_extra=chat_operation(server.config),
        responses=chat_responses(),
    )
    async def chat_completions(request: Request) -> Response:
        return await server.chat(request)

    @app.get("/v1/models", response_model=None, responses={200: {"model": ModelList}, **errors(401)})
    async def models(request: Request) -> dict[str, Any]:
        server.authenticate(request)
        entry = {"id": engine.model_id, "object": "model", "created": 0, "owned_by": "peft-deltamem"}
        return {"object": "list", "data": [entry]}

    @app.get("/v1/sessions", response_model=None, responses={200: {"model": SessionList}, **errors(401)})
    async def sessions(request: Request) -> dict[str, Any]:
        owner = server.authenticate(request)
        return {"object": "list", "data": [s.as_dict() for s in store.list(owner)]}

    @app.get(
        "/v1/sessions/{session_id}", response_model=None, responses={200: {"model": SessionObject}, **errors(401, 404)}
    )
    async def get_session(session_id: str, request: Request) -> dict[str, Any]:
        return server.session_info(session_id, server.authenticate(request))

    @app.delete(
        "/v1/sessions/{session_id}", response_model=None, responses={200: {"model": SessionDeleted}, **errors(401, 404)}
    )
    async def delete_session(session_id: str, request: Request) -> dict[str, Any]:
        owner = server.authenticate(request)
        lock = server.locks.setdefault(session_id, asyncio.Lock())
        async with lock:
            if not store.delete(session_id, owner):
                raise APIError(404, f"No session {session_id!r}.", param="session_id", code="session_not_found")
        return {"id": session_id, "object": "session.deleted", "deleted": True}

    @app.get(
        "/v1/sessions/{session_id}/memory",
        response_class=Response,
        responses={200: {"content": {"application/octet-stream": {}}}, **errors(401, 404)},
    )
    async def get_memory(session_id: str, request: Request) -> Response:
        owner = server.authenticate(request)
        server.session_info(session_id, owner)
        snapshot = store.snapshot(session_id)
        data = snapshot if snapshot is not None else memory_to_bytes(engine.template)
        return Response(data, media_type="application/octet-stream")

    @app.put(
        "/v1/sessions/{session_id}/memory",
        response_model=None,
        openapi_extra=memory_put_operation(),
        responses={200: {"model": SessionObject}, **errors(400, 401, 404, 413)},
    )
    async def put_memory(session_id: str, request: Request) -> dict[str, Any]:
        owner = server.authenticate(request)
        server.session_of(session_id, owner)
        data = await server.body(request)
        try:
            memory = memory_from_bytes(data)
        except ValueError as err:
            raise APIError(400, f"Not a δ-mem memory file: {err}", code="invalid_memory") from err
        mismatch = engine.check_memory(memory)
        if mismatch:
            raise APIError(400, f"The memory belongs to another adapter: {mismatch}.", code="adapter_mismatch")
        lock = server.locks.setdefault(session_id, asyncio.Lock())
        async with lock:
            try:
                store.import_memory(session_id, owner, data)  # the file as sent (checked above)
            except PermissionError as err:
                raise APIError(404, f"No session {session_id!r}.", code="session_not_found") from err
        return server.session_info(session_id, owner)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=server.metrics.content_type)

    return app
