"""A scriptable fake LLM: a real HTTP server speaking the OpenAI and Anthropic wire formats.

Point the real SDKs (or any process on the machine, e.g. Ray workers) at it, script replies,
and assert on what your agents sent::

    with FakeLLMServer() as fake:
        # Rules match in order: the user's text is still there after the tool round trip.
        fake.on(agent="bookings", after_tool_result=True, reply="Found 3 flights.")
        fake.on(agent="bookings", user_contains="flight", reply=FakeReply.tool_call(
            "search_flights", {"to": "LIS"}))
        client = openai.OpenAI(base_url=fake.openai_base_url, api_key="test")
        ...
        assert fake.count(agent="bookings") == 2

Token usage is deterministic; `stickyray.testing._fake_script` documents how it is counted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import itertools
import json
import logging
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import _fake_anthropic, _fake_openai
from ._fake_script import (
    AGENT_HEADER,
    Api,
    FakeReply,
    FakeRequest,
    FakeRule,
    FakeToolCall,
    ReplyResult,
    ReplySource,
    _Criteria,
    _Wire,
    normalize,
)

__all__ = [
    "AGENT_HEADER",
    "Api",
    "FakeLLMServer",
    "FakeReply",
    "FakeRequest",
    "FakeRule",
    "FakeToolCall",
    "ReplyResult",
    "ReplySource",
    "main",
]

logger = logging.getLogger(__name__)

# Failures of the script itself are not transient: tell SDKs not to retry them.
_NO_RETRY = {"x-should-retry": "false"}


async def _aiter(frames: Iterator[str]) -> AsyncIterator[str]:
    # An async iterator keeps Starlette from streaming through its small thread pool.
    for frame in frames:
        yield frame


class FakeLLMServer:
    """A fake OpenAI + Anthropic server on 127.0.0.1, run by uvicorn in a background thread.

    Replies come from, in order: `queue()`d one-shot replies (FIFO), then the first matching
    `on()` rule that is not exhausted, then a default. The default is the text
    `"fake reply from {agent or model}"`, or with `strict=True` an HTTP 500 naming the request.
    Every request is recorded, errors included; `max_recorded` bounds that for long runs.
    """

    def __init__(
        self,
        latency_s: float = 0.0,
        strict: bool = False,
        port: int = 0,
        *,
        host: str = "127.0.0.1",
        max_recorded: int | None = None,
    ) -> None:
        self.strict = strict
        self._latency_s = latency_s
        self._host = host
        self._port = port
        self._lock = threading.RLock()
        self._rules: list[FakeRule] = []
        self._queue: deque[FakeRule] = deque()
        self._requests: deque[FakeRequest] = deque(maxlen=max_recorded)
        self.embedding_requests = 0  # POST /v1/embeddings calls (not recorded as requests)
        self._seq = itertools.count(1)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout_s: float = 10.0) -> FakeLLMServer:
        """Start serving; returns once the server accepts connections."""
        if self._thread is not None:
            raise RuntimeError("FakeLLMServer is already running")
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self._host, self._port))
        # Binding here rather than in uvicorn is what lets port=0 report the port it got.
        self._port = sock.getsockname()[1]
        app = Starlette(
            routes=[
                Route("/v1/chat/completions", self._openai, methods=["POST"]),
                Route("/v1/messages", self._anthropic, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
                Route("/v1/embeddings", self._embeddings, methods=["POST"]),
            ]
        )
        config = uvicorn.Config(
            app,
            lifespan="off",
            log_level="warning",
            access_log=False,
            backlog=2048,
            timeout_graceful_shutdown=2,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="fake-llm", daemon=True
        )
        self._server, self._thread, self._socket = server, thread, sock
        thread.start()
        deadline = time.monotonic() + timeout_s
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"fake LLM server did not start on {self.url}")
            time.sleep(0.005)
        logger.debug("fake LLM server listening on %s", self.url)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop serving and wait for the server thread; safe to call twice."""
        server, thread, sock = self._server, self._thread, self._socket
        self._server = self._thread = self._socket = None
        if server is not None:
            server.should_exit = True
        if thread is not None:
            thread.join(timeout_s)
        if sock is not None:
            sock.close()

    def __enter__(self) -> FakeLLMServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound port (0 until started when constructed with port=0)."""
        return self._port

    @property
    def url(self) -> str:
        """Base URL of the server, e.g. `http://127.0.0.1:PORT`."""
        host = "127.0.0.1" if self._host in ("0.0.0.0", "", "::") else self._host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self._port}"

    @property
    def openai_base_url(self) -> str:
        """`base_url` for `openai.OpenAI` (the URL plus `/v1`)."""
        return f"{self.url}/v1"

    @property
    def anthropic_base_url(self) -> str:
        """`base_url` for `anthropic.Anthropic` (the SDK adds `/v1` itself)."""
        return self.url

    @property
    def latency_s(self) -> float:
        """Delay before every reply without its own latency; settable while running."""
        return self._latency_s

    @latency_s.setter
    def latency_s(self, value: float) -> None:
        with self._lock:
            self._latency_s = value

    # -- scripting ---------------------------------------------------------------------------

    def on(
        self,
        predicate: Callable[[FakeRequest], bool] | None = None,
        *,
        reply: ReplySource,
        agent: str | None = None,
        model: str | None = None,
        api: Api | None = None,
        user_contains: str | None = None,
        system_contains: str | None = None,
        has_tool: str | None = None,
        after_tool_result: bool | None = None,
        times: int | None = None,
        latency_s: float | None = None,
    ) -> FakeRule:
        """Answer matching requests with `reply` (a FakeReply, text, or a function of the request).

        All given criteria must hold. `user_contains` / `system_contains` are case-insensitive
        substrings; `after_tool_result=True` matches only conversations ending with a tool
        result, False only those that do not. Rules are tried in registration order; a rule
        stops matching after `times` uses. Reply functions run on the server's event loop (they
        may be async) and must not block.
        """
        if times is not None and times < 1:
            raise ValueError(f"times must be >= 1 or None, got {times}")
        criteria = _Criteria(
            predicate,
            agent,
            model,
            api,
            user_contains,
            system_contains,
            has_tool,
            after_tool_result,
        )
        rule = FakeRule(criteria.describe(), criteria, reply, times, latency_s)
        with self._lock:
            self._rules.append(rule)
        return rule

    def queue(self, *replies: ReplySource, latency_s: float | None = None) -> None:
        """Queue one-shot replies, used first-in first-out before any rule is consulted."""
        with self._lock:
            for reply in replies:
                described = reply.describe() if isinstance(reply, FakeReply) else repr(reply)
                self._queue.append(
                    FakeRule(f"queued {described}", _Criteria(), reply, 1, latency_s)
                )

    def assert_complete(self) -> None:
        """Raise AssertionError if a queued reply or a rule with finite `times` is unused."""
        with self._lock:
            problems = [rule.description for rule in self._queue]
            problems += [
                f"rule ({rule.description}) used {rule.calls} of {rule.times} times"
                for rule in self._rules
                if rule.times is not None and not rule.exhausted
            ]
        if problems:
            raise AssertionError("fake LLM script not complete:\n  " + "\n  ".join(problems))

    # -- recording ---------------------------------------------------------------------------

    @property
    def requests(self) -> list[FakeRequest]:
        """Snapshot of the recorded requests, oldest first."""
        with self._lock:
            return list(self._requests)

    def requests_for(self, agent: str | None = None, api: Api | None = None) -> list[FakeRequest]:
        """Recorded requests from `agent` and/or to `api` (None means any)."""
        return [
            r
            for r in self.requests
            if (agent is None or r.agent == agent) and (api is None or r.api == api)
        ]

    def count(self, agent: str | None = None, api: Api | None = None) -> int:
        """Number of recorded requests from `agent` and/or to `api`."""
        return len(self.requests_for(agent=agent, api=api))

    def clear(self) -> None:
        """Forget recorded requests; rules and queue stay."""
        with self._lock:
            self._requests.clear()

    def reset(self) -> None:
        """Forget recorded requests, rules and queued replies."""
        with self._lock:
            self._requests.clear()
            self._rules.clear()
            self._queue.clear()

    # -- serving -----------------------------------------------------------------------------

    async def _openai(self, request: Request) -> Response:
        return await self._handle(request, "openai", _fake_openai)

    async def _anthropic(self, request: Request) -> Response:
        return await self._handle(request, "anthropic", _fake_anthropic)

    async def _models(self, request: Request) -> Response:
        with self._lock:
            ids = sorted({"fake-model", *(r.model for r in self._requests if r.model)})
        return JSONResponse(_fake_openai.models_body(ids))

    async def _embeddings(self, request: Request) -> Response:
        body = await request.json()
        with self._lock:
            self.embedding_requests += 1
        refused = _fake_openai.embeddings_refusal(body)
        if refused is not None:
            return JSONResponse(_fake_openai.error_body(400, refused), status_code=400)
        return JSONResponse(_fake_openai.embeddings_body(body))

    async def _handle(self, request: Request, api: Api, wire: _Wire) -> Response:
        try:
            body = await request.json()
        except ValueError:
            body = None
        valid = isinstance(body, dict)
        fake_request = normalize(api, wire, body if valid else {}, request.headers)
        if not valid:
            self._record(fake_request)
            return JSONResponse(wire.error_body(400, "body must be a JSON object"), status_code=400)
        reply, headers = await self._reply_for(fake_request)
        if fake_request.latency_s > 0:
            await asyncio.sleep(fake_request.latency_s)
        error = None
        if reply.error_status is not None:
            error = wire.error_body(reply.error_status, reply.error_message)
            if reply.retry_after_s is not None:
                headers = {**headers, "retry-after": f"{reply.retry_after_s:g}"}
            if not (reply.in_stream and fake_request.stream):
                return JSONResponse(error, status_code=reply.error_status, headers=headers)
        shape: dict[str, Any] = {
            "seq": next(self._seq),
            "model": fake_request.model,
            "text": reply.content,
            "tool_calls": [(call.id, call.name, call.arguments) for call in reply.calls],
            "input_tokens": fake_request.input_tokens,
            "output_tokens": reply.output_tokens,
            "stop": reply.stop,
        }
        read = min(reply.cache_read_tokens, fake_request.input_tokens)
        written = min(reply.cache_write_tokens, fake_request.input_tokens - read)
        if read or written:
            shape |= {"cache_read": read, "cache_write": written}
        if fake_request.stream:
            stream = wire.reply_stream(body, **shape, complete=not reply.broken_off, error=error)
            return StreamingResponse(_aiter(stream), media_type="text/event-stream")
        # Escaped to ASCII, as the streamed frames are: a reply may then carry what UTF-8
        # cannot (a lone surrogate), as a real server's JSON escapes can.
        text = json.dumps(wire.reply_body(**shape))
        if reply.broken_off:
            text = text[: len(text) // 2]
        return Response(text, media_type="application/json")

    def _record(self, fake_request: FakeRequest) -> None:
        with self._lock:
            self._requests.append(fake_request)

    def _pick(self, fake_request: FakeRequest) -> FakeRule | None:
        """Consume the queued reply or matching rule for a request; records the request."""
        with self._lock:
            try:
                if self._queue:
                    rule: FakeRule | None = self._queue.popleft()
                else:
                    live = (r for r in self._rules if not r.exhausted)
                    rule = next((r for r in live if r.matches(fake_request)), None)
                if rule is not None:
                    rule.calls += 1
                override = rule.latency_s if rule is not None else None
                fake_request.latency_s = self._latency_s if override is None else override
                return rule
            finally:
                self._requests.append(fake_request)

    async def _reply_for(self, fake_request: FakeRequest) -> tuple[FakeReply, dict[str, str]]:
        """The reply for a request plus extra response headers; script errors become 500s."""
        try:
            rule = self._pick(fake_request)
            if rule is None:
                if self.strict:
                    message = f"no fake LLM rule matched: {fake_request.summary()}"
                    return FakeReply.error(500, message), _NO_RETRY
                default = f"fake reply from {fake_request.agent or fake_request.model}"
                return FakeReply.text(default), {}
            source = rule.reply
            result = source(fake_request) if callable(source) else source
            reply = await result if inspect.isawaitable(result) else result
        except Exception as exc:
            logger.exception("fake LLM script failed for %s", fake_request.summary())
            return FakeReply.error(500, f"fake LLM script raised {exc!r}"), _NO_RETRY
        if isinstance(reply, str):
            reply = FakeReply.text(reply)
        if not isinstance(reply, FakeReply):
            return FakeReply.error(500, f"reply must be FakeReply or str, got {reply!r}"), _NO_RETRY
        if reply.calls and fake_request.tool_choice == "none":
            # A real model cannot answer this way: the script is wrong, not the caller.
            names = [call.name for call in reply.calls]
            message = (
                f"fake LLM script answered tool calls {names} to a request that allows none "
                f"(tool_choice none): {fake_request.summary()}"
            )
            return FakeReply.error(500, message), _NO_RETRY
        return reply, {}


def main(argv: list[str] | None = None) -> int:
    """Run the fake LLM server standalone with default replies until Ctrl-C or SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="stickyray fake-llm",
        description="Fake OpenAI/Anthropic server answering every request with a default reply.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (default)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay before each reply")
    args = parser.parse_args(argv)
    stopping = threading.Event()
    # signal.signal only works on the main thread; elsewhere (tests) Ctrl-C is moot anyway.
    own_signals = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: stopping.set()) if own_signals else None
    # Bounded, because a benchmark can send millions of requests to a standalone server.
    fake = FakeLLMServer(args.latency_ms / 1000, port=args.port, host=args.host, max_recorded=1000)
    try:
        with fake:
            print(f"fake LLM server on {fake.url}", flush=True)
            print(f"  OpenAI base_url:    {fake.openai_base_url}", flush=True)
            print(f"  Anthropic base_url: {fake.anthropic_base_url}", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                stopping.wait()
    finally:
        if own_signals:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
