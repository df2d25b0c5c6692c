"""Streamed replies: the text as the model writes it, then the same turn as unstreamed."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import types
import uuid
from collections.abc import AsyncIterator
from typing import Any
from unittest.mock import ANY

import pytest
import redis as redis_sync
import redis.asyncio as aioredis

import serve_app.ingress as ingress
from actors.key import ThreadKey
from actors.redis_store import connect_redis
from providers.anthropic_provider import AnthropicProvider
from providers.model import ChatMessage, ModelResponse, ToolSpec
from providers.openai_provider import OpenAIProvider
from serve_app.agent import Agent
from serve_app.deltas import DELTAS_TTL_S, DeltaWriter, read_deltas, sse
from serve_app.deployments import AgentDeployment
from serve_app.tools import resolve_tools
from stickyray.config import TeamConfig
from stickyray.errors import MessageIdReused, ProviderError, StoreUnavailable
from stickyray.settings import Settings
from stickyray.testing import FakeLLMServer, FakeReply
from stickyray.turns import AgentRequest, InboundMessage, TurnResult
from tests.e2e.teams import openai_team
from tests.unit.test_http_errors import replica  # noqa: F401 - the fixture

Provider = OpenAIProvider | AnthropicProvider


@pytest.fixture(params=["openai", "anthropic"])
async def provider(
    request: pytest.FixtureRequest, fake_llm: FakeLLMServer
) -> AsyncIterator[Provider]:
    opened: Provider
    if request.param == "openai":
        opened = OpenAIProvider.from_settings("k", fake_llm.openai_base_url, 10, 0)
    else:
        opened = AnthropicProvider.from_settings("k", fake_llm.anthropic_base_url, 10, 0)
    yield opened
    await opened.aclose()


MESSAGES = [
    ChatMessage(role="system", content="You handle bookings."),
    ChatMessage(role="user", content="a table for two"),
]
TOOLS = [ToolSpec(name="book", description="Book a table.")]


async def call(provider: Provider, pieces: list[str] | None) -> ModelResponse:
    async def sink(text: str) -> None:
        assert pieces is not None
        pieces.append(text)

    return await provider.complete(
        agent="bookings",
        model="m",
        messages=MESSAGES,
        tools=TOOLS,
        temperature=None,
        on_text=sink if pieces is not None else None,
    )


@pytest.mark.parametrize(
    "reply",
    [
        FakeReply.text("Booked a table for two at nine, by the window."),
        FakeReply.tool_call("book", {"people": 2, "time": "21:00"}, text="Let me book it."),
        FakeReply.tool_call("book", {"people": 2}),
        FakeReply(content="A table for two at nine and", stop="max_tokens"),
        FakeReply(stop="content_filter"),
    ],
    ids=["text", "text-then-tool", "tool", "cut-off", "filtered"],
)
async def test_a_streamed_reply_is_the_unstreamed_one_told_as_it_comes(
    reply: FakeReply, provider: Provider, fake_llm: FakeLLMServer
) -> None:
    fake_llm.on(agent="bookings", reply=reply)
    whole = await call(provider, None)
    pieces: list[str] = []
    streamed = await call(provider, pieces)
    # The fake server numbers its tool call ids by request.
    assert [(c.name, c.arguments) for c in streamed.tool_calls] == [
        (c.name, c.arguments) for c in whole.tool_calls
    ]
    assert streamed.model_copy(update={"tool_calls": []}) == whole.model_copy(
        update={"tool_calls": []}
    )
    assert "".join(pieces) == whole.text
    if len(whole.text.split()) > 1:
        assert len(pieces) > 1, "the text came in one piece: it was not streamed"
    assert [r.stream for r in fake_llm.requests_for(agent="bookings")] == [False, True]


async def test_a_refusal_is_not_told_as_text(provider: Provider, fake_llm: FakeLLMServer) -> None:
    fake_llm.on(
        agent="bookings", reply=FakeReply(content="I can't help with that.", stop="refusal")
    )
    whole = await call(provider, None)
    pieces: list[str] = []
    streamed = await call(provider, pieces)
    assert streamed == whole and whole.stop == "refusal"
    if isinstance(provider, OpenAIProvider):  # OpenAI streams a refusal apart from the text
        assert pieces == []
    else:  # Claude's text streams until its classifier stops it; then it is no reply
        assert "".join(pieces) == "I can't help with that." and whole.text == ""


async def test_a_streamed_call_that_fails_is_a_provider_error(
    provider: Provider, fake_llm: FakeLLMServer
) -> None:
    fake_llm.on(agent="bookings", reply=FakeReply.error(400, "bad request body"))
    with pytest.raises(ProviderError, match="bad request body"):
        await call(provider, [])


@pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "unstreamed"])
async def test_a_reply_that_breaks_off_cleanly_is_a_provider_error_not_a_reply(
    streamed: bool, provider: Provider, fake_llm: FakeLLMServer
) -> None:
    """The response ends without an error, before the reply does: the text so far is not
    the reply (the SDKs stop iterating a stream without complaint)."""
    fake_llm.on(agent="bookings", reply=FakeReply.broken_off_text("Your refund of $120 was"))
    pieces: list[str] = []
    with pytest.raises(ProviderError):
        await call(provider, pieces if streamed else None)
    if streamed:
        assert "".join(pieces) == "Your refund of $120 was"  # told, then failed


async def test_a_lone_surrogate_in_a_reply_is_a_question_mark(
    provider: Provider, fake_llm: FakeLLMServer
) -> None:
    """A JSON escape a server may send that UTF-8 cannot carry: the turn could not be
    stored or sent with it."""
    fake_llm.on(agent="bookings", reply=FakeReply.text("Here you go \ud83d and more."))
    pieces: list[str] = []
    for response in (await call(provider, None), await call(provider, pieces)):
        assert response.text == "Here you go ? and more."
    assert "\ud83d" in "".join(pieces)  # as told; the writer of deltas makes it "?" too


def test_an_event_stays_on_one_line_for_every_client() -> None:
    frame = sse("delta", {"text": "a\u2028b\x85c\ud83d\nd"})
    lines = frame.decode("ascii").splitlines()  # splits at U+2028 and U+0085 too
    assert lines == ["event: delta", 'data: {"text": "a\\u2028b\\u0085c\\ud83d\\nd"}', ""]


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = connect_redis(redis_url)
    yield client
    await client.aclose()


async def test_the_ingress_reads_the_text_until_the_turn_is_done(redis: aioredis.Redis) -> None:
    key = f"stickyray:{{default/{uuid.uuid4().hex}}}:deltas:m1"
    turn: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    writer = DeltaWriter(redis, key, "bookings")
    read: list[dict] = []

    async def reader() -> None:
        async for piece in read_deltas(redis, key, turn):
            assert piece is not None  # keep-alives only when asked for
            read.append(piece)

    reading = asyncio.create_task(reader())
    for word in ("Booked ", "a ", "table."):
        await writer.write(1, word)
    await writer.write(2, "")  # nothing to say: nothing written
    await writer.close()
    deadline = time.monotonic() + 10
    while "".join(p["text"] for p in read) != "Booked a table.":
        assert time.monotonic() < deadline, f"read so far: {read}"
        await asyncio.sleep(0.01)
    assert not reading.done()  # the turn is not over
    assert 0 < await redis.ttl(key) <= DELTAS_TTL_S
    turn.set_result("done")
    await asyncio.wait_for(reading, 10)
    assert {(p["agent"], p["step"]) for p in read} == {("bookings", 1)}
    assert await redis.exists(key) == 0  # read: gone


async def test_a_reader_that_leaves_early_leaves_nothing_behind(redis: aioredis.Redis) -> None:
    """Its caller went away while the model still writes: the text goes when the turn is
    done, not before (the writer would make it again, for a retry to read later)."""
    key = f"stickyray:{{default/{uuid.uuid4().hex}}}:deltas:m1"
    turn: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    writer = DeltaWriter(redis, key, "bookings")
    await writer.write(1, "Booked ")
    reading = read_deltas(redis, key, turn)
    assert await anext(reading) == {"agent": "bookings", "call": ANY, "step": 1, "text": "Booked "}
    await reading.aclose()  # as when the request is cancelled
    await writer.write(1, "a table \ud83d.")
    await writer.close()
    assert 0 < await redis.ttl(key) <= DELTAS_TTL_S  # written after the reader left: expires
    entries: Any = await redis.xrange(key)
    assert entries[-1][1][b"text"] == b"a table ?."
    turn.set_result("done")
    deadline = time.monotonic() + 10
    while await redis.exists(key):
        assert time.monotonic() < deadline, "the text outlived its turn"
        await asyncio.sleep(0.01)


async def test_text_written_just_before_the_turn_ends_is_still_read(redis: aioredis.Redis) -> None:
    key = f"stickyray:{{default/{uuid.uuid4().hex}}}:deltas:m1"
    writer = DeltaWriter(redis, key, "bookings")
    await writer.write(1, "Hello ")
    await writer.write(3, "there")
    await writer.close()
    turn: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    turn.set_result("done")
    read = [piece async for piece in read_deltas(redis, key, turn)]
    assert read == [
        {"agent": "bookings", "call": ANY, "step": 1, "text": "Hello "},
        {"agent": "bookings", "call": ANY, "step": 3, "text": "there"},
    ]
    calls = {piece["call"] for piece in read if piece is not None}
    assert len(calls) == 1 and None not in calls  # one agent call


async def test_a_turn_run_again_is_told_apart_from_its_first_run(redis: aioredis.Redis) -> None:
    """Its thread actor was lost midway: the turn runs again into the same stream, its steps
    numbered from 1 again, and a client made one bubble of both runs' text."""
    key = f"stickyray:{{default/{uuid.uuid4().hex}}}:deltas:m1"
    for text in ("I can book a ta", "I can book a table for two."):
        writer = DeltaWriter(redis, key, "bookings")
        await writer.write(1, text)
        await writer.close()
    turn: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    turn.set_result("done")
    first, second = [piece async for piece in read_deltas(redis, key, turn)]
    assert first is not None and second is not None
    assert (first["step"], second["step"]) == (1, 1)
    assert first["call"] != second["call"]


