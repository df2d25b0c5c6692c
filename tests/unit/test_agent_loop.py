"""The agent loop with the real openai and anthropic SDKs against the fake LLM server."""

from __future__ import annotations

import pytest

from memory.buffer import BufferEntry
from providers.anthropic_provider import AnthropicProvider
from providers.factory import build_provider, check_providers
from providers.openai_provider import OpenAIProvider
from serve_app.agent import Agent
from serve_app.tools import ToolError, ToolOutcome, intent_tools, resolve_tool, resolve_tools
from stickyray.config import parse_config
from stickyray.errors import ConfigError
from stickyray.settings import Settings
from stickyray.testing import FakeLLMServer, FakeReply
from stickyray.turns import AgentRequest
from tests.e2e.teams import openai_team


def team(provider: str, tools: list[str] | None = None, max_iterations: int = 3):
    data = openai_team(provider=provider, model="m-test")
    data["specialists"][1]["tools"] = tools or []
    data["specialists"][1]["max_iterations"] = max_iterations
    return parse_config(data, source=__import__("pathlib").Path("<test>"))


_opened: list = []


@pytest.fixture(autouse=True)
async def close_providers():
    """Providers hold an HTTP session: close every one a test opened."""
    yield
    while _opened:
        await _opened.pop().aclose()


def provider_for(
    kind: str, fake: FakeLLMServer, max_retries: int = 0
) -> OpenAIProvider | AnthropicProvider:
    provider: OpenAIProvider | AnthropicProvider
    if kind == "openai":
        provider = OpenAIProvider.from_settings("k", fake.openai_base_url, 10, max_retries)
    else:
        provider = AnthropicProvider.from_settings("k", fake.anthropic_base_url, 10, max_retries)
    _opened.append(provider)
    return provider


def request(text: str, buffer: list[BufferEntry] | None = None) -> AgentRequest:
    return AgentRequest(thread="default/t", turn=2, text=text, buffer=buffer or [])


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_tool_calls_run_and_feed_back(kind: str, fake_llm: FakeLLMServer) -> None:
    cfg = team(kind, tools=["current_time"])
    agent = Agent(
        cfg.agent("bookings"), cfg, provider_for(kind, fake_llm), resolve_tools(["current_time"])
    )
    fake_llm.on(
        agent="bookings",
        after_tool_result=True,
        reply=lambda r: FakeReply.text(f"it is {r.tool_results[-1]}"),
    )
    fake_llm.on(agent="bookings", reply=FakeReply.tool_call("current_time", {"timezone": "UTC"}))
    result = await agent.run(
        request("what time is it?", [BufferEntry(role="user", text="hi", turn=1)])
    )
    assert result.reply is not None and result.reply.startswith("it is 20")
    assert result.tool_calls == ["current_time"] and result.llm_calls == 2
    assert result.usage.input_tokens > 0 and result.usage.output_tokens > 0
    assert result.usage.requests == 2  # what the report counts as LLM calls
    first = fake_llm.requests[0]
    assert {"current_time", "return_to_supervisor"} <= set(first.tools)
    assert first.api == kind


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_handoff_tool_ends_the_loop(kind: str, fake_llm: FakeLLMServer) -> None:
    cfg = team(kind)
    agent = Agent(cfg.supervisor, cfg, provider_for(kind, fake_llm), [])
    assert {t.name for t in agent.tool_specs} == {
        "transfer_to_invoices",
        "transfer_to_bookings",
        "transfer_to_support",
    }
    fake_llm.on(
        agent="triage", reply=FakeReply.tool_call("transfer_to_support", {"reason": "crash"})
    )
    result = await agent.run(request("the app crashes"))
    assert (result.handoff_to, result.handoff_reason, result.reply) == ("support", "crash", None)


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_the_last_allowed_call_answers_from_the_tool_results(
    kind: str, fake_llm: FakeLLMServer
) -> None:
    cfg = team(kind, tools=["current_time"])
    agent = Agent(
        cfg.agent("bookings"), cfg, provider_for(kind, fake_llm), resolve_tools(["current_time"])
    )
    fake_llm.on(
        lambda r: r.tool_choice == "none",
        agent="bookings",
        reply=lambda r: FakeReply.text(f"from {len(r.tool_results)} results"),
    )
    fake_llm.on(agent="bookings", reply=FakeReply.tool_call("current_time", {}))
    result = await agent.run(request("keep calling tools"))
    assert (result.reply, result.error, result.llm_calls) == ("from 2 results", None, 3)
    assert result.tool_calls == ["current_time", "current_time"]
    assert [r.tool_choice for r in fake_llm.requests] == ["auto", "auto", "none"]
    # Still described: the conversation holds calls of them (Anthropic refuses it otherwise).
    assert fake_llm.requests[-1].tools == fake_llm.requests[0].tools


