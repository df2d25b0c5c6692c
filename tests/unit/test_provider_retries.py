"""What the providers retry beyond their SDKs: a stream that breaks before its first text is
made again; a Retry-After too long to wait for fails the call instead of holding it."""

from __future__ import annotations

import asyncio
import email.utils
import time
import types
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from providers._retries import refuse_long_retry_after
from providers.anthropic_provider import AnthropicProvider
from providers.model import UNMEASURED, ChatMessage, ModelResponse
from providers.openai_provider import OpenAIProvider
from stickyray.errors import ProviderError
from stickyray.testing import FakeLLMServer, FakeReply, _fake_anthropic, _fake_openai

Provider = OpenAIProvider | AnthropicProvider
KINDS = ["openai", "anthropic"]
REPLY = "Booked a table for two at nine."


def open_provider(kind: str, url: str, retries: int) -> Provider:
    """A provider whose backoff takes no time, so tests wait for nothing."""
    if kind == "openai":
        return OpenAIProvider.from_settings("k", f"{url}/v1", 10, retries, retry_delay_s=0)
    return AnthropicProvider.from_settings("k", url, 10, retries, retry_delay_s=0)


@pytest.fixture(params=KINDS)
async def provider(
    request: pytest.FixtureRequest, fake_llm: FakeLLMServer
) -> AsyncIterator[Provider]:
    opened = open_provider(request.param, fake_llm.url, retries=2)
    yield opened
    await opened.aclose()


async def call(provider: Provider, pieces: list[str] | None) -> ModelResponse:
    async def sink(text: str) -> None:
        assert pieces is not None
        pieces.append(text)

    async with asyncio.timeout(10):  # a call that waits would fail the test, not hang it
        return await provider.complete(
            agent="bookings",
            model="m",
            messages=[ChatMessage(role="user", content="a table for two")],
            tools=[],
            temperature=None,
            on_text=sink if pieces is not None else None,
        )


@pytest.mark.parametrize(
    "failure",
    [
        FakeReply.error_in_stream(529, "Overloaded"),
        FakeReply.error_in_stream(500, "The server had an error"),
        FakeReply.broken_off_text(""),
    ],
    ids=["overloaded", "server-error", "ended-early"],
)
async def test_a_stream_that_breaks_before_its_text_is_made_again(
    failure: FakeReply, provider: Provider, fake_llm: FakeLLMServer
) -> None:
    fake_llm.on(reply=REPLY)
    whole = await call(provider, None)
    fake_llm.queue(failure)
    pieces: list[str] = []
    streamed = await call(provider, pieces)
    assert streamed.text == "".join(pieces) == REPLY
    assert [r.stream for r in fake_llm.requests] == [False, True, True]
    if isinstance(provider, AnthropicProvider):  # its message_start reported tokens spent
        assert streamed.usage.requests == 2
        assert streamed.usage.input_tokens == 2 * whole.usage.input_tokens
    else:  # OpenAI's usage comes after the finish: a request whose tokens are unknown
        assert streamed.usage == whole.usage + UNMEASURED


async def test_a_stream_that_breaks_after_its_text_is_not_made_again(
    provider: Provider, fake_llm: FakeLLMServer
) -> None:
    """The caller has shown the text: a new reply would be told after it."""
    fake_llm.queue(FakeReply.error_in_stream(529, "Overloaded", text="Your refund of"))
    pieces: list[str] = []
    with pytest.raises(ProviderError, match="Overloaded|overloaded"):
        await call(provider, pieces)
    assert "".join(pieces) == "Your refund of"
    assert fake_llm.count() == 1


async def test_a_stream_is_made_again_as_often_as_the_sdk_retries(
    provider: Provider, fake_llm: FakeLLMServer
) -> None:
    fake_llm.on(reply=FakeReply.error_in_stream(500, "still down"))
    with pytest.raises(ProviderError, match="still down"):
        await call(provider, [])
    assert fake_llm.count() == 3  # the first try, then max_retries (2)


