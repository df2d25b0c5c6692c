"""The HTTP API: FastAPI behind Ray Serve. Validates, normalises, hands turns to threads."""

import asyncio
import hmac
import logging
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray import serve
from ray.exceptions import RayError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from actors.directory import ThreadDirectory, pool_scope, root_cause
from actors.key import ID_PATTERN, ThreadKey
from actors.redis_store import RedisThreadStore, connect_redis
from actors.run_queue import RunQueue
from actors.run_records import RunRecord
from memory.long_term import MAX_CONTENT_CHARS
from serve_app.channel_messages import CHANNEL_ID_PREFIXES
from serve_app.channels import CHANNELS_PREFIX, MAX_BODY, ChannelInbox
from serve_app.channels import router as channels_router
from serve_app.deltas import read_deltas, sse
from serve_app.deployments import MEMORY_API_LABEL, open_memory
from serve_app.memory_api import thread_router as thread_memory_router
from serve_app.memory_api import user_router as user_memory_router
from stickyray.config import TeamConfig
from stickyray.errors import (
    CheckpointConflict,
    InvalidThreadKey,
    MessageIdReused,
    ProviderError,
    RunQueueFull,
    StickyrayError,
    StoreUnavailable,
    ThreadFenced,
    ThreadPassivated,
    TurnPending,
)
from stickyray.metrics import record_run
from stickyray.settings import Settings
from stickyray.turns import InboundMessage, ThreadSnapshot, TurnResult, message_text
from stickyray.webhooks import MAX_URL_LENGTH, WEBHOOK_CHANNEL, url_refusal

__all__ = ["INGRESS_DEPLOYMENT", "Ingress", "MessageIn", "api"]

log = logging.getLogger(__name__)

INGRESS_DEPLOYMENT = "StickyrayIngress"


async def _known_query(request: Request) -> None:
    """Refuse a query parameter the endpoint does not take, or one given twice, as a body's
    unknown field is refused: a misspelt ``limt=1`` must not quietly return every run.

    What an endpoint takes is what its schema (``/docs``) lists. The channels' webhooks are
    left alone: their platforms add parameters as they see fit.
    """
    route = request.scope.get("route")
    path = str(getattr(route, "path", ""))
    if not path or path.startswith(CHANNELS_PREFIX) or not request.query_params:
        return
    operation = request.app.openapi()["paths"].get(path, {}).get(request.method.lower(), {})
    taken = {
        p["name"]: p.get("schema", {}).get("type") == "array"
        for p in operation.get("parameters", [])
        if p.get("in") == "query"
    }
    errors = []
    for name in dict.fromkeys(request.query_params.keys()):
        values = request.query_params.getlist(name)
        if name not in taken:
            known = ", ".join(sorted(taken)) or "none"
            errors.append(
                {
                    "type": "extra_forbidden",
                    "loc": ("query", name),
                    "msg": f"unknown parameter (this endpoint takes: {known})",
                    "input": values[0],
                }
            )
        elif len(values) > 1 and not taken[name]:
            errors.append(
                {
                    "type": "too_long",
                    "loc": ("query", name),
                    "msg": f"given {len(values)} times; it takes one value",
                    "input": values,
                }
            )
    if errors:
        raise RequestValidationError(errors)


api = FastAPI(
    title="stickyray",
    description="Sticky multi-agent assistant runtime: send messages to conversation threads.",
    version="0.1.0",
    dependencies=[Depends(_known_query)],
)
api.include_router(user_memory_router)
api.include_router(thread_memory_router)
api.include_router(channels_router)


def _api_id(value: str | None) -> str | None:
    """A message id sent through the API: never one of a channel's.

    A chat's next message id is predictable: taken through the API first, the user's own
    message would be answered with another turn, or not at all.
    """
    if value is not None and value.startswith(CHANNEL_ID_PREFIXES):
        prefixes = " or ".join(CHANNEL_ID_PREFIXES)
        raise ValueError(f"ids starting with {prefixes} belong to the channels")
    return value


