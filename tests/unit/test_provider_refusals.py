"""A reply the model refused (Anthropic's ``refusal``, OpenAI's ``message.refusal``) or the
vendor's filter stopped (OpenAI's ``content_filter``) runs none of its tool calls, and its turn
says it was refused."""

from __future__ import annotations

import dataclasses
from typing import Literal

import pytest

from providers.model import ChatMessage, ModelResponse, ToolSpec
from providers.offline import RETURN_TOOL
from serve_app.tools import Tool
from stickyray.testing import FakeLLMServer, FakeReply
from tests.unit.test_agent_loop import close_providers, provider_for  # noqa: F401 (autouse)
from tests.unit.test_provider_replies import bookings_agent, request

Stop = Literal["refusal", "content_filter"]

# How each vendor stops a reply mid-way: Anthropic's streaming classifiers end it with
# stop_reason "refusal", possibly mid tool_use; OpenAI's filter with "content_filter".
STOPPED: list[tuple[str, Stop]] = [("anthropic", "refusal"), ("openai", "content_filter")]


@pytest.mark.parametrize(("kind", "stop"), STOPPED)
@pytest.mark.parametrize("streamed", [False, True], ids=["unstreamed", "streamed"])
async def test_a_tool_call_in_a_refused_reply_does_not_run(
    kind: str, stop: Stop, streamed: bool, fake_llm: FakeLLMServer
) -> None:
    """Anthropic parses a tool_use cut off by the refusal to what it got, often {}: the
    tool's defaults (cancel the latest order)."""
    cancelled: list[str] = []

    def cancel_order(order_id: str = "latest") -> str:
        cancelled.append(order_id)
        return f"cancelled {order_id}"

    agent = bookings_agent(kind, fake_llm, [Tool("cancel_order", "Cancel an order", cancel_order)])
    fake_llm.on(agent="bookings", after_tool_result=True, reply="Cancelled.")
    refused = dataclasses.replace(FakeReply.tool_call("cancel_order", {}), stop=stop)
    fake_llm.on(agent="bookings", reply=refused)
    pieces: list[str] = []

    async def sink(step: int, text: str) -> None:
        pieces.append(text)

    result = await agent.run(request("cancel order A-17"), sink if streamed else None)
    assert cancelled == []
    assert result.tool_calls == [] and result.actions == []
    assert fake_llm.count(agent="bookings") == 1  # the refused turn is not continued
    assert not result.failed and result.llm_calls == 1
    # No text came with the calls: the apology is the reply, and the error says why.
    assert result.reply is not None and "could not answer" in result.reply
    assert result.error == f"empty reply ({stop})"


@pytest.mark.parametrize(("kind", "stop"), [*STOPPED, ("openai", "refusal")])
async def test_a_refused_reply_with_text_and_a_tool_call_is_the_refusal(
    kind: str, stop: Stop, fake_llm: FakeLLMServer
) -> None:
    agent = bookings_agent(kind, fake_llm, [Tool("cancel_order", "Cancel an order", lambda: "x")])
    fake_llm.on(agent="bookings", after_tool_result=True, reply="Cancelled.")
    text = "I can't help with that."
    refused = dataclasses.replace(FakeReply.tool_call("cancel_order", {}, text=text), stop=stop)
    fake_llm.on(agent="bookings", reply=refused)
    result = await agent.run(request("cancel order A-17"))
    assert fake_llm.count(agent="bookings") == 1
    if stop == "content_filter":  # the filter withholds the text: nothing to show
        assert result.error == "empty reply (content_filter)"
    elif kind == "anthropic":  # Claude's text is what its classifier stopped: not shown
        assert result.reply is not None and "could not answer" in result.reply
        assert text not in result.reply and result.error == "empty reply (refusal)"
    else:  # OpenAI's refusal is the model's own words
        assert (result.reply, result.error) == (text, "refusal")


@pytest.mark.parametrize(("kind", "stop"), STOPPED)
async def test_a_handoff_in_a_refused_reply_does_not_hand_off(
    kind: str, stop: Stop, fake_llm: FakeLLMServer
) -> None:
    agent = bookings_agent(kind, fake_llm)
    assert RETURN_TOOL in [spec.name for spec in agent.tool_specs]
    refused = dataclasses.replace(FakeReply.tool_call(RETURN_TOOL, {"reason": "x"}), stop=stop)
    fake_llm.on(agent="bookings", reply=refused)
    result = await agent.run(request("cancel order A-17"))
    assert result.handoff_to is None
    assert result.error is not None and stop in result.error


@pytest.mark.parametrize(("kind", "stop"), STOPPED)
@pytest.mark.parametrize("streamed", [False, True], ids=["unstreamed", "streamed"])
async def test_the_provider_marks_the_calls_of_a_refused_reply_cut_off(
    kind: str, stop: Stop, streamed: bool, fake_llm: FakeLLMServer
) -> None:
    """So nothing that reads a ModelResponse runs them, as with a reply the token limit cut."""
    fake_llm.on(reply=dataclasses.replace(FakeReply.tool_call("cancel_order", {}), stop=stop))

    async def sink(text: str) -> None:
        pass

    response: ModelResponse = await provider_for(kind, fake_llm).complete(
        agent="bookings",
        model="m",
        messages=[ChatMessage(role="user", content="cancel my order")],
        tools=[ToolSpec(name="cancel_order", description="Cancel an order")],
        temperature=None,
        on_text=sink if streamed else None,
    )
    assert response.stop == stop
    assert [call.name for call in response.tool_calls] == ["cancel_order"]
    assert all(call.malformed for call in response.tool_calls)
