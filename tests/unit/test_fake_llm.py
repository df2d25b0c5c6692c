"""The fake LLM server, exercised through the real openai and anthropic SDKs over HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from stickyray.testing import FakeLLMServer, FakeReply, FakeRequest, FakeToolCall

WEATHER_TOOL_OPENAI: Any = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
}
WEATHER_TOOL_ANTHROPIC: Any = {"name": "get_weather", "input_schema": {"type": "object"}}
AGENT = {"X-Stickyray-Agent": "bookings"}


@pytest.fixture
def fake() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as server:
        yield server


@pytest.fixture
def oai(fake: FakeLLMServer) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=fake.openai_base_url, api_key="test", max_retries=0, default_headers=AGENT
    )


@pytest.fixture
def claude(fake: FakeLLMServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=fake.anthropic_base_url, api_key="test", max_retries=0, default_headers=AGENT
    )


def ask_openai(client: openai.OpenAI, text: str = "hello there", **kwargs: Any) -> Any:
    messages: Any = [{"role": "user", "content": text}]
    return client.chat.completions.create(model="gpt-test", messages=messages, **kwargs)


def ask_claude(client: anthropic.Anthropic, text: str = "hello there", **kwargs: Any) -> Any:
    messages: Any = [{"role": "user", "content": text}]
    return client.messages.create(model="claude-test", max_tokens=64, messages=messages, **kwargs)


# -- OpenAI wire format ------------------------------------------------------------------------


def test_openai_text_reply_usage_and_recorded_agent(
    fake: FakeLLMServer, oai: openai.OpenAI
) -> None:
    fake.on(reply=FakeReply.text("Your table is booked"))
    completion = oai.chat.completions.create(
        model="gpt-test",
        messages=[
            {"role": "system", "content": "You book tables"},
            {"role": "user", "content": "a table for two"},
        ],
    )
    assert completion.choices[0].message.content == "Your table is booked"
    assert completion.choices[0].finish_reason == "stop"
    # 3 system words + 4 user words in; 4 reply words out.
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (7, 4)
    assert completion.usage.total_tokens == 11
    [request] = fake.requests
    assert (request.api, request.model, request.agent) == ("openai", "gpt-test", "bookings")
    assert request.system == "You book tables"
    assert request.last_user_text == "a table for two"
    assert request.headers["x-stickyray-agent"] == "bookings"
    assert request.input_tokens == 7


def test_openai_tool_call_reply(fake: FakeLLMServer, oai: openai.OpenAI) -> None:
    args = {"city": "Lisbon", "days": [1, 2]}
    fake.on(has_tool="get_weather", reply=FakeReply.tool_call("get_weather", args, text="Checking"))
    completion = ask_openai(oai, "weather?", tools=[WEATHER_TOOL_OPENAI])
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Checking"
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == args
    assert fake.requests[0].tools == ["get_weather"]


def test_openai_stream_accumulates_text_and_tool_calls(
    fake: FakeLLMServer, oai: openai.OpenAI
) -> None:
    reply = FakeReply.tool_calls(
        [("get_weather", {"city": "Porto and Braga"}), ("get_time", {"tz": "Europe/Lisbon"})],
        text="Let me look that up",
    )
    fake.queue(reply)
    stream = ask_openai(oai, stream=True, stream_options={"include_usage": True})
    text, finish, usage = "", None, None
    calls: dict[int, dict[str, Any]] = {}
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = delta.id or call["id"]
                call["name"] += (delta.function and delta.function.name) or ""
                call["arguments"] += (delta.function and delta.function.arguments) or ""
    assert text == "Let me look that up"
    assert finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        ("get_weather", {"city": "Porto and Braga"}),
        ("get_time", {"tz": "Europe/Lisbon"}),
    ]
    assert all(c["id"] for c in calls.values())
    assert usage is not None and usage.completion_tokens == reply.output_tokens
    assert fake.requests[0].stream is True


def test_openai_normalizes_tool_round_trip(fake: FakeLLMServer, oai: openai.OpenAI) -> None:
    fake.on(after_tool_result=True, reply="It is sunny")
    completion = oai.chat.completions.create(
        model="gpt-test",
        messages=[
            {"role": "developer", "content": "Be brief"},
            {"role": "user", "content": [{"type": "text", "text": "Weather in Faro?"}]},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": "{}"},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 24C"},
        ],
        tools=[WEATHER_TOOL_OPENAI],
    )
    assert completion.choices[0].message.content == "It is sunny"
    [request] = fake.requests
    assert request.system == "Be brief"
    assert request.last_user_text == "Weather in Faro?"
    assert request.tool_results == ["sunny, 24C"]
    assert request.ends_with_tool_result


def test_openai_models_list(fake: FakeLLMServer, oai: openai.OpenAI) -> None:
    ask_openai(oai)
    assert {"fake-model", "gpt-test"} <= {model.id for model in oai.models.list()}


# -- Anthropic wire format ---------------------------------------------------------------------


def test_anthropic_text_reply_and_usage(fake: FakeLLMServer, claude: anthropic.Anthropic) -> None:
    fake.on(api="anthropic", reply=FakeReply.text("Booked for eight"))
    message = ask_claude(claude, "table for two", system="You book tables")
    assert message.type == "message" and message.role == "assistant"
    assert message.model == "claude-test"
    assert [block.text for block in message.content] == ["Booked for eight"]
    assert message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (6, 3)
    [request] = fake.requests
    assert (request.api, request.agent, request.system) == (
        "anthropic",
        "bookings",
        "You book tables",
    )


def test_anthropic_tool_use_reply(fake: FakeLLMServer, claude: anthropic.Anthropic) -> None:
    args = {"city": "Lisbon", "nested": {"days": 3}}
    fake.on(has_tool="get_weather", reply=FakeReply.tool_call("get_weather", args, call_id="tu_1"))
    message = ask_claude(claude, "weather?", tools=[WEATHER_TOOL_ANTHROPIC])
    assert message.stop_reason == "tool_use"
    [block] = message.content
    assert (block.type, block.id, block.name, block.input) == (
        "tool_use",
        "tu_1",
        "get_weather",
        args,
    )


def test_anthropic_stream_accumulates_text_and_tool_use(
    fake: FakeLLMServer, claude: anthropic.Anthropic
) -> None:
    reply = FakeReply.tool_call(
        "get_weather", {"city": "Porto", "units": "metric"}, text="One moment"
    )
    fake.queue(reply)
    with claude.messages.stream(
        model="claude-test",
        max_tokens=64,
        messages=[{"role": "user", "content": "weather in Porto"}],
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "One moment"
    assert final.stop_reason == "tool_use"
    text_block, tool_block = final.content
    assert text_block.type == "text" and text_block.text == "One moment"
    assert tool_block.type == "tool_use" and tool_block.name == "get_weather"
    assert tool_block.input == {"city": "Porto", "units": "metric"}
    assert final.usage.output_tokens == reply.output_tokens
    assert final.usage.input_tokens == fake.requests[0].input_tokens == 3


def test_anthropic_normalizes_tool_round_trip(
    fake: FakeLLMServer, claude: anthropic.Anthropic
) -> None:
    fake.on(user_contains="FARO", after_tool_result=True, reply="Sunny in Faro")
    message = claude.messages.create(
        model="claude-test",
        max_tokens=64,
        system=[{"type": "text", "text": "Be brief"}],
        tools=[WEATHER_TOOL_ANTHROPIC],
        messages=[
            {"role": "user", "content": "Weather in Faro?"},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "tu_1", "name": "get_weather", "input": {}}],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "tu_1",
                        "content": [{"type": "text", "text": "sunny"}],
                    }
                ],
            },
        ],
    )
    [block] = message.content
    assert block.type == "text" and block.text == "Sunny in Faro"
    [request] = fake.requests
    assert request.system == "Be brief"
    # The tool-result-only user turn is skipped: this is still what the person asked.
    assert request.last_user_text == "Weather in Faro?"
    assert request.tool_results == ["sunny"]
    assert request.tools == ["get_weather"]


async def test_async_clients(fake: FakeLLMServer) -> None:
    fake.on(api="openai", reply="from openai")
    fake.on(api="anthropic", reply=FakeReply.tool_call("lookup", {"q": "x"}))
    async with (
        openai.AsyncOpenAI(base_url=fake.openai_base_url, api_key="test", max_retries=0) as oai,
        anthropic.AsyncAnthropic(
            base_url=fake.anthropic_base_url, api_key="t", max_retries=0
        ) as ac,
    ):
        completion = await oai.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hi"}]
        )
        message = await ac.messages.create(
            model="claude-test", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
        )
    assert completion.choices[0].message.content == "from openai"
    assert message.content[0].type == "tool_use" and message.content[0].input == {"q": "x"}


# -- scripting ---------------------------------------------------------------------------------


def test_rules_match_in_order_with_kwargs(fake: FakeLLMServer, oai: openai.OpenAI) -> None:
    fake.on(agent="someone-else", reply="wrong agent")
    fake.on(model="other-model", reply="wrong model")
    fake.on(system_contains="PIRATE", reply="arr")
    fake.on(lambda r: r.last_user_text.endswith("?"), user_contains="REFUND", reply="question")
    fake.on(user_contains="refund", reply="refund rule")
    fake.on(reply="catch-all")
    assert ask_openai(oai, "I want a Refund?").choices[0].message.content == "question"
    assert ask_openai(oai, "I want a Refund").choices[0].message.content == "refund rule"
    assert ask_openai(oai, "hello").choices[0].message.content == "catch-all"
    pirate = oai.chat.completions.create(
        model="gpt-test",
        messages=[
            {"role": "system", "content": "talk like a pirate"},
            {"role": "user", "content": "hi"},
        ],
    )
    assert pirate.choices[0].message.content == "arr"


def test_times_exhausts_rule_then_falls_through(fake: FakeLLMServer, oai: openai.OpenAI) -> None:
    rule = fake.on(reply="first twice", times=2)
    fake.on(reply="afterwards")
    with pytest.raises(AssertionError, match="used 0 of 2"):
        fake.assert_complete()
    replies = [ask_openai(oai).choices[0].message.content for _ in range(3)]
    assert replies == ["first twice", "first twice", "afterwards"]
    assert rule.calls == 2 and rule.exhausted
    fake.assert_complete()


def test_queue_is_fifo_before_rules_and_checked_by_assert_complete(
    fake: FakeLLMServer, oai: openai.OpenAI
) -> None:
    fake.on(reply="rule")
    fake.queue(FakeReply.text("one"), "two", FakeReply.text("three"))
    assert ask_openai(oai).choices[0].message.content == "one"
    assert ask_openai(oai).choices[0].message.content == "two"
    with pytest.raises(AssertionError, match="three"):
        fake.assert_complete()
    assert ask_openai(oai).choices[0].message.content == "three"
    assert ask_openai(oai).choices[0].message.content == "rule"
    fake.assert_complete()


def test_callable_replies_see_the_request(fake: FakeLLMServer, oai: openai.OpenAI) -> None:
    seen: list[FakeRequest] = []

    def echo(request: FakeRequest) -> FakeReply:
        seen.append(request)
        return FakeReply.text(f"echo: {request.last_user_text}")

    async def shout(request: FakeRequest) -> str:
        return request.last_user_text.upper()

    fake.on(user_contains="shout", reply=shout)
    fake.on(reply=echo)
    assert ask_openai(oai, "ping").choices[0].message.content == "echo: ping"
    assert ask_openai(oai, "shout this").choices[0].message.content == "SHOUT THIS"
    assert [r.last_user_text for r in seen] == ["ping"]


def test_default_reply_names_agent_or_model(fake: FakeLLMServer, oai: openai.OpenAI) -> None:
    assert ask_openai(oai).choices[0].message.content == "fake reply from bookings"
    anonymous = openai.OpenAI(base_url=fake.openai_base_url, api_key="test", max_retries=0)
    assert ask_openai(anonymous).choices[0].message.content == "fake reply from gpt-test"


def test_strict_mode_unmatched_request_is_an_api_error() -> None:
    with FakeLLMServer(strict=True) as fake:
        fake.on(agent="someone-else", reply="never")
        # Default retries left on: the fake marks the error as not retryable.
        oai = openai.OpenAI(base_url=fake.openai_base_url, api_key="test", default_headers=AGENT)
        with pytest.raises(openai.APIStatusError, match="no fake LLM rule matched") as caught:
            ask_openai(oai, "unscripted")
        assert caught.value.status_code == 500
        claude = anthropic.Anthropic(base_url=fake.anthropic_base_url, api_key="t", max_retries=0)
        with pytest.raises(anthropic.APIStatusError, match="unscripted") as caught_a:
            ask_claude(claude, "unscripted")
        assert caught_a.value.status_code == 500
        assert fake.count() == 2


def test_scripted_errors_use_each_apis_shape(
    fake: FakeLLMServer, oai: openai.OpenAI, claude: anthropic.Anthropic
) -> None:
    fake.on(api="openai", reply=FakeReply.error(429, "slow down"))
    fake.on(api="anthropic", reply=FakeReply.error(529, "overloaded"))
    with pytest.raises(openai.RateLimitError) as caught:
        ask_openai(oai)
    assert caught.value.body == {
        "message": "slow down",
        "type": "rate_limit_exceeded",
        "param": None,
        "code": None,
    }
    with pytest.raises(anthropic.APIStatusError) as caught_a:
        ask_claude(claude)
    assert caught_a.value.status_code == 529
    assert isinstance(caught_a.value.body, dict)
    assert caught_a.value.body["error"] == {"type": "overloaded_error", "message": "overloaded"}
    assert [r.api for r in fake.requests] == ["openai", "anthropic"]


def test_failing_reply_function_becomes_500(fake: FakeLLMServer, oai: openai.OpenAI) -> None:
    def broken(request: FakeRequest) -> FakeReply:
        raise KeyError("boom")

    fake.on(reply=broken)
    with pytest.raises(openai.InternalServerError, match="boom"):
        ask_openai(oai)
    assert fake.count() == 1


def test_reply_validation() -> None:
    with pytest.raises(ValueError):
        FakeReply.error(200, "not an error")
    with pytest.raises(ValueError):
        FakeReply.tool_calls([])
    with pytest.raises(TypeError):
        FakeReply.tool_call("t", {"when": object()})
    call = FakeToolCall("t", {"a": "b c"})
    assert FakeReply.tool_calls([call], text="one two").output_tokens == 5


# -- recording, latency, concurrency -----------------------------------------------------------


def test_recording_filters_clear_and_reset(
    fake: FakeLLMServer, oai: openai.OpenAI, claude: anthropic.Anthropic
) -> None:
    fake.on(reply="scripted")
    fake.queue("queued")
    ask_openai(oai)
    ask_claude(anthropic.Anthropic(base_url=fake.anthropic_base_url, api_key="t", max_retries=0))
    assert fake.count() == 2
    assert fake.count(agent="bookings") == 1
    assert [r.api for r in fake.requests_for(api="anthropic")] == ["anthropic"]
    assert fake.requests_for(agent="bookings", api="anthropic") == []
    fake.clear()
    assert fake.requests == []
    assert ask_openai(oai).choices[0].message.content == "scripted"
    fake.queue("left over")
    fake.reset()
    assert fake.requests == []
    fake.assert_complete()
    assert ask_openai(oai).choices[0].message.content == "fake reply from bookings"


def test_latency_global_runtime_and_per_rule(fake: FakeLLMServer, oai: openai.OpenAI) -> None:
    fake.on(user_contains="slow", reply="late", latency_s=0.2)
    started = time.monotonic()
    ask_openai(oai, "slow please")
    assert time.monotonic() - started >= 0.2
    fake.latency_s = 0.15
    started = time.monotonic()
    ask_openai(oai, "normal")
    assert time.monotonic() - started >= 0.15
    assert [r.latency_s for r in fake.requests] == [0.2, 0.15]


async def test_50_concurrent_sdk_requests_share_the_latency() -> None:
    with FakeLLMServer(latency_s=0.2) as fake:
        async with openai.AsyncOpenAI(
            base_url=fake.openai_base_url, api_key="test", max_retries=0
        ) as client:
            started = time.monotonic()
            completions = await asyncio.gather(
                *(
                    client.chat.completions.create(
                        model="gpt-test", messages=[{"role": "user", "content": f"n{i}"}]
                    )
                    for i in range(50)
                )
            )
            elapsed = time.monotonic() - started
    assert len(completions) == 50 and fake.count() == 50
    assert 0.2 <= elapsed < 5


async def test_200_concurrent_streams() -> None:
    async def stream_one(client: openai.AsyncOpenAI, i: int) -> str:
        messages: Any = [{"role": "user", "content": f"n{i}"}]
        stream = await client.chat.completions.create(model="m", messages=messages, stream=True)
        return "".join([chunk.choices[0].delta.content or "" async for chunk in stream])

    with FakeLLMServer(latency_s=0.2) as fake:
        fake.on(reply=lambda request: f"echo {request.last_user_text}")
        async with openai.AsyncOpenAI(
            base_url=fake.openai_base_url, api_key="test", max_retries=0
        ) as client:
            started = time.monotonic()
            texts = await asyncio.gather(*(stream_one(client, i) for i in range(200)))
            elapsed = time.monotonic() - started
    assert texts == [f"echo n{i}" for i in range(200)]
    assert elapsed < 5


def test_command_line_serves_until_sigterm() -> None:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    process = subprocess.Popen(
        [sys.executable, "-m", "stickyray.testing.fake_llm", "--latency-ms", "1"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().split()[-1]  # blocks until the server is listening
        response = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert response.json()["choices"][0]["message"]["content"] == "fake reply from m"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        process.kill()
        process.wait()