class MessageIn(BaseModel):
    """A user message for a thread."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1, description="What the user wrote.")
    message_id: str | None = Field(
        default=None,
        pattern=ID_PATTERN,
        description="Client id of the message; generated when absent.",
    )
    user_id: str | None = Field(
        default=None,
        pattern=ID_PATTERN,
        description="Whose long-term memory the turn reads and writes; the thread's own if absent.",
    )

    @field_validator("text")
    @classmethod
    def _sendable(cls, value: str) -> str:
        return message_text(value)

    @field_validator("message_id")
    @classmethod
    def _not_a_channels(cls, value: str | None) -> str | None:
        return _api_id(value)


class ChatIn(MessageIn):
    """A user message to answer now."""

    stream: bool = Field(
        default=False,
        strict=True,  # only true or false: "no" or 1 is a client's mistake, not a choice
        description="Answer with server-sent events: the reply's text as the model writes "
        "it (`delta`), then the turn (`turn`) or an `error`.",
    )


class RunIn(MessageIn):
    """A user message to answer in the background."""

    webhook_url: str | None = Field(
        default=None,
        max_length=MAX_URL_LENGTH,
        description="Where to POST the run's outcome once it finishes (signed); it must be "
        "under one of agents.yaml's runs.webhook_urls.",
    )


class ResetIn(BaseModel):
    """An optional body of a reset."""

    model_config = ConfigDict(extra="forbid")

    message_id: str | None = Field(
        default=None,
        pattern=ID_PATTERN,
        description="Client id of the reset: a retry with the same id returns the first "
        "answer and deletes nothing sent since. Generated when absent.",
    )

    @field_validator("message_id")
    @classmethod
    def _not_a_channels(cls, value: str | None) -> str | None:
        return _api_id(value)


class AgentInfo(BaseModel):
    """An agent as GET /v1/agents shows it."""

    name: str
    role: str
    description: str
    provider: str
    model: str
    replicas: int


class TurnHistory(BaseModel):
    """Result of GET /v1/threads/{thread_id}/turns."""

    thread_id: str
    turns: list[TurnResult]


class OpenRuns(BaseModel):
    """Result of GET /v1/threads/{thread_id}/runs: runs not finished, in the order they run."""

    thread_id: str
    runs: list[RunRecord]


class Health(BaseModel):
    """Result of GET /healthz."""

    status: str
    checks: dict[str, str]


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    # Name each field plainly ("body.text: ...") as well as FastAPI's structured detail; the
    # first few only, so a body of many mistakes does not get an answer many times its size.
    errors = exc.errors()
    shown = errors[:_ERRORS_SHOWN]
    messages = [
        f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg')}" for err in shown
    ]
    if len(errors) > len(shown):
        messages.append(f"and {len(errors) - len(shown)} more")
    return JSONResponse(
        status_code=422,
        content={"error": "; ".join(messages), "detail": _jsonable(shown)},
    )


_ERRORS_SHOWN = 20


@api.exception_handler(StarletteHTTPException)
async def _http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Every 4xx and 5xx carries its message in "error", as validation errors do; "detail" is
    # kept for clients that read FastAPI's default shape.
    if exc.status_code == 400 and exc.detail == _UNPARSED:
        # FastAPI's answer to a body no JSON parser reads (invalid UTF-8, a number or a
        # nesting too large): a 422 naming the body, as for any other malformed JSON.
        cause = exc.__cause__
        why = f" ({type(cause).__name__})" if cause is not None else ""
        exc = StarletteHTTPException(422, f"body: not valid JSON{why}")
    elif exc.status_code == 405 and exc.detail == _NO_METHOD:
        # Starlette names the methods of the first route on the path; the path can have more.
        allowed = ", ".join(_allowed(request, exc))
        path = _route_path(request.scope)
        exc = StarletteHTTPException(
            405,
            f"{request.method} {path}: method not allowed here (allowed: {allowed}); see /docs",
            {"Allow": allowed},
        )
    elif exc.status_code == 404 and exc.detail == _NO_ROUTE:
        exc = StarletteHTTPException(404, _unrouted(request), exc.headers)
    return JSONResponse(
        status_code=exc.status_code,
        content={"error": exc.detail, "detail": exc.detail},
        headers=exc.headers,
    )


# A quiet stream (routing, tools, retries) sends a comment this often, so that proxies and
# load balancers, which close idle connections after a minute or so, keep it open.
STREAM_KEEPALIVE_S = 15.0
_ENDED: Any = object()  # no more pieces


def _event(piece: dict[str, Any] | None) -> bytes:
    """A piece of the reply as a ``delta`` event; a keep-alive comment for ``None``."""
    return b": keep-alive\n\n" if piece is None else sse("delta", piece)


def _settled(turn: "asyncio.Future[TurnResult]") -> None:
    """Reads a streamed turn's failure: its caller may have gone, and nothing else would."""
    if not turn.cancelled() and (failed := turn.exception()) is not None:
        log.info("a streamed turn ended without a reply: %s: %s", type(failed).__name__, failed)


