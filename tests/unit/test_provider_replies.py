"""Replies that are not a plain answer, through the real SDKs: cut off by the token limit,
refused, filtered, empty, unreadable; and what each provider counts as input tokens."""

from __future__ import annotations

import dataclasses
import json
import socket
from typing import Any

import anthropic
import httpx
import httpx2
import openai
import pytest

from providers.anthropic_provider import AnthropicProvider, to_anthropic
from providers.factory import build_provider
from providers.model import UNMEASURED, ChatMessage, ModelResponse
from providers.openai_provider import OpenAIProvider
from serve_app.agent import Agent
from serve_app.tools import Tool, resolve_tools
from stickyray.config import parse_config
from stickyray.errors import ProviderError
from stickyray.settings import Settings
from stickyray.testing import FakeLLMServer, FakeReply
from stickyray.turns import AgentRequest
from tests.e2e.teams import openai_team
from tests.unit.test_agent_loop import close_providers, provider_for  # noqa: F401 (autouse)

KINDS = ["openai", "anthropic"]


def bookings_agent(kind: str, fake: FakeLLMServer, tools: list[Tool] | None = None) -> Agent:
    data = openai_team(provider=kind, model="m-test")
    data["specialists"][1]["max_iterations"] = 3
    cfg = parse_config(data, source=__import__("pathlib").Path("<test>"))
    return Agent(cfg.agent("bookings"), cfg, provider_for(kind, fake), tools or [])


def request(text: str) -> AgentRequest:
    return AgentRequest(thread="default/t", turn=1, text=text, buffer=[])


@pytest.mark.parametrize("kind", KINDS)
async def test_a_tool_call_the_token_limit_cut_off_does_not_run(
    kind: str, fake_llm: FakeLLMServer
) -> None:
    """Anthropic parses a cut-off tool_use to what it got, often {}: the tool's defaults."""
    cancelled: list[str] = []

    def cancel_order(order_id: str = "latest") -> str:
        cancelled.append(order_id)
        return f"cancelled {order_id}"

    agent = bookings_agent(kind, fake_llm, [Tool("cancel_order", "Cancel an order", cancel_order)])
    fake_llm.on(
        agent="bookings",
        after_tool_result=True,
        reply=lambda r: FakeReply.text(f"tool said: {r.tool_results[-1]}"),
    )
    cut = dataclasses.replace(FakeReply.tool_call("cancel_order", {}), stop="max_tokens")
    fake_llm.on(agent="bookings", reply=cut)
    result = await agent.run(request("cancel order A-17 with a refund"))
    assert cancelled == []
    assert result.reply is not None and "cut off" in result.reply


@pytest.mark.parametrize("kind", KINDS)
async def test_lone_surrogates_in_tool_calls_and_results_do_not_fail_the_turn(
    kind: str, fake_llm: FakeLLMServer
) -> None:
    """A server may send one as a JSON escape; the next request could not encode it."""
    noted: list[str] = []

    def note(s: str) -> str:
        noted.append(s)
        return f"noted {s} and \udc00"

    agent = bookings_agent(kind, fake_llm, [Tool("note", "Take a note", note)])
    fake_llm.on(
        agent="bookings",
        after_tool_result=True,
        reply=lambda r: FakeReply.text(f"tool said: {r.tool_results[-1]}"),
    )
    fake_llm.on(agent="bookings", reply=FakeReply.tool_call("note", {"s": "smile \ud83d"}))
    result = await agent.run(request("note that I smiled"))
    assert noted == ["smile ?"]
    assert result.reply == "tool said: noted smile ? and ?"
    assert result.usage.requests == 2


@pytest.mark.parametrize("kind", KINDS)
async def test_the_fake_matches_the_newest_message_on_either_vendor(
    kind: str, fake_llm: FakeLLMServer
) -> None:
    """A failed turn leaves a message without a reply: Anthropic gets both in one user turn."""
    fake_llm.on(agent="bookings", user_contains="cancel", reply="Cancelling your booking.")
    fake_llm.on(agent="bookings", reply="Hello! How can I help?")
    messages = [
        ChatMessage(role="user", content="cancel my booking"),
        ChatMessage(role="user", content="hello"),
    ]
    response = await provider_for(kind, fake_llm).complete(
        agent="bookings", model="m-test", messages=messages, tools=[], temperature=None
    )
    assert response.text == "Hello! How can I help?"
    assert fake_llm.requests[-1].last_user_text == "hello"


