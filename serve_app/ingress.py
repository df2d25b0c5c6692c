"""The HTTP API: FastAPI behind Ray Serve. Validates, normalises, hands turns to threads."""

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Query, Response
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayError

from actors.directory import ThreadDirectory, pool_scope, root_cause
from actors.key import ThreadKey
from actors.redis_store import RedisThreadStore, connect_redis
from actors.run_queue import RunQueue
from actors.run_records import RunRecord
from memory.long_term import MAX_CONTENT_CHARS
from serve_app.api_errors import http_error, install_error_handlers
from serve_app.api_guards import install_guards, known_query
from serve_app.api_models import (
    AgentInfo,
    ChatIn,
    Health,
    MessageIn,
    ResetIn,
    RunIn,
    ThreadIdPath,
    TurnHistory,
    thread_key,
)
from serve_app.channels import MAX_BODY, ChannelInbox
from serve_app.channels import router as channels_router
from serve_app.deltas import read_deltas, sse
from serve_app.deployments import MEMORY_API_LABEL, open_memory
from serve_app.memory_api import thread_router as thread_memory_router
from serve_app.memory_api import user_router as user_memory_router
from serve_app.runs_api import RunsState
from serve_app.runs_api import router as runs_router
from stickyray.config import TeamConfig
from stickyray.errors import StoreUnavailable
from stickyray.settings import Settings
from stickyray.turns import InboundMessage, ThreadSnapshot, TurnResult
from stickyray.webhooks import WEBHOOK_CHANNEL, url_refusal

__all__ = ["INGRESS_DEPLOYMENT", "Ingress", "api"]

log = logging.getLogger(__name__)

INGRESS_DEPLOYMENT = "StickyrayIngress"


api = FastAPI(
    title="stickyray",
    description="Sticky multi-agent assistant runtime: send messages to conversation threads.",
    version="0.1.0",
    dependencies=[Depends(known_query)],
)
api.include_router(user_memory_router)
api.include_router(thread_memory_router)
api.include_router(channels_router)
api.include_router(runs_router)
# Errors first, then the guards: the last middleware added is the outermost, so from the
# outside in a request meets HEAD as GET, the key check, the body's cap, then the error
# middleware.
install_error_handlers(api)
install_guards(api)


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


def body_cap(team: TeamConfig) -> int:
    """The most bytes a request body to the API may hold: room for the longest valid text in
    its most escaped JSON (6 bytes per byte, 12 per character), at least ``MAX_BODY`` (1 MiB).
    The channels' webhooks are not held to it: each caps its own body at what its platform
    sends (WhatsApp's at 3 MiB)."""
    longest_chars = max(
        [MAX_CONTENT_CHARS, *(a.memory.core_block_limit for a in team.agents if a.memory)]
    )
    escaped = max(6 * team.threads.max_message_bytes, 12 * longest_chars)
    return max(MAX_BODY, escaped + 64 * 1024)


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
            api.state.runs = RunsState(self._runs, app_name)
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
                return http_error(down)
        return http_error(exc)

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
        key = thread_key(thread_id)
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
        key = thread_key(thread_id)
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
            raise http_error(exc) from None
        if not self._worker_sends_webhooks:
            raise HTTPException(
                503,
                "the run worker of this release has not taken over yet: retry a run with a "
                "webhook_url in a few seconds",
                headers={"Retry-After": "5"},
            )

    @api.get("/v1/threads/{thread_id}", response_model=ThreadSnapshot)
    async def get_thread(self, thread_id: str = ThreadIdPath) -> ThreadSnapshot:
        """The thread's active agent (null = supervisor), turn count and recent messages."""
        key = thread_key(thread_id)
        try:
            checkpoint = await self._store.load(key)
        except StoreUnavailable as exc:
            raise http_error(exc) from None
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
        key = thread_key(thread_id)
        try:
            if await self._store.load(key) is None:
                raise HTTPException(404, f"thread {thread_id!r} not found")
            turns = await self._store.turns(key, after=after, limit=limit)
        except StoreUnavailable as exc:
            raise http_error(exc) from None
        return TurnHistory(thread_id=thread_id, turns=turns)

    @api.post("/v1/threads/{thread_id}/reset", response_model=TurnResult)
    async def reset_thread(
        self, thread_id: str = ThreadIdPath, body: ResetIn | None = None
    ) -> TurnResult:
        """Delete the thread's history and recent messages; the supervisor answers next."""
        key = thread_key(thread_id)
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
