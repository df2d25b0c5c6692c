"""What a model call counts as spent when its reply reports no usage, and when every one of its
streamed attempts breaks: requests, the tokens that are known, and whether the cost is."""

from __future__ import annotations

import json
import logging
import pickle
import types
from pathlib import Path

import anthropic
import httpx2
import openai
import pytest

from providers.anthropic_provider import AnthropicProvider
from providers.model import UNMEASURED, ChatMessage, ModelResponse
from providers.openai_provider import OpenAIProvider
from serve_app.agent import Agent
from serve_app.tools import resolve_tools
from stickyray import metrics
from stickyray.config import ModelPrice, parse_config
from stickyray.errors import ProviderError
from stickyray.testing import FakeLLMServer, FakeReply, _fake_anthropic, _fake_openai
from stickyray.turns import AgentRequest, Usage
from tests.e2e.teams import openai_team
from tests.unit.test_provider_retries import open_provider

KINDS = ["openai", "anthropic"]
PRICE = ModelPrice(input=3, output=15)


def without_usage(kind: str, streamed: bool) -> httpx2.AsyncClient:
    """An HTTP client whose every request gets a reply "hello there" reporting no usage, as
    a compatible server may send: no ``usage`` in the body, none in the stream."""
    shape = {"seq": 1, "model": "m", "text": "hello there", "tool_calls": []}
    tokens = {"input_tokens": 4, "output_tokens": 2}
    wire = _fake_openai if kind == "openai" else _fake_anthropic
    if streamed:  # asked for no stream_options.include_usage, the fake's stream has none
        content = "".join(wire.reply_stream({}, **shape, **tokens)).encode()
        media = "text/event-stream"
    else:
        body = wire.reply_body(**shape, **tokens)
        del body["usage"]
        content, media = json.dumps(body).encode(), "application/json"

    def answer(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, content=content, headers={"content-type": media})

    return httpx2.AsyncClient(transport=httpx2.MockTransport(answer))


async def ask(kind: str, streamed: bool) -> ModelResponse:
    provider: OpenAIProvider | AnthropicProvider
    client = without_usage(kind, streamed)
    if kind == "openai":
        provider = OpenAIProvider(
            openai.AsyncOpenAI(api_key="k", base_url="http://x/v1", http_client=client)
        )
    else:
        provider = AnthropicProvider(
            anthropic.AsyncAnthropic(api_key="k", base_url="http://x", http_client=client)
        )

    async def sink(text: str) -> None:
        pass

    try:
        return await provider.complete(
            agent="a",
            model="m",
            messages=[ChatMessage(role="user", content="a long prompt " * 50)],
            tools=[],
            temperature=None,
            on_text=sink if streamed else None,
        )
    finally:
        await provider.aclose()