async def test_the_fake_llm_modules_example_runs_as_written(fake_llm: FakeLLMServer) -> None:
    """Its module docstring: a tool call for a flight, then the answer from its result."""
    fake_llm.on(agent="bookings", after_tool_result=True, reply="Found 3 flights.")
    fake_llm.on(
        agent="bookings",
        user_contains="flight",
        reply=FakeReply.tool_call("search_flights", {"to": "LIS"}),
    )
    searched: list[str] = []

    def search_flights(to: str) -> str:
        searched.append(to)
        return "3 flights"

    agent = bookings_agent("openai", fake_llm, [Tool("search_flights", "Search", search_flights)])
    result = await agent.run(request("a flight to Lisbon"))
    assert (result.reply, searched) == ("Found 3 flights.", ["LIS"])
    assert fake_llm.count(agent="bookings") == 2


@pytest.mark.parametrize("kind", KINDS)
async def test_refused_filtered_empty_and_cut_off_replies(
    kind: str, fake_llm: FakeLLMServer
) -> None:
    agent = bookings_agent(kind, fake_llm)
    cases = [
        (FakeReply(content="I can't help with that.", stop="refusal"), "refusal"),
        (FakeReply(content="Your booking is for two peo", stop="max_tokens"), "max_tokens"),
        (FakeReply(stop="content_filter"), None),
        (FakeReply.text(""), "empty reply (end)"),
        (FakeReply.text("  \n"), "empty reply (end)"),
    ]
    for reply, error in cases:
        fake_llm.reset()
        fake_llm.on(agent="bookings", reply=reply)
        result = await agent.run(request("book a table"))
        if reply.stop == "refusal" and kind == "anthropic":
            # Claude's refusal has no message: what its classifier stopped is not shown.
            assert result.reply is not None and "could not answer" in result.reply
            assert result.error == "empty reply (refusal)"
        elif reply.content.strip():
            assert (result.reply, result.error) == (reply.content, error)
        else:
            assert result.reply is not None and "could not answer" in result.reply
            filtered = "content_filter" if kind == "openai" else "refusal"
            assert result.error == (error or f"empty reply ({filtered})")
        assert not result.failed and result.usage.requests == 1


def canned(kind: str, body: bytes, content_type: str = "application/json") -> object:
    """An HTTP client whose every request gets this 200 answer, for the SDKs to parse."""
    # The anthropic SDK brings its own fork of httpx and accepts only that one's clients.
    http = httpx2 if kind == "anthropic" else httpx

    def answer(request: object) -> object:
        return http.Response(200, content=body, headers={"content-type": content_type})

    return http.AsyncClient(transport=http.MockTransport(answer))


async def complete(kind: str, http_client: Any) -> ModelResponse:
    provider: OpenAIProvider | AnthropicProvider
    if kind == "openai":
        provider = OpenAIProvider(
            openai.AsyncOpenAI(
                api_key="k", base_url="http://x/v1", http_client=http_client, max_retries=0
            )
        )
    else:
        provider = AnthropicProvider(
            anthropic.AsyncAnthropic(
                api_key="k", base_url="http://x", http_client=http_client, max_retries=0
            )
        )
    return await ask(provider)


async def ask(provider: OpenAIProvider | AnthropicProvider) -> ModelResponse:
    """One user message to ``provider``, which is closed afterwards."""
    try:
        return await provider.complete(
            agent="a",
            model="m",
            messages=[ChatMessage(role="user", content="hi")],
            tools=[],
            temperature=None,
        )
    finally:
        await provider.aclose()


@pytest.mark.parametrize("kind", KINDS)
async def test_an_answer_in_no_known_shape_is_a_provider_error(kind: str) -> None:
    """A proxy's HTML page with a 200 status fails like an error status, not with a traceback."""
    with pytest.raises(ProviderError, match="unreadable response"):
        await complete(kind, canned(kind, b"<html>maintenance</html>", "text/html"))