async def test_a_single_allowed_call_may_hand_off_and_runs_no_tools(
    fake_llm: FakeLLMServer,
) -> None:
    cfg = team("openai", tools=["current_time"], max_iterations=1)
    agent = Agent(
        cfg.agent("bookings"),
        cfg,
        provider_for("openai", fake_llm),
        resolve_tools(["current_time"]),
    )
    fake_llm.queue(FakeReply.tool_call("return_to_supervisor", {"reason": "not mine"}))
    fake_llm.queue(FakeReply.tool_call("current_time", {}))
    handed = await agent.run(request("refund my invoice"))
    assert handed.handoff_to == "triage" and fake_llm.requests[0].tool_choice == "auto"
    result = await agent.run(request("what time is it?"))
    # The tool is not run: nothing would read its result.
    assert result.error == "max_iterations" and "within 1 step." in (result.reply or "")
    assert result.tool_calls == [] and len(fake_llm.requests) == 2


async def test_the_fake_refuses_a_script_that_calls_tools_when_none_are_allowed(
    fake_llm: FakeLLMServer,
) -> None:
    cfg = team("openai", tools=["current_time"])
    agent = Agent(
        cfg.agent("bookings"),
        cfg,
        provider_for("openai", fake_llm),
        resolve_tools(["current_time"]),
    )
    fake_llm.on(agent="bookings", reply=FakeReply.tool_call("current_time", {}))
    result = await agent.run(request("loop forever"))
    assert result.failed and "allows none (tool_choice none)" in (result.error or "")
    assert result.llm_calls == 2 and result.usage.requests == 2


async def test_unknown_tool_and_bad_arguments_go_back_to_the_model(fake_llm: FakeLLMServer) -> None:
    cfg = team("openai", tools=["current_time"])
    agent = Agent(
        cfg.agent("bookings"),
        cfg,
        provider_for("openai", fake_llm),
        resolve_tools(["current_time"]),
    )
    fake_llm.queue(FakeReply.tool_call("no_such_tool", {}))
    fake_llm.queue(FakeReply.tool_call("current_time", {"timezone": ["not", "a", "string"]}))
    fake_llm.queue(FakeReply.text("done"))
    result = await agent.run(request("go"))
    assert result.reply == "done"
    results = fake_llm.requests[-1].tool_results
    assert "no tool called 'no_such_tool'" in str(results[0])
    assert "invalid arguments" in str(results[1])
    fake_llm.assert_complete()


async def test_a_provider_failure_fails_the_answer_and_keeps_the_usage_so_far(
    fake_llm: FakeLLMServer,
) -> None:
    cfg = team("openai", tools=["current_time"])
    tools = resolve_tools(["current_time"])
    agent = Agent(cfg.agent("bookings"), cfg, provider_for("openai", fake_llm), tools)
    fake_llm.queue(FakeReply.tool_call("current_time", {}))
    fake_llm.queue(FakeReply.error(500, "boom"))
    result = await agent.run(request("hi"))
    assert result.failed and result.reply is None
    assert "openai call for agent 'bookings' failed" in (result.error or "")
    assert result.llm_calls == 1 and result.tool_calls == ["current_time"]
    assert result.usage.input_tokens > 0, "the first call was paid for"


async def test_arguments_that_are_not_a_json_object_do_not_run_the_tool(
    fake_llm: FakeLLMServer,
) -> None:
    from providers.model import ToolCall
    from providers.openai_provider import _parse_arguments
    from serve_app.tools import Tool

    cancelled: list[str] = []

    def cancel_order(order_id: str = "latest") -> str:
        cancelled.append(order_id)
        return f"cancelled {order_id}"

    cfg = team("offline")
    agent = Agent(cfg.agent("bookings"), cfg, provider_for("openai", fake_llm), [])
    tools = {"cancel_order": Tool("cancel_order", "Cancel an order", cancel_order)}
    for raw in ('{"order_id": "A-17', "[1, 2]", '"A-17"'):  # cut off, or not an object
        call = ToolCall(id="c1", name="cancel_order", arguments=_parse_arguments(raw))
        assert call.malformed
        refused = await agent._run(call, tools)
        assert "not a JSON object" in refused.text and not refused.ran
    assert cancelled == []
    whole = _parse_arguments('{"order_id": "A-17"}')
    assert not ToolCall(id="c2", name="cancel_order", arguments=whole).malformed
    whole_call = ToolCall(id="c2", name="cancel_order", arguments=whole)
    assert await agent._run(whole_call, tools) == ToolOutcome("cancelled A-17", ran=True)