# Anthropic's streams are left out: the SDK itself fails on a stream without usage.
@pytest.mark.parametrize(
    ("kind", "streamed"), [("openai", False), ("openai", True), ("anthropic", False)]
)
async def test_a_reply_without_usage_is_a_request_of_unknown_cost_with_a_warning(
    kind: str, streamed: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Not 0 tokens at a known $0.00, nor a failed turn (Anthropic's AttributeError)."""
    with caplog.at_level(logging.WARNING):
        response = await ask(kind, streamed)
    assert response.text == "hello there"
    assert response.usage == Usage(requests=1, unmeasured_requests=1)
    assert PRICE.charge(response.usage).cost_usd is None
    warned = [r for r in caplog.records if "reported no token usage" in r.getMessage()]
    assert len(warned) == 1 and f"{kind} reply for agent a" in warned[0].getMessage()


def test_one_unmeasured_call_makes_the_cost_of_its_turn_unknown() -> None:
    """As a priced model's calls beside an unpriced one's: the sum would be too low."""
    measured = Usage(input_tokens=1_000, output_tokens=200, requests=1)
    assert PRICE.charge(measured).cost_usd == pytest.approx(0.006)
    # An agent's calls are priced together; a turn's agents are summed once priced.
    together = PRICE.charge(measured + UNMEASURED)
    summed = PRICE.charge(measured) + PRICE.charge(UNMEASURED)
    for usage in (together, summed):
        assert usage.cost_usd is None
        assert (usage.requests, usage.unmeasured_requests, usage.input_tokens) == (2, 1, 1_000)


async def call(provider: OpenAIProvider | AnthropicProvider) -> ModelResponse:
    async def sink(text: str) -> None:
        pass

    return await provider.complete(
        agent="bookings",
        model="m",
        messages=[ChatMessage(role="user", content="a table for two")],
        tools=[],
        temperature=None,
        on_text=sink,
    )


@pytest.mark.parametrize("kind", KINDS)
async def test_what_streams_that_all_broke_spent_is_on_the_error(
    kind: str, fake_llm: FakeLLMServer
) -> None:
    fake_llm.on(reply=FakeReply.error_in_stream(500, "still down"))
    provider = open_provider(kind, fake_llm.url, retries=2)
    try:
        with pytest.raises(ProviderError, match="still down") as failed:
            await call(provider)
    finally:
        await provider.aclose()
    spent = Usage.model_validate(failed.value.usage)
    assert spent.requests == fake_llm.count() == 3
    if kind == "anthropic":  # each stream's message_start reported its prompt
        assert spent.input_tokens == 3 * fake_llm.requests[-1].input_tokens
        assert spent.unmeasured_requests == 0
    else:  # OpenAI's usage comes after the finish: none of them reported any
        assert (spent.input_tokens, spent.unmeasured_requests) == (0, 3)
    assert pickle.loads(pickle.dumps(failed.value)).usage == failed.value.usage


@pytest.mark.parametrize("kind", KINDS)
async def test_a_broken_stream_counts_when_the_retry_fails_another_way(
    kind: str, fake_llm: FakeLLMServer
) -> None:
    """The retry refused with a 400: the error carried nothing, so the paid broken stream
    was lost (Anthropic's tokens; OpenAI's unknown cost read as a known $0.00)."""
    status = 500 if kind == "openai" else 529
    fake_llm.queue(FakeReply.error_in_stream(status, "overloaded"), FakeReply.error(400, "bad"))
    provider = open_provider(kind, fake_llm.url, retries=1)
    try:
        with pytest.raises(ProviderError, match="bad") as failed:
            await call(provider)
    finally:
        await provider.aclose()
    assert fake_llm.count() == 2
    spent = Usage.model_validate(failed.value.usage)
    assert spent.requests == 1
    if kind == "anthropic":
        assert spent.input_tokens == fake_llm.requests[0].input_tokens > 0
    else:
        assert spent.unmeasured_requests == 1 and PRICE.charge(spent).cost_usd is None


@pytest.mark.parametrize("kind", KINDS)
async def test_a_turn_whose_streams_all_broke_keeps_what_they_spent(
    kind: str, fake_llm: FakeLLMServer
) -> None:
    """Added to the calls before it, in the usage of the failed agent call."""
    data = openai_team(provider=kind, model="m")
    data["specialists"][1]["tools"] = ["current_time"]
    team = parse_config(data, source=Path("<test>"))
    provider = open_provider(kind, fake_llm.url, retries=1)
    agent = Agent(team.agent("bookings"), team, provider, resolve_tools(["current_time"]))
    fake_llm.queue(FakeReply.tool_call("current_time"))
    fake_llm.on(reply=FakeReply.error_in_stream(529, "Overloaded"))

    async def on_text(step: int, text: str) -> None:
        pass

    try:
        result = await agent.run(AgentRequest(thread="default/t", turn=1, text="time?"), on_text)
    finally:
        await provider.aclose()
    assert result.failed and result.llm_calls == 1
    assert result.usage.requests == fake_llm.count() == 3  # the tool call, then two broken
    first, broken = fake_llm.requests[0].input_tokens, fake_llm.requests[-1].input_tokens
    if kind == "anthropic":
        assert result.usage.input_tokens == first + 2 * broken
    else:
        assert result.usage.input_tokens == first and result.usage.unmeasured_requests == 2


def test_requests_of_unknown_cost_are_counted_in_their_own_metric(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The cost metric leaves them out: without a count of them, a dashboard's cost would
    look complete."""
    counted: dict[str, list[tuple[float, dict[str, str]]]] = {}

    class Counter:
        def __init__(self, name: str) -> None:
            self.name = name

        def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
            counted.setdefault(self.name, []).append((value, tags or {}))

    fields = ("requests", "tokens", "cache_tokens", "cost", "failures", "unmeasured")
    fake = types.SimpleNamespace(**{name: Counter(name) for name in fields})
    monkeypatch.setattr(metrics, "_model_metrics", lambda: fake)
    measured = PRICE.charge(Usage(input_tokens=1_000, output_tokens=200, requests=1))
    metrics.record_model_calls("app", "bookings", "m", PRICE.charge(measured + UNMEASURED))
    tags = {"app": "app", "agent": "bookings", "model": "m"}
    assert counted["unmeasured"] == [(1, tags)]
    assert counted["requests"] == [(2, tags)]
    assert "cost" not in counted  # unknown, so not a figure that is too low