async def test_a_quiet_turn_is_kept_alive_while_it_runs(redis: aioredis.Redis) -> None:
    key = f"stickyray:{{default/{uuid.uuid4().hex}}}:deltas:m1"
    turn: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    reading = read_deltas(redis, key, turn, idle_s=0.05)
    assert await anext(reading) is None  # nothing written yet: a keep-alive
    assert await anext(reading) is None
    writer = DeltaWriter(redis, key, "bookings")
    await writer.write(1, "Booked.")
    await writer.close()
    turn.set_result("done")
    rest = [piece async for piece in reading]
    assert [p for p in rest if p is not None] == [
        {"agent": "bookings", "call": ANY, "step": 1, "text": "Booked."}
    ]


class _FailsAfterOneRead:
    """A Redis client whose reads fail after the first, as in an outage during a turn."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self.reads = 0

    async def xread(self, *args: Any, **kw: Any) -> Any:
        self.reads += 1
        if self.reads > 1:
            raise ConnectionError("redis went away")
        return await self._redis.xread(*args, **kw)

    async def delete(self, key: str) -> int:
        return int(await self._redis.delete(key))


async def test_a_turn_stays_kept_alive_after_its_text_cannot_be_read(
    redis: aioredis.Redis,
) -> None:
    """The keep-alives stopped with the text: a long turn's connection fell silent until it
    ended, and a proxy closing idle connections lost the caller its turn."""
    key = f"stickyray:{{default/{uuid.uuid4().hex}}}:deltas:m1"
    turn: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    client = _FailsAfterOneRead(redis)
    reading = read_deltas(client, key, turn, idle_s=0.05)  # type: ignore[arg-type]
    for _ in range(3):  # the outage came at the second read
        assert await anext(reading) is None
    assert client.reads == 2
    turn.set_result("done")
    assert [piece async for piece in reading] == []


async def test_an_agent_replica_streams_its_reply_when_asked(
    settings: Settings, fake_llm: FakeLLMServer, redis: aioredis.Redis
) -> None:
    team = TeamConfig.model_validate(openai_team())
    serving = AgentDeployment.__new__(AgentDeployment)
    await AgentDeployment.__init__(serving, "invoices", team, settings, None, "test")
    try:
        reply = "Your invoice of March was paid on the 4th."
        fake_llm.on(agent="invoices", reply=FakeReply.text(reply))
        key = f"stickyray:{{default/{uuid.uuid4().hex}}}:deltas:m1"
        asked = AgentRequest(thread="default/t", turn=1, text="was it paid?", stream_to=key)
        result = await serving.run(asked)
        assert result.reply == reply
        entries: Any = await redis.xrange(key)
        assert len(entries) >= 1
        assert "".join(f[b"text"].decode() for _, f in entries) == reply
        assert {(f[b"agent"], f[b"step"]) for _, f in entries} == {(b"invoices", b"1")}

        unstreamed = await serving.run(asked.model_copy(update={"stream_to": None}))
        assert unstreamed.reply == reply
        assert [r.stream for r in fake_llm.requests_for(agent="invoices")] == [True, False]
    finally:
        closing = serving.__del__()
        assert closing is not None
        await closing


async def test_each_model_call_of_the_loop_is_numbered(
    provider: Provider, fake_llm: FakeLLMServer
) -> None:
    """Text written before tool calls is step 1; the reply, after their results, step 2."""
    data = openai_team(provider=provider.name, model="m")
    data["specialists"][1]["tools"] = ["current_time"]
    team = TeamConfig.model_validate(data)
    agent = Agent(team.agent("bookings"), team, provider, resolve_tools(["current_time"]))
    fake_llm.on(
        agent="bookings",
        reply=FakeReply.tool_call("current_time", text="Let me look."),
        times=1,
    )
    fake_llm.on(agent="bookings", reply=FakeReply.text("It is open now."))
    told: list[tuple[int, str]] = []

    async def sink(step: int, text: str) -> None:
        told.append((step, text))

    result = await agent.run(AgentRequest(thread="default/t", turn=1, text="open?"), sink)
    assert result.reply == "It is open now." and result.tool_calls == ["current_time"]
    steps = {step: "".join(t for s, t in told if s == step) for step, _ in told}
    assert steps == {1: "Let me look.", 2: "It is open now."}


def events_of(body: str) -> list[tuple[str, dict]]:
    """The server-sent events of ``body``, as (event, data) pairs; comments left out."""
    found = []
    for frame in body.strip().split("\n\n"):
        if frame.startswith(":"):
            continue
        lines = dict(line.split(": ", 1) for line in frame.splitlines())
        found.append((lines["event"], json.loads(lines["data"])))
    return found


def test_a_streamed_message_answers_its_text_then_its_turn(
    replica: types.SimpleNamespace,  # noqa: F811
    redis_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Through the real app, with a directory whose agent writes as a replica does."""
    instance = replica.instance
    portal_redis: list[aioredis.Redis] = []

    class Writing(type(instance._directory)):  # type: ignore[misc]
        fail_after_text: Exception | None = None

        async def send(self, key: ThreadKey, message: InboundMessage) -> TurnResult:
            if self.fail is not None:  # refused before any agent runs
                raise self.fail
            if message.stream:
                # Each request runs in an event loop of its own: so does its client.
                portal_redis.append(connect_redis(redis_url))
                deltas = key.deltas_key(message.message_id, message.fingerprint)
                writer = DeltaWriter(portal_redis[-1], deltas, "b")
                for word in ("All ", "booked."):
                    await writer.write(1, word)
                await writer.close()
                if self.fail_after_text is not None:  # the agent's replica died, say
                    raise self.fail_after_text
            return await super().send(key, message)

    instance._directory = Writing()
    instance._redis = connect_redis(redis_url)
    instance._turns = set()
    thread = f"t-{uuid.uuid4().hex[:8]}"
    url = f"/v1/threads/{thread}/messages"
    body = {"text": "book", "message_id": "m1", "stream": True}
    response = replica.client.post(url, json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = events_of(response.text)
    assert events[-1][0] == "turn" and events[-1][1]["reply"] == "ok"
    assert "".join(data["text"] for name, data in events if name == "delta") == "All booked."
    assert instance._directory.sent[0].stream is True
    # Unstreamed, as ever: JSON, and the message is not marked.
    plain = replica.client.post(url, json={"text": "more"})
    assert plain.json()["reply"] == "ok" and instance._directory.sent[1].stream is False
    # Refused before any text: the status it has unstreamed, for clients, proxies and logs.
    instance._directory.fail = StoreUnavailable("redis", "down")
    refused = replica.client.post(url, json={"text": "again", "stream": True})
    assert refused.status_code == 503
    assert refused.json()["error"] == "redis is unavailable; the message was not processed"
    # Once the stream began, a failure is its last event, with the status it would have had.
    instance._directory.fail = None
    instance._directory.fail_after_text = StoreUnavailable("redis", "down")
    instance._redis = connect_redis(redis_url)  # each request runs in a loop of its own
    with caplog.at_level(logging.INFO, logger="serve_app.ingress"):
        failed = events_of(replica.client.post(url, json={"text": "again", "stream": True}).text)
    # Read and logged whether or not its caller is still there to be told.
    assert "a streamed turn ended without a reply: StoreUnavailable" in caplog.text
    assert "".join(data["text"] for name, data in failed if name == "delta") == "All booked."
    assert failed[-1][0] == "error"
    assert failed[-1][1] == {
        "status": 503,
        "error": "redis is unavailable; the message was not processed",
    }
    instance._directory.fail_after_text = None
    # A different message sent with an id in use reads nothing of that one's reply.
    in_use = InboundMessage(text="book a table", message_id="m9")
    writing = redis_sync.Redis.from_url(redis_url)
    try:
        deltas = ThreadKey.of(thread).deltas_key("m9", in_use.fingerprint)
        writing.xadd(deltas, {"agent": "b", "step": 1, "text": "Your table is booked"})
    finally:
        writing.close()
    instance._directory.fail = MessageIdReused(thread, "m9")
    instance._redis = connect_redis(redis_url)  # each request runs in a loop of its own
    reused = replica.client.post(
        url, json={"text": "cancel it", "message_id": "m9", "stream": True}
    )
    assert reused.status_code == 422 and "message_id" in reused.json()["error"]
    assert "booked" not in reused.text
    # Bad input is refused before any event.
    for stream in ("maybe", "true", 1):  # only JSON's true and false
        bad = replica.client.post(url, json={"text": "x", "stream": stream})
        assert bad.status_code == 422 and "body.stream" in bad.json()["error"]


def test_a_quiet_streamed_turn_sends_keep_alives(
    replica: types.SimpleNamespace,  # noqa: F811
    redis_url: str,
) -> None:
    """Routing, tools and retries can keep a turn quiet for longer than a proxy waits."""
    instance = replica.instance
    instance._keepalive_s = 0.05

    class Slow(type(instance._directory)):  # type: ignore[misc]
        async def send(self, key: ThreadKey, message: InboundMessage) -> TurnResult:
            await asyncio.sleep(0.5)  # a model that takes its time
            return await super().send(key, message)

    instance._directory = Slow()
    instance._redis = connect_redis(redis_url)
    instance._turns = set()
    response = replica.client.post(
        f"/v1/threads/t-{uuid.uuid4().hex[:8]}/messages", json={"text": "hi", "stream": True}
    )
    assert response.status_code == 200
    frames = response.text.strip().split("\n\n")
    assert len(frames) >= 3 and set(frames[:-1]) == {": keep-alive"}
    assert events_of(response.text) == [("turn", events_of(frames[-1])[0][1])]


def test_a_streamed_turn_whose_caller_left_has_its_failure_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def left() -> None:
        turn: asyncio.Future[TurnResult] = asyncio.get_running_loop().create_future()
        turn.add_done_callback(ingress._settled)
        turn.set_exception(StoreUnavailable("redis", "down"))
        await asyncio.sleep(0)  # the callbacks run

    with caplog.at_level(logging.INFO, logger="serve_app.ingress"):
        asyncio.run(left())
    assert [r.getMessage() for r in caplog.records] == [
        "a streamed turn ended without a reply: StoreUnavailable: redis is unavailable: down"
    ]