def test_tool_references_resolve_or_explain() -> None:
    assert resolve_tool("current_time").name == "current_time"
    assert resolve_tool("serve_app.tools:current_time").spec().parameters["properties"]["timezone"]
    with pytest.raises(ToolError, match="unknown tool"):
        resolve_tool("nope")
    with pytest.raises(ToolError, match="cannot import"):
        resolve_tool("no_such_module:f")
    for broken in (":f", ".relative:f"):  # import_module raises ValueError / TypeError
        with pytest.raises(ToolError, match="cannot import"):
            resolve_tool(broken)
    # Found, but nothing a model could call: refused by `stickyray check`, not in a replica.
    with pytest.raises(ToolError, match="needs a function named .* got 'partial'"):
        resolve_tool("tests.unit.tools_for_tests:add_one")
    with pytest.raises(ToolError, match="got '<lambda>'"):
        resolve_tool("tests.unit.tools_for_tests:nameless")
    with pytest.raises(ToolError, match="its parameters cannot be described to the model"):
        resolve_tool("tests.unit.tools_for_tests:takes_a_socket")


def test_missing_api_key_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        check_providers(team("openai"), Settings(OPENAI_API_KEY=None))
    with pytest.raises(ConfigError, match="ANTHROPIC_API_KEY"):
        check_providers(team("anthropic"), Settings(ANTHROPIC_API_KEY=None))
    with pytest.raises(ConfigError, match="embedder"):
        build_provider(team("offline").supervisor, team("offline"), Settings(), None)


async def test_transient_errors_are_retried_with_backoff(fake_llm: FakeLLMServer) -> None:
    cfg = team("openai")
    provider = provider_for("openai", fake_llm, max_retries=2)
    agent = Agent(cfg.agent("bookings"), cfg, provider, [])
    fake_llm.queue(FakeReply.error(503, "overloaded"), FakeReply.text("recovered"))
    result = await agent.run(request("hi"))
    assert result.reply == "recovered"
    assert len(fake_llm.requests) == 2
    fake_llm.assert_complete()


def test_the_window_never_opens_on_an_orphan_reply() -> None:
    cfg = team("offline")
    agent = Agent(cfg.agent("bookings"), cfg, None, [])  # type: ignore[arg-type]
    buffer = [
        BufferEntry(role="user", text="book", turn=1),
        BufferEntry(role="assistant", text="for how many?", turn=1, agent="bookings"),
        BufferEntry(role="user", text="two", turn=2),
    ]
    roles = [m.role for m in agent.build_messages(request("at 8", buffer[1:]))]
    assert roles == ["system", "user", "user"]
    roles = [m.role for m in agent.build_messages(request("at 8", buffer))]
    assert roles == ["system", "user", "assistant", "user", "user"]


class _Failing:
    dimension = 384

    async def embed(self, texts: object) -> object:
        raise RuntimeError("embedder replica unavailable")


@pytest.mark.parametrize("embedder_fails", [False, True])
async def test_the_precheck_never_overrules_a_handoff_and_never_fails_a_turn(
    fake_llm: FakeLLMServer, embedder_fails: bool
) -> None:
    from memory.embedders import LocalEmbedder
    from providers.offline import team_profiles
    from providers.routing import EvidenceRouter

    cfg = team("openai")
    cfg = cfg.model_copy(update={"routing": cfg.routing.model_copy(update={"precheck": True})})
    embedder = _Failing() if embedder_fails else LocalEmbedder()
    router = EvidenceRouter(embedder, team_profiles(cfg))  # type: ignore[arg-type]
    bookings = Agent(cfg.agent("bookings"), cfg, provider_for("openai", fake_llm), [], None, router)
    fake_llm.on(agent="bookings", reply=FakeReply.text("booked"))
    refund = "I want a refund, there is a wrong charge on my last invoice"
    # Handed here by the supervisor in this very turn: the supervisor's decision stands.
    handed = AgentRequest(thread="default/t", turn=1, text=refund, handoff_reason="triage chose")
    assert (await bookings.run(handed)).reply == "booked"
    # A follow-up that moved on: the pre-check hands over, or (embedder down) the model answers.
    moved = await bookings.run(request(refund))
    if embedder_fails:
        assert moved.reply == "booked" and not moved.failed
    else:
        assert moved.handoff_to is not None and fake_llm.count(agent="bookings") == 1