def reply_with_usage(kind: str, usage: dict[str, Any]) -> bytes:
    """A plain answer of ``kind``'s API whose usage object is ``usage``."""
    if kind == "openai":
        body: dict[str, Any] = {
            "id": "c",
            "object": "chat.completion",
            "created": 0,
            "model": "m",
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": "hello"},
                }
            ],
        }
    else:
        body = {
            "id": "m",
            "type": "message",
            "role": "assistant",
            "model": "m",
            "content": [{"type": "text", "text": "hello"}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
        }
    return json.dumps({**body, "usage": usage}).encode()


@pytest.mark.parametrize(
    ("kind", "usage"),
    [
        ("openai", {"prompt_tokens": None, "completion_tokens": 3, "total_tokens": None}),
        ("openai", {"completion_tokens": 3}),
        ("openai", {"prompt_tokens": 5}),
        ("openai", {}),
        ("anthropic", {"input_tokens": None, "output_tokens": 3}),
        ("anthropic", {"output_tokens": 3}),
        ("anthropic", {"input_tokens": 5}),
        ("anthropic", {}),
    ],
)
async def test_usage_without_its_token_counts_makes_the_request_unmeasured(
    kind: str, usage: dict[str, Any]
) -> None:
    """A compatible server's usage that leaves out (or nulls) a count: taken as 0, the cost
    would be too low; unmeasured, it is unknown."""
    response = await complete(kind, canned(kind, reply_with_usage(kind, usage)))
    assert response.text == "hello"
    assert response.usage == UNMEASURED


@pytest.mark.parametrize("kind", KINDS)
async def test_usage_with_its_token_counts_is_measured(kind: str) -> None:
    counts = (
        {"prompt_tokens": 5, "completion_tokens": 3}
        if kind == "openai"
        else {"input_tokens": 5, "output_tokens": 3}
    )
    response = await complete(kind, canned(kind, reply_with_usage(kind, counts)))
    assert (response.usage.input_tokens, response.usage.output_tokens) == (5, 3)
    assert response.usage.unmeasured_requests == 0


async def test_anthropic_input_tokens_include_the_prompt_cache() -> None:
    """As OpenAI's prompt_tokens do: both count every token of the prompt."""
    body = {
        "id": "m",
        "type": "message",
        "role": "assistant",
        "model": "m",
        "content": [{"type": "text", "text": "hi"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 50,
            "output_tokens": 2,
            "cache_read_input_tokens": 3000,
            "cache_creation_input_tokens": 1000,
        },
    }
    response = await complete("anthropic", canned("anthropic", json.dumps(body).encode()))
    assert (response.usage.input_tokens, response.usage.output_tokens) == (4050, 2)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("streamed", [False, True])
async def test_prompt_cache_reads_and_writes_are_counted_apart(
    kind: str, streamed: bool, fake_llm: FakeLLMServer
) -> None:
    """Both vendors' cache counts, through their SDKs: OpenAI reports reads only."""
    fake_llm.on(reply=FakeReply.text("hello there").cached(read=3, written=2))
    provider = provider_for(kind, fake_llm)
    pieces: list[str] = []

    async def sink(text: str) -> None:
        pieces.append(text)

    response = await provider.complete(
        agent="bookings",
        model="m",
        messages=[ChatMessage(role="user", content="one two three four five six seven")],
        tools=[],
        temperature=None,
        on_text=sink if streamed else None,
    )
    assert response.text == "hello there" and ("".join(pieces) == "hello there") == streamed
    prompt = fake_llm.requests[-1].input_tokens
    written = 2 if kind == "anthropic" else 0
    usage = response.usage
    assert (usage.input_tokens, usage.output_tokens) == (prompt, 2)  # every prompt token
    assert (usage.cached_input_tokens, usage.cache_write_tokens) == (3, written)


def test_whitespace_only_text_is_not_sent_to_anthropic() -> None:
    """The Messages API answers 400 to a text block with no visible character."""
    _, wire = to_anthropic(
        [
            ChatMessage(role="user", content="hi"),
            ChatMessage(role="assistant", content="\n\n"),
            ChatMessage(role="user", content="again"),
        ]
    )
    assert wire == [
        {
            "role": "user",
            "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "again"}],
        }
    ]


@pytest.mark.parametrize("kind", KINDS)
async def test_an_empty_base_url_variable_means_the_vendors_url(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given None, the SDKs would read the empty variable themselves and call ''."""
    monkeypatch.setenv("OPENAI_BASE_URL", "")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", "")
    settings = Settings(OPENAI_API_KEY="k", ANTHROPIC_API_KEY="k")
    cfg = parse_config(
        openai_team(provider=kind, model="m"), source=__import__("pathlib").Path("<t>")
    )
    provider = build_provider(cfg.agent("bookings"), cfg, settings, None)
    try:
        host = str(provider._client.base_url)  # type: ignore[attr-defined]
        assert host.startswith(f"https://api.{kind}.com")
    finally:
        await provider.aclose()


async def test_a_reply_cut_off_by_the_context_window_is_cut_off_too() -> None:
    body = {
        "id": "m",
        "type": "message",
        "role": "assistant",
        "model": "m",
        "content": [{"type": "tool_use", "id": "t1", "name": "cancel_order", "input": {}}],
        "stop_reason": "model_context_window_exceeded",
        "stop_sequence": None,
        "usage": {"input_tokens": 5, "output_tokens": 2},
    }
    response = await complete("anthropic", canned("anthropic", json.dumps(body).encode()))
    assert response.stop == "max_tokens"
    assert [call.malformed for call in response.tool_calls] == [True]


@pytest.mark.parametrize("kind", KINDS)
async def test_a_refused_connection_says_so_not_only_timed_out(kind: str) -> None:
    """Over aiohttp the SDKs call any failure to connect "Request timed out."; the
    operator reading the error must see that nothing listened."""
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    provider = (
        OpenAIProvider.from_settings("k", f"http://127.0.0.1:{port}/v1", 5.0, 0)
        if kind == "openai"
        else AnthropicProvider.from_settings("k", f"http://127.0.0.1:{port}", 5.0, 0)
    )
    with pytest.raises(ProviderError) as failed:
        await ask(provider)
    assert f"Cannot connect to host 127.0.0.1:{port}" in str(failed.value)


async def test_anthropic_thinking_goes_back_unchanged_with_the_tool_results() -> None:
    """With thinking on (the default of newer models), a tool result sent without the
    thinking blocks of the answer that called the tool is refused with a 400."""
    thinking = {"type": "thinking", "thinking": "Call current_time.", "signature": "EqQB..sig"}
    hidden = {"type": "redacted_thinking", "data": "EmwKAhgB..."}
    replies: list[dict[str, Any]] = [
        {
            "content": [
                thinking,
                hidden,
                {"type": "tool_use", "id": "toolu_1", "name": "current_time", "input": {}},
            ],
            "stop_reason": "tool_use",
        },
        {"content": [{"type": "text", "text": "It is noon."}], "stop_reason": "end_turn"},
    ]
    sent: list[dict[str, Any]] = []

    def answer(request: Any) -> Any:
        sent.append(json.loads(request.content))
        body = {
            "id": f"m{len(sent)}",
            "type": "message",
            "role": "assistant",
            "model": "m",
            "stop_sequence": None,
            "usage": {"input_tokens": 5, "output_tokens": 5},
            **replies[len(sent) - 1],
        }
        return httpx2.Response(200, json=body)

    client = anthropic.AsyncAnthropic(
        api_key="k",
        base_url="http://x",
        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(answer)),
        max_retries=0,
    )
    data = openai_team(provider="anthropic", model="m")
    data["specialists"][1]["tools"] = ["current_time"]
    team = parse_config(data, source=__import__("pathlib").Path("<test>"))
    agent = Agent(
        team.agent("bookings"), team, AnthropicProvider(client), resolve_tools(["current_time"])
    )
    result = await agent.run(AgentRequest(thread="default/t", turn=1, text="what time is it?"))
    await client.close()
    assert result.reply == "It is noon."
    called = sent[1]["messages"][-2]
    assert called["role"] == "assistant"
    assert called["content"][:2] == [thinking, hidden]  # first, as sent, signature and all
    assert called["content"][2]["type"] == "tool_use"