_UNPARSED = "There was an error parsing the body"
# Starlette's answers when no route matches a path, or none takes its method.
_NO_ROUTE, _NO_METHOD = "Not Found", "Method Not Allowed"


def _allowed(request: Request, exc: StarletteHTTPException) -> list[str]:
    """Every method some endpoint takes on the request's path.

    Starlette's 405 names the methods of the first route on the path only; the API's schema
    lists every endpoint's.
    """
    methods = {m.strip() for m in (exc.headers or {}).get("Allow", "").split(",") if m.strip()}
    path = _route_path(request.scope)
    for template, operations in request.app.openapi().get("paths", {}).items():
        if re.fullmatch(re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)), path):
            methods |= {m.upper() for m in operations}
    if "GET" in methods:
        methods.add("HEAD")  # Starlette answers HEAD wherever it answers GET
    return sorted(methods)


def _unrouted(request: Request) -> str:
    """What to fix in a request no route took."""
    path = _route_path(request.scope)
    hint = ""
    if path.startswith(("/v1/threads/", "/v1/users/")):
        # A path segment ends at '/', escaped or not: "a%2Fb" is two segments.
        hint = " (a thread or user id has no '/', not even as %2F)"
    return f"{request.method} {path}: no such endpoint{hint}; see /docs"


class _ErrorsAsJson:
    """Answers whatever no route turned into an HTTP error in the API's shape, with outages
    (Redis, Ray, a model provider) as 503s to retry.

    A middleware rather than a handler for ``Exception``: Starlette re-raises after such a
    handler answers, so each error was logged twice and counted as a crashed request.
    """

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self._app(scope, receive, send_tracked)
        except Exception as exc:
            if started:  # too late to answer: the client sees the connection end
                raise
            error = _http_error(exc)  # logs what it cannot name, with its traceback
            where, named = f"{scope['method']} {scope['path']}", root_cause(exc)
            if error.status_code == 500 and isinstance(named, StickyrayError):
                log.error("%s: %s", where, error.detail, exc_info=exc)
            elif isinstance(named, StickyrayError | RayError):  # an outage, a conflict
                log.warning("%s: %s", where, error.detail)
            response = await _http_exception(Request(scope), error)
            await response(scope, receive, send)


api.add_middleware(_ErrorsAsJson)


def _route_path(scope: Scope) -> str:
    """The request's path as the router sees it: without the ``root_path`` Serve mounts the
    app under."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def body_cap(team: TeamConfig) -> int:
    """The most bytes a request body to the API may hold: room for the longest valid text in
    its most escaped JSON (6 bytes per byte, 12 per character), at least the webhooks' cap."""
    longest_chars = max(
        [MAX_CONTENT_CHARS, *(a.memory.core_block_limit for a in team.agents if a.memory)]
    )
    escaped = max(6 * team.threads.max_message_bytes, 12 * longest_chars)
    return max(MAX_BODY, escaped + 64 * 1024)