async def test_tools_from_a_module_with_string_annotations() -> None:
    """``from __future__ import annotations``: hints resolve in the tool's own module."""
    from tests.unit import tools_for_tests

    flight = resolve_tool("tests.unit.tools_for_tests:book_flight")
    properties = flight.spec().parameters["properties"]
    assert set(properties) == {"day", "cabin", "seat"}  # **extra is nothing a model can name
    assert properties["day"]["format"] == "date"
    answer = await flight.run({"day": "2026-12-24", "cabin": "business", "seat": "window"})
    assert answer == "2026-12-24 business window"
    assert "invalid arguments" in await flight.run({"day": "2026-12-24", "cabin": "first"})

    cancel = resolve_tool("tests.unit.tools_for_tests:cancel_booking")
    tools_for_tests.SIDE_EFFECTS.clear()
    assert await cancel.run({"booking": "B-1"}) == "cancelled B-1"
    assert tools_for_tests.SIDE_EFFECTS == ["B-1"], "the coroutine was awaited"

    hangs = resolve_tool("tests.unit.tools_for_tests:hangs")
    answer = await hangs.run({}, timeout_s=0.05)
    assert answer.startswith("error: hangs did not finish within 0.05 s")
    # A timeout the tool reports itself is its failure, not the deadline; and no deadline.
    own = resolve_tool("tests.unit.tools_for_tests:backend_timeout")
    expected = "error: backend_timeout failed: TimeoutError: the booking system did not answer"
    assert await own.run({}, timeout_s=30) == expected
    assert await own.run({}) == expected


async def test_intent_tools_take_their_slots_only() -> None:
    data = openai_team(provider="offline")
    data["specialists"][1]["intents"] = [
        {"name": "ReserveTable", "required_slots": ["date"], "optional_slots": ["people"]}
    ]
    cfg = parse_config(data, source=__import__("pathlib").Path("<test>"))
    [tool] = intent_tools(cfg.agent("bookings"))
    assert await tool.run({"date": "friday", "people": None}) == (
        "ReserveTable recorded (date=friday)"
    )
    assert "needs date" in await tool.run({"date": None})
    renamed = await tool.run({"date": "friday", "_intent": "CancelEverything"})
    assert renamed == "error: ReserveTable has no _intent; it takes date, people"


def test_anthropic_temperatures_stop_at_one() -> None:
    data = openai_team(provider="anthropic", model="m")
    data["specialists"][1]["temperature"] = 1.5
    with pytest.raises(ConfigError, match="specialists.1: temperature: at most 1.0 for provider"):
        parse_config(data, source=__import__("pathlib").Path("<test>"))
    data["specialists"][1]["temperature"] = 1.0
    parse_config(data, source=__import__("pathlib").Path("<test>"))


