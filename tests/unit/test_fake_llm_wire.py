"""The fake LLM server's OpenAI and Anthropic wire formats, through the real SDKs over HTTP."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import anthropic
import openai

from stickyray.testing import FakeLLMServer, FakeReply
from tests.unit.fake_clients import ask_claude, ask_openai

WEATHER_TOOL_OPENAI: Any = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
}
WEATHER_TOOL_ANTHROPIC: Any = {"name": "get_weather", "input_schema": {"type": "object"}}
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


# -- Replies that end for another reason --------------------------------------------------------


def test_stop_reasons_in_both_wire_formats_streamed_or_not(
    fake: FakeLLMServer, oai: openai.OpenAI, claude: anthropic.Anthropic
) -> None:
    refusal = FakeReply(content="I can't help with that.", stop="refusal")
    fake.queue(refusal, refusal)
    message = ask_openai(oai).choices[0].message
    assert (message.content, message.refusal) == (None, "I can't help with that.")
    chunks = list(ask_openai(oai, stream=True))
    refused = "".join(c.choices[0].delta.refusal or "" for c in chunks if c.choices)
    assert refused == "I can't help with that."
    fake.queue(FakeReply(stop="content_filter"), FakeReply(content="cut", stop="max_tokens"))
    filtered = ask_openai(oai).choices[0]
    assert (filtered.finish_reason, filtered.message.content) == ("content_filter", None)
    assert ask_openai(oai).choices[0].finish_reason == "length"

    fake.queue(refusal, FakeReply(stop="content_filter"))
    assert ask_claude(claude).stop_reason == "refusal"
    assert ask_claude(claude).content == []
    fake.queue(dataclasses.replace(FakeReply.tool_call("get_weather", {}), stop="max_tokens"))
    with claude.messages.stream(
        model="claude-test", max_tokens=64, messages=[{"role": "user", "content": "weather"}]
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "max_tokens" and final.content[0].type == "tool_use"