async def test_an_error_of_the_request_in_a_stream_is_not_retried(
    provider: Provider, fake_llm: FakeLLMServer
) -> None:
    fake_llm.on(reply=FakeReply.error_in_stream(400, "bad request body"))
    with pytest.raises(ProviderError, match="bad request body"):
        await call(provider, [])
    assert fake_llm.count() == 1


async def call_served(
    kind: str, answer: Callable[[web.Request], Awaitable[web.StreamResponse]], pieces: list[str]
) -> ModelResponse:
    """One streamed call of a provider (two SDK retries) to a server that answers both
    vendors' paths with ``answer``."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    app.router.add_post("/v1/messages", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    provider = open_provider(kind, f"http://127.0.0.1:{runner.addresses[0][1]}", retries=2)
    try:
        return await call(provider, pieces)
    finally:
        await provider.aclose()
        await runner.cleanup()


@pytest.mark.parametrize("kind", KINDS)
async def test_a_connection_dropped_before_the_text_is_made_again(kind: str) -> None:
    """The 200 came, then the connection closed: the SDK does not retry that."""
    wire = _fake_openai if kind == "openai" else _fake_anthropic
    calls = 0

    async def answer(request: web.Request) -> web.StreamResponse:
        nonlocal calls
        calls += 1
        body = await request.json()
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        frames = wire.reply_stream(
            body, seq=calls, model="m", text=REPLY, tool_calls=[], input_tokens=4, output_tokens=7
        )
        if calls == 1:
            await response.write(next(frames).encode())  # the stream's start, no text
            assert request.transport is not None
            request.transport.close()
            return response
        for frame in frames:
            await response.write(frame.encode())
        await response.write_eof()
        return response

    pieces: list[str] = []
    response = await call_served(kind, answer, pieces)
    assert response.text == "".join(pieces) == REPLY
    assert calls == 2


@pytest.mark.parametrize("kind", KINDS)
async def test_a_stream_that_ends_before_any_event_is_made_again(kind: str) -> None:
    """A 200 whose stream ends at once (a proxy's timeout): Anthropic's SDK has no message
    to give (it asserts one); a broken stream, of unknown tokens, made again as OpenAI's."""
    wire = _fake_openai if kind == "openai" else _fake_anthropic
    calls = 0

    async def answer(request: web.Request) -> web.StreamResponse:
        nonlocal calls
        calls += 1
        body = await request.json()
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        if calls > 1:
            for frame in wire.reply_stream(
                body,
                seq=calls,
                model="m",
                text=REPLY,
                tool_calls=[],
                input_tokens=4,
                output_tokens=7,
            ):
                await response.write(frame.encode())
        await response.write_eof()
        return response

    pieces: list[str] = []
    response = await call_served(kind, answer, pieces)
    assert response.text == "".join(pieces) == REPLY
    assert calls == 2
    assert response.usage.requests == 2 and response.usage.unmeasured_requests == 1


@pytest.mark.parametrize(
    "script",
    [
        # Two refusals the SDK retries, then a stream that breaks: the budget is spent.
        [FakeReply.error(503, "busy", retry_after_s=0.01)] * 2 + [FakeReply.broken_off_text("")],
        # A broken stream, then refusals: its new attempt retries once only.
        [FakeReply.broken_off_text("")] + [FakeReply.error(503, "busy", retry_after_s=0.01)] * 2,
    ],
    ids=["refused-then-broken", "broken-then-refused"],
)
async def test_a_call_makes_at_most_max_retries_plus_one_requests_in_all(
    script: list[FakeReply], provider: Provider, fake_llm: FakeLLMServer
) -> None:
    """The SDK's retries and the stream's new attempts share one budget: each attempt
    retrying max_retries times would make up to (max_retries + 1) ** 2 requests."""
    fake_llm.queue(*script)
    fake_llm.on(reply=REPLY)
    with pytest.raises(ProviderError):
        await call(provider, [])
    assert fake_llm.count() == 3  # max_retries (2) + 1


async def test_a_stream_made_again_still_gets_the_retries_left(
    provider: Provider, fake_llm: FakeLLMServer
) -> None:
    fake_llm.queue(FakeReply.broken_off_text(""), FakeReply.error(503, "busy", retry_after_s=0.01))
    fake_llm.on(reply=REPLY)
    pieces: list[str] = []
    assert (await call(provider, pieces)).text == "".join(pieces) == REPLY
    assert fake_llm.count() == 3


@pytest.mark.parametrize("streamed", [False, True], ids=["unstreamed", "streamed"])
async def test_a_long_retry_after_fails_the_call_instead_of_waiting(
    streamed: bool, provider: Provider, fake_llm: FakeLLMServer
) -> None:
    """The Anthropic SDK would sleep the hour asked, holding the turn; the OpenAI SDK fails
    at once: both now fail at once."""
    fake_llm.on(reply=FakeReply.error(429, "slow down", retry_after_s=3600))
    with pytest.raises(ProviderError, match="slow down"):
        await call(provider, [] if streamed else None)
    assert fake_llm.count() == 1


async def test_a_short_retry_after_is_still_waited_for(
    provider: Provider, fake_llm: FakeLLMServer
) -> None:
    fake_llm.queue(FakeReply.error(429, "slow down", retry_after_s=0.01))
    fake_llm.on(reply=REPLY)
    assert (await call(provider, None)).text == REPLY
    assert fake_llm.count() == 2


@pytest.mark.parametrize(
    ("headers", "refused"),
    [
        ({"retry-after": "30"}, False),
        ({"retry-after": "121"}, True),
        ({"retry-after-ms": "300000", "retry-after": "1"}, True),  # ms first, as the SDKs
        ({"retry-after": email.utils.formatdate(time.time() + 3600, usegmt=True)}, True),
        ({"retry-after": email.utils.formatdate(time.time() + 5, usegmt=True)}, False),
        ({"retry-after": "soon"}, False),
        ({}, False),
    ],
)
async def test_retry_after_is_read_in_each_of_its_forms(
    headers: dict[str, str], refused: bool
) -> None:
    response = types.SimpleNamespace(headers=dict(headers))
    await refuse_long_retry_after(response)
    assert (response.headers.get("x-should-retry") == "false") == refused


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("max_tokens", "waited"),
    [(71, True), (1, False)],  # 71 tokens at ~36 a second: 2 s; one token: the client's 0.3 s
)
async def test_an_unstreamed_reply_is_waited_for_as_long_as_its_tokens_take_to_write(
    kind: str, max_tokens: int, waited: bool, fake_llm: FakeLLMServer
) -> None:
    """A reply comes whole after 1 s: a model writing ``max_tokens`` may take that long, so
    the call waits instead of timing out and asking for the reply again; a reply that
    cannot be that long is not waited for past the client's timeout (a hung server)."""
    fake_llm.on(reply=REPLY, latency_s=1.0)
    if kind == "openai":
        provider: Provider = OpenAIProvider.from_settings("k", f"{fake_llm.url}/v1", 0.3, 1)
    else:
        provider = AnthropicProvider.from_settings("k", fake_llm.url, 0.3, 1)
    try:
        async with asyncio.timeout(10):
            reply = provider.complete(
                agent="bookings",
                model="m",
                messages=[ChatMessage(role="user", content="a table for two")],
                tools=[],
                temperature=None,
                max_tokens=max_tokens,
            )
            if waited:
                assert (await reply).text == REPLY
            else:
                with pytest.raises(ProviderError, match="timed out|Timeout|timeout"):
                    await reply
    finally:
        await provider.aclose()
    assert fake_llm.count() == (1 if waited else 2)  # timed out: asked again once