def history_tool_names(request) -> list[str]:
    """The tool call names an outgoing request carries in its history, on either vendor."""
    names: list[str] = []
    for message in request.messages:
        for call in message.get("tool_calls") or []:  # OpenAI
            names.append(call["function"]["name"])
        content = message.get("content")
        if isinstance(content, list):  # Anthropic
            names += [b["name"] for b in content if b.get("type") == "tool_use"]
    return names


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_an_invented_tool_name_goes_back_in_a_form_the_api_takes(
    kind: str, fake_llm: FakeLLMServer
) -> None:
    """Models invent "multi_tool_use.parallel"; OpenAI refuses that name in the history."""
    import re

    cfg = team(kind)
    agent = Agent(cfg.agent("bookings"), cfg, provider_for(kind, fake_llm), [])
    fake_llm.queue(FakeReply.tool_call("multi_tool_use.parallel", {"tool_uses": []}))
    fake_llm.queue(FakeReply.text("done"))
    result = await agent.run(request("go"))
    assert result.reply == "done"
    follow_up = fake_llm.requests[-1]
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{1,64}", n) for n in history_tool_names(follow_up))
    assert "no tool called 'multi_tool_use.parallel'" in follow_up.tool_results[0]


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_a_handoff_beside_other_calls_or_cut_off_runs_nothing_and_goes_back(
    kind: str, fake_llm: FakeLLMServer
) -> None:
    import dataclasses

    ran: list[str] = []

    def book_table(people: int) -> str:
        ran.append(f"booked for {people}")
        return "booked"

    from serve_app.tools import Tool

    cfg = team(kind, max_iterations=4)
    tools = [Tool("book_table", "Book a table", book_table)]
    agent = Agent(cfg.agent("bookings"), cfg, provider_for(kind, fake_llm), tools)
    fake_llm.queue(
        FakeReply.tool_calls([("book_table", {"people": 2}), ("return_to_supervisor", {})])
    )
    cut = FakeReply.tool_call("return_to_supervisor", {"reason": "the user wants a ta"})
    fake_llm.queue(dataclasses.replace(cut, stop="max_tokens"))
    fake_llm.queue(FakeReply.tool_call("return_to_supervisor", {"reason": "taxi"}))
    result = await agent.run(request("book for 2, and I need a taxi"))
    assert (result.handoff_to, result.handoff_reason) == ("triage", "taxi")
    assert ran == [] and result.tool_calls == []  # the booking was not made behind its back
    mixed, cut_off = fake_llm.requests[1].tool_results, fake_llm.requests[2].tool_results[-1:]
    assert all("must be the only tool call" in r for r in mixed) and len(mixed) == 2
    assert "were cut off" in cut_off[0]
    fake_llm.assert_complete()


async def test_the_precheck_suggests_only_agents_the_supervisor_can_reach(
    fake_llm: FakeLLMServer,
) -> None:
    """Otherwise the supervisor sends the thread straight back: a paid round trip a turn."""
    from memory.embedders import LocalEmbedder
    from providers.offline import team_profiles
    from providers.routing import EvidenceRouter

    data = openai_team(provider="openai", model="m-test")
    data["routing"] = {"precheck": True}
    data["supervisor"]["handoffs"] = ["invoices", "bookings"]  # support: not from triage
    data["specialists"][1]["handoffs"] = []  # bookings may only return
    cfg = parse_config(data, source=__import__("pathlib").Path("<test>"))
    router = EvidenceRouter(LocalEmbedder(), team_profiles(cfg))
    bookings = Agent(cfg.agent("bookings"), cfg, provider_for("openai", fake_llm), [], None, router)
    fake_llm.on(agent="bookings", reply=FakeReply.text("booked"))
    refund = "I want a refund, there is a wrong charge on my last invoice"
    crash = "the app crashes every time I open it, I get an error screen"
    assert (await bookings.run(request(refund))).handoff_to == "triage"  # invoices: reachable
    stays = await bookings.run(request(crash))
    assert stays.handoff_to is None and stays.reply == "booked"


async def test_a_sync_tool_that_hangs_takes_only_its_own_threads(fake_llm: FakeLLMServer) -> None:
    """Its calls keep their threads after the timeout; other tools and the model go on."""
    import asyncio
    import threading

    from serve_app.tools import MAX_THREADS_PER_TOOL, Tool

    backend = threading.Event()

    def lookup_order(order_id: str) -> str:
        """A backend with no timeout of its own, as requests.get without one."""
        backend.wait()
        return f"order {order_id}"

    stuck = Tool("lookup_order", "Look up an order", lookup_order)
    clock = resolve_tool("current_time")
    try:
        for n in range(MAX_THREADS_PER_TOOL):
            answer = await stuck.run({"order_id": str(n)}, timeout_s=0.05)
            assert "did not finish within 0.05 s" in answer
        refused = await stuck.run({"order_id": "x"}, timeout_s=5)
        assert refused.startswith("error: lookup_order is not answering: 8 earlier calls")
        assert (await clock.run({}, timeout_s=5)).startswith("20")  # its threads are its own
        # The event loop's default executor, which the model clients use, is free too.
        assert await asyncio.to_thread(lambda: "free") == "free"
        cfg = team("openai")
        fake_llm.on(agent="bookings", reply=FakeReply.text("still here"))
        agent = Agent(cfg.agent("bookings"), cfg, provider_for("openai", fake_llm), [])
        assert (await agent.run(request("hi"))).reply == "still here"
    finally:
        backend.set()  # the backend answers: the threads come back
    for _ in range(500):
        if await stuck.run({"order_id": "y"}, timeout_s=5) == "order y":
            break
        await asyncio.sleep(0.01)  # polling for the threads to finish their calls
    else:
        raise AssertionError("the tool's threads never came back")
