"""The fake LLM server's scripting, recording, latency and CLI, through the real SDKs over HTTP."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from stickyray.testing import FakeLLMServer, FakeReply, FakeRequest, FakeToolCall
from tests.unit.fake_clients import AGENT, ask_claude, ask_openai

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


def test_an_error_can_come_inside_a_stream_or_with_retry_after(
    fake: FakeLLMServer, oai: openai.OpenAI, claude: anthropic.Anthropic
) -> None:
    fake.on(api="openai", reply=FakeReply.error_in_stream(500, "server hiccup", text="Hi"))
    fake.on(api="anthropic", reply=FakeReply.error_in_stream(529, "Overloaded", text="Hi"))
    told: list[str] = []
    with pytest.raises(openai.APIError, match="server hiccup") as caught:
        for chunk in ask_openai(oai, stream=True):
            told += [c.delta.content for c in chunk.choices if c.delta.content]
    assert told == ["Hi"] and caught.value.type == "server_error"
    with pytest.raises(anthropic.APIStatusError, match="overloaded_error"):
        with claude.messages.stream(
            model="claude-test", max_tokens=64, messages=[{"role": "user", "content": "hey"}]
        ) as stream:
            for text in stream.text_stream:
                told.append(text)
    assert told == ["Hi", "Hi"]
    with pytest.raises(openai.InternalServerError):  # unstreamed, the HTTP error
        ask_openai(oai)
    fake.reset()
    fake.on(reply=FakeReply.error(429, "slow down", retry_after_s=3600))
    with pytest.raises(openai.RateLimitError) as limited:
        ask_openai(oai)
    assert limited.value.response.headers["retry-after"] == "3600"


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
    # Served concurrently: one at a time would take 200 x 0.2 s = 40 s. The margin is wide
    # because this only tells concurrent from serial, on however loaded a machine.
    assert elapsed < 20


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