class _BodyCap:
    """A body over the app's cap (``state.max_body_bytes``) gets 413 before the route reads
    it whole: by its Content-Length, or as soon as the stream passes the cap. The channels'
    webhooks cap their own bodies."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = scope.get("app")
        cap: int | None = getattr(app.state, "max_body_bytes", None) if app is not None else None
        if scope["type"] != "http" or cap is None or _route_path(scope).startswith("/v1/channels/"):
            await self._app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        chunks: list[bytes] = []
        received = 0
        over = declared.isdigit() and int(declared) > cap
        while not over:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before sending its body
            chunks.append(message.get("body", b""))
            received += len(chunks[-1])
            over = received > cap
            if not message.get("more_body", False):
                break
        if over:
            refused = HTTPException(413, f"body: over the limit of {cap} bytes")
            response = await _http_exception(Request(scope), refused)
            await response(scope, receive, send)
            return
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: the disconnect, when it comes
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self._app(scope, replay, send)


# Added after the error middleware and before the key check, so a request without the key is
# refused before its body is read.
api.add_middleware(_BodyCap)


class _ApiKey:
    """With ``STICKYRAY_API_KEY`` set, every /v1 route but the channels' webhooks (which
    authenticate the platform's call themselves) needs ``Authorization: Bearer <key>``;
    health checks and the docs stay open.

    A middleware, so that a request without the key is refused before its body is read.
    It sees the path as the router does (without the ``root_path`` Serve mounts it under).
    """

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The app serving the request (as routes read request.app), which under Serve is
        # not necessarily this module's object.
        app = scope.get("app")
        key: str | None = getattr(app.state, "api_key", None) if app is not None else None
        if scope["type"] == "http" and key is not None:
            path = _route_path(scope)
            if path.startswith("/v1/") and not path.startswith("/v1/channels/"):
                headers = dict(scope["headers"])
                scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
                # The scheme's case is free (RFC 9110); the key's is not.
                if scheme.lower() != b"bearer" or not hmac.compare_digest(token, key.encode()):
                    refused = HTTPException(
                        401,
                        "header Authorization: missing or wrong; send 'Bearer <STICKYRAY_API_KEY>'",
                        headers={"WWW-Authenticate": "Bearer"},
                    )
                    response = await _http_exception(Request(scope), refused)
                    await response(scope, receive, send)
                    return
        await self._app(scope, receive, send)


api.add_middleware(_ApiKey)


class _HeadAsGet:
    """HEAD answered as GET is, without the body (HTTP's rule; a load balancer's health
    check may use it): FastAPI's routes, unlike Starlette's, take only the methods they
    name. The outermost middleware, so a refusal to HEAD has no body either."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self._app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {**message, "body": b""}
            await send(message)

        await self._app({**scope, "method": "GET"}, receive, headers_only)


api.add_middleware(_HeadAsGet)


def _jsonable(errors: Any) -> Any:
    out = []
    for err in errors:
        item = {k: v for k, v in err.items() if k in ("loc", "msg", "type")}
        out.append(item)
    return out


def _http_error(exc: BaseException) -> HTTPException:
    cause = root_cause(exc)
    if isinstance(cause, RunQueueFull):
        return HTTPException(429, f"{cause}; retry later", headers={"Retry-After": "5"})
    if isinstance(cause, MessageIdReused):
        return HTTPException(422, f"body.message_id: {cause}")
    if isinstance(cause, StoreUnavailable):
        return HTTPException(503, f"{cause.store} is unavailable; the message was not processed")
    if isinstance(cause, CheckpointConflict):
        return HTTPException(409, f"{cause}; retry the message")
    if isinstance(cause, TurnPending):
        return HTTPException(503, f"{cause}: the thread is completing it; retry the message")
    if isinstance(cause, ThreadFenced | ThreadPassivated):
        # The thread moved while the directory kept redelivering: transient, like a restart.
        return HTTPException(503, f"the thread is moving: {cause}; retry the message")
    if isinstance(cause, ProviderError):
        return HTTPException(503, f"a model provider is unavailable: {cause}")
    if isinstance(cause, StickyrayError):
        return HTTPException(500, str(cause))
    if isinstance(cause, RayError):
        return HTTPException(503, f"the thread is temporarily unavailable: {type(cause).__name__}")
    log.exception("unexpected error in a turn", exc_info=cause)
    return HTTPException(500, f"internal error: {type(cause).__name__}")


def _key(thread_id: str) -> ThreadKey:
    try:
        return ThreadKey.of(thread_id)
    except InvalidThreadKey as exc:
        raise HTTPException(422, f"path.thread_id: {exc.reason}") from None


ThreadIdPath = Path(description="The conversation thread.", max_length=128)
MessageIdPath = Path(description="The message id of the run.", pattern=ID_PATTERN)


@serve.ingress(api)
class Ingress:
    """Routes HTTP requests to thread actors through the directory."""

    async def __init__(  # type: ignore[misc]
        self,
        team: TeamConfig,
        settings: Settings,
        agent_handles: dict[str, Any],
        app_name: str,
        embedder: Any | None = None,
        run_worker: Any | None = None,
    ) -> None:
        """``run_worker`` is bound only so that the app deploys it: it drains the run queue."""
        assert settings.redis_url, "the CLI resolves the Redis URL before deploying"
        self._team = team
        self._app_name = app_name
        self._directory = ThreadDirectory(
            team,
            settings.redis_url,
            agent_handles,
            scope=pool_scope(app_name, team),
            app=app_name,
        )
        self._stack = AsyncExitStack()
        try:
            # One connection pool for thread state and the run queue.
            redis = connect_redis(settings.redis_url)
            self._stack.push_async_callback(redis.aclose)
            self._redis = redis
            self._turns: set[asyncio.Future[TurnResult]] = set()  # streamed, still running
            self._keepalive_s = STREAM_KEEPALIVE_S
            self._store = RedisThreadStore(redis)
            self._runs = RunQueue(redis, app_name, team.runs)
            self._worker_sends_webhooks = False  # until the queue says so (then for good)
            api.state.max_body_bytes = body_cap(team)
            api.state.api_key = (
                settings.api_key.get_secret_value() if settings.api_key is not None else None
            )
            api.state.channels = ChannelInbox(
                self._runs, settings, app_name, team.threads.max_message_bytes
            )
            api.state.memory = await open_memory(
                team, settings, embedder, self._stack, (app_name, MEMORY_API_LABEL)
            )
        except BaseException:
            await self._stack.aclose()  # Serve runs no destructor for a replica that never started
            raise
        api.state.core_block_limit = max(
            (a.memory.core_block_limit for a in team.agents if a.memory), default=2000
        )

    async def __del__(self) -> None:
        """Close the Redis and Postgres connections; Serve awaits this on shutdown."""
        await self._stack.aclose()

    async def _failure(self, exc: BaseException) -> HTTPException:
        # An actor that could not start usually means Redis is down: say so.
        if isinstance(root_cause(exc), RayError):
            try:
                await self._store.ping()
            except StoreUnavailable as down:
                return _http_error(down)
        return _http_error(exc)

    def _inbound(self, body: MessageIn) -> InboundMessage:
        size = len(body.text.encode("utf-8"))
        limit = self._team.threads.max_message_bytes
        if size > limit:
            raise HTTPException(413, f"body.text: {size} bytes is over the limit of {limit}")
        return InboundMessage(
            text=body.text,
            message_id=body.message_id or uuid.uuid4().hex,
            user_id=body.user_id,
        )

    @api.post(
        "/v1/threads/{thread_id}/messages",
        response_model=TurnResult,
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    async def post_message(
        self, body: ChatIn, thread_id: str = ThreadIdPath
    ) -> TurnResult | StreamingResponse:
        """Send a message; the thread's active agent (or the supervisor) answers."""
        key = _key(thread_id)
        message = self._inbound(body)
        if body.stream:
            return await self._streamed(key, message.model_copy(update={"stream": True}))
        try:
            return await self._directory.send(key, message)
        except Exception as exc:
            raise await self._failure(exc) from None

    async def _streamed(self, key: ThreadKey, message: InboundMessage) -> StreamingResponse:
        """The turn as server-sent events: its text as it is written, then the turn."""
        # Not cancelled with the request: a caller that goes away still gets its turn run
        # once, and a retry with the same message_id gets its result.
        turn = asyncio.ensure_future(self._directory.send(key, message))
        self._turns.add(turn)
        turn.add_done_callback(self._turns.discard)
        turn.add_done_callback(_settled)
        deltas = key.deltas_key(message.message_id, message.fingerprint)
        pieces = read_deltas(self._redis, deltas, turn, idle_s=self._keepalive_s)
        # The headers wait for the first piece, the end of the turn or a keep-alive: a
        # refusal (a reused message id, Redis down) comes first and keeps its status code.
        first = await anext(pieces, _ENDED)
        if first is _ENDED and turn.done() and not turn.cancelled():
            failed = turn.exception()
            if failed is not None:
                raise await self._failure(failed) from None

        async def events() -> AsyncIterator[bytes]:
            if first is not _ENDED:
                yield _event(first)
                async for piece in pieces:
                    yield _event(piece)
            try:
                result = await asyncio.shield(turn)
            except Exception as exc:
                failure = await self._failure(exc)
                yield sse("error", {"status": failure.status_code, "error": failure.detail})
                return
            yield sse("turn", result.model_dump(mode="json", by_alias=True))

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @api.post(
        "/v1/threads/{thread_id}/runs",
        response_model=RunRecord,
        status_code=202,
        responses={200: {"description": "The run of this message id, queued before"}},
    )
    async def post_run(
        self, body: RunIn, response: Response, thread_id: str = ThreadIdPath
    ) -> RunRecord:
        """Queue a message: 202 at once; its turn runs in the background, in order per thread."""
        key = _key(thread_id)
        message = self._inbound(body)
        reply_to = None
        if body.webhook_url is not None:
            refusal = url_refusal(body.webhook_url, self._team.runs.webhook_urls)
            if refusal is not None:
                raise HTTPException(422, f"body.webhook_url: {refusal}")
            # The thread in the address: a thread's outcomes arrive in order, threads' at once.
            reply_to = {"channel": WEBHOOK_CHANNEL, "url": body.webhook_url, "thread": str(key)}
            await self._check_worker_sends_webhooks()
        try:
            record, queued = await self._runs.submit(key, message, reply_to)
        except Exception as exc:
            raise await self._failure(exc) from None
        if not queued:
            response.status_code = 200
        return record

    async def _check_worker_sends_webhooks(self) -> None:
        """Raise a 503 until a run worker of this release has held the queue's lease: during
        the deploy that brings webhooks, the previous release's worker would fail them."""
        if self._worker_sends_webhooks:
            return
        try:
            self._worker_sends_webhooks = await self._runs.takes_webhooks()
        except StoreUnavailable as exc:
            raise _http_error(exc) from None
        if not self._worker_sends_webhooks:
            raise HTTPException(
                503,
                "the run worker of this release has not taken over yet: retry a run with a "
                "webhook_url in a few seconds",
                headers={"Retry-After": "5"},
            )

    @api.get("/v1/threads/{thread_id}/runs", response_model=OpenRuns)
    async def get_open_runs(
        self,
        thread_id: str = ThreadIdPath,
        limit: int = Query(default=100, ge=1, le=1000),
        after: str | None = Query(
            default=None, max_length=128, description="The last run of the previous page."
        ),
    ) -> OpenRuns:
        """The thread's runs that are queued or running, in the order they run (finished
        ones are its turns), from the one after run ``after``."""
        key = _key(thread_id)
        after = after or None  # "after=" is the first page, as in the README's example
        try:
            runs = await self._runs.open_runs(key, limit, after)
        except StoreUnavailable as exc:
            raise _http_error(exc) from None
        if runs is None:
            raise HTTPException(
                422, f"query.after: thread {thread_id!r} has no run {after!r} (or it expired)"
            )
        return OpenRuns(thread_id=thread_id, runs=runs)

    @api.get("/v1/threads/{thread_id}/runs/{message_id}", response_model=RunRecord)
    async def get_run(
        self, thread_id: str = ThreadIdPath, message_id: str = MessageIdPath
    ) -> RunRecord:
        """A queued run: its status and, once finished, its turn."""
        key = _key(thread_id)
        try:
            record = await self._runs.get(key, message_id)
        except StoreUnavailable as exc:
            raise _http_error(exc) from None
        if record is None:
            raise HTTPException(404, f"thread {thread_id!r} has no run {message_id!r}")
        return record

    @api.post(
        "/v1/threads/{thread_id}/runs/{message_id}/cancel",
        response_model=RunRecord,
        responses={409: {"description": "The run started or finished: it cannot be cancelled"}},
    )
    async def cancel_run(
        self, thread_id: str = ThreadIdPath, message_id: str = MessageIdPath
    ) -> RunRecord:
        """Take a run that has not started off the queue; it never runs (nor replies)."""
        key = _key(thread_id)
        try:
            record, cancelled = await self._runs.cancel(key, message_id)
        except StoreUnavailable as exc:
            raise _http_error(exc) from None
        if record is None:
            raise HTTPException(404, f"thread {thread_id!r} has no run {message_id!r}")
        if cancelled:
            record_run(self._app_name, status="cancelled")
        elif record.status != "cancelled":
            why = "is running" if record.status == "running" else f"has {record.status}"
            raise HTTPException(
                409,
                f"run {message_id!r} of thread {thread_id!r} {why}: only a queued run "
                "can be cancelled",
            )
        return record

    @api.get("/v1/threads/{thread_id}", response_model=ThreadSnapshot)
    async def get_thread(self, thread_id: str = ThreadIdPath) -> ThreadSnapshot:
        """The thread's active agent (null = supervisor), turn count and recent messages."""
        key = _key(thread_id)
        try:
            checkpoint = await self._store.load(key)
        except StoreUnavailable as exc:
            raise _http_error(exc) from None
        if checkpoint is None:
            raise HTTPException(404, f"thread {thread_id!r} not found")
        return ThreadSnapshot(
            thread_id=thread_id,
            active_agent=checkpoint.active_agent,
            turns=checkpoint.turn,
            buffer=checkpoint.buffer,
            version=checkpoint.version,
        )

    @api.get("/v1/threads/{thread_id}/turns", response_model=TurnHistory)
    async def get_turns(
        self,
        thread_id: str = ThreadIdPath,
        after: int = Query(default=0, ge=0, description="Only turns after this number."),
        limit: int = Query(default=100, ge=1, le=1000),
    ) -> TurnHistory:
        """Every turn of the thread in order: message id, agent, status, reply, error."""
        key = _key(thread_id)
        try:
            if await self._store.load(key) is None:
                raise HTTPException(404, f"thread {thread_id!r} not found")
            turns = await self._store.turns(key, after=after, limit=limit)
        except StoreUnavailable as exc:
            raise _http_error(exc) from None
        return TurnHistory(thread_id=thread_id, turns=turns)

    @api.post("/v1/threads/{thread_id}/reset", response_model=TurnResult)
    async def reset_thread(
        self, thread_id: str = ThreadIdPath, body: ResetIn | None = None
    ) -> TurnResult:
        """Delete the thread's history and recent messages; the supervisor answers next."""
        key = _key(thread_id)
        message_id = (body.message_id if body else None) or uuid.uuid4().hex
        try:
            if await self._store.load(key) is None:
                raise HTTPException(404, f"thread {thread_id!r} not found")
            message = InboundMessage(text="/reset", message_id=message_id)
            return await self._directory.send(key, message)
        except HTTPException:
            raise
        except Exception as exc:
            raise await self._failure(exc) from None

    @api.get("/v1/agents", response_model=list[AgentInfo])
    async def list_agents(self) -> list[AgentInfo]:
        """Every agent with its role and how many replicas are running."""
        try:
            running = await asyncio.to_thread(self._running_replicas)
        except Exception as exc:  # the Serve controller is unreachable
            raise HTTPException(503, f"ray is unavailable: {type(exc).__name__}: {exc}") from None
        return [
            AgentInfo(
                name=agent.name,
                role="supervisor" if agent.name == self._team.supervisor.name else "specialist",
                description=agent.description,
                provider=agent.provider,
                model=agent.model_name,
                replicas=running.get(agent.name, 0),
            )
            for agent in self._team.agents
        ]

    def _running_replicas(self) -> dict[str, int]:
        app = serve.status().applications.get(self._app_name)
        if app is None:
            return {}
        return {
            name: sum(
                n
                for state, n in d.replica_states.items()
                if getattr(state, "value", state) == "RUNNING"
            )
            for name, d in app.deployments.items()
        }

    @api.get("/healthz", response_model=Health)
    async def healthz(self) -> JSONResponse:
        """200 when Ray, the Serve app and Redis are up; 503 naming the part that is not."""
        checks: dict[str, str] = {}
        try:
            await self._store.ping()
            checks["redis"] = "ok"
        except StoreUnavailable as exc:
            # Open without a key: the why (hosts, ports) goes to the log, not to the caller.
            log.warning("healthz: redis is down: %s", exc.detail)
            checks["redis"] = "down"
        try:
            checks.update(await asyncio.to_thread(self._serve_checks))
        except Exception as exc:  # the controller itself is unreachable
            log.warning("healthz: ray is down: %s: %s", type(exc).__name__, exc)
            checks["ray"] = "down"
        ok = all(v == "ok" for v in checks.values())
        body = Health(status="ok" if ok else "unavailable", checks=checks)
        return JSONResponse(status_code=200 if ok else 503, content=body.model_dump())

    def _serve_checks(self) -> dict[str, str]:
        app = serve.status().applications.get(self._app_name)
        checks = {"ray": "ok"}
        if app is None:
            checks["serve_app"] = f"down: application {self._app_name!r} is not deployed"
            return checks
        bad = [
            f"{name} {d.status.value if hasattr(d.status, 'value') else d.status}"
            for name, d in app.deployments.items()
            if str(getattr(d.status, "value", d.status)) != "HEALTHY"
        ]
        checks["serve_app"] = "ok" if not bad else "down: " + ", ".join(bad)
        return checks
