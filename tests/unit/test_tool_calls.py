"""How tool calls run: at once when a reply sends several, queued for a sync tool's threads,
their failures (exits and unprintable results too) told to the model, their output capped."""

from __future__ import annotations

import asyncio
import sys
import threading
import time

import pytest

from serve_app.agent import Agent
from serve_app.agent_memory import quoted
from serve_app.tools import MAX_THREADS_PER_TOOL, Tool
from stickyray.testing import FakeLLMServer, FakeReply
from tests.unit.test_agent_loop import close_providers, provider_for, request, team  # noqa: F401


async def test_more_calls_than_a_sync_tool_has_threads_wait_for_one() -> None:
    """Busy is not hung: every call is answered, none refused."""

    def lookup_order(order_id: str) -> str:
        time.sleep(0.1)  # a backend's answer time
        return f"order {order_id}"

    tool = Tool("lookup_order", "Look up an order", lookup_order)
    calls = MAX_THREADS_PER_TOOL + 4
    answers = await asyncio.gather(
        *(tool.run({"order_id": str(n)}, timeout_s=10) for n in range(calls))
    )
    assert answers == [f"order {n}" for n in range(calls)]


async def test_a_call_that_times_out_waiting_for_a_thread_never_runs() -> None:
    backend = threading.Event()
    ran: list[str] = []

    def cancel_order(order_id: str) -> str:
        ran.append(order_id)
        backend.wait()
        return f"cancelled {order_id}"

    tool = Tool("cancel_order", "Cancel an order", cancel_order)
    holding = [
        asyncio.create_task(tool.run({"order_id": f"held-{n}"}, timeout_s=10))
        for n in range(MAX_THREADS_PER_TOOL)
    ]
    try:
        for _ in range(500):  # until every thread holds a call
            if len(ran) == MAX_THREADS_PER_TOOL:
                break
            await asyncio.sleep(0.01)
        queued = await tool.run({"order_id": "late"}, timeout_s=0.1)
        assert queued == (
            "error: cancel_order did not start within 0.1 s, its earlier calls still running; "
            "it did not run"
        )
    finally:
        backend.set()
    held = await asyncio.gather(*holding)
    assert held == [f"cancelled held-{n}" for n in range(MAX_THREADS_PER_TOOL)]
    assert "late" not in ran and await tool.run({"order_id": "next"}, 5) == "cancelled next"
    assert "late" not in ran


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_tool_that_exits_or_cannot_be_shown_is_an_error_for_the_model(kind: str) -> None:
    def exits(n: str) -> str:
        sys.exit(2)  # what argparse does with arguments it rejects

    async def exits_async(n: str) -> str:
        sys.exit(2)

    class Detached:
        def __repr__(self) -> str:
            raise RuntimeError("instance is not bound to a session")

    def unprintable(n: str) -> object:
        return Detached()

    async def unprintable_async(n: str) -> object:
        return Detached()

    sync = kind == "sync"
    exit_tool = Tool("lookup", "Look up", exits if sync else exits_async)
    assert await exit_tool.run({"n": "1"}, 5) == "error: lookup failed: SystemExit: 2"
    shown = Tool("lookup", "Look up", unprintable if sync else unprintable_async)
    assert await shown.run({"n": "1"}, 5) == (
        "error: lookup failed: RuntimeError: instance is not bound to a session"
    )


async def test_the_calls_of_one_reply_run_at_once(fake_llm: FakeLLMServer) -> None:
    """Three lookups that each wait for the other two finish only if they run together."""
    together = asyncio.Barrier(3)

    async def check_stock(item: str) -> str:
        async with asyncio.timeout(3):
            await together.wait()
        return f"{item} in stock"

    cfg = team("openai", max_iterations=3)
    tools = [Tool("check_stock", "Check stock", check_stock)]
    agent = Agent(cfg.agent("bookings"), cfg, provider_for("openai", fake_llm), tools)
    items = ["tent", "stove", "lamp"]
    fake_llm.queue(FakeReply.tool_calls([("check_stock", {"item": i}) for i in items]))
    fake_llm.on(
        agent="bookings",
        after_tool_result=True,
        reply=lambda r: FakeReply.text(" / ".join(r.tool_results[-3:])),
    )
    result = await agent.run(request("do you have a tent, a stove and a lamp?"))
    assert result.reply == "tent in stock / stove in stock / lamp in stock"  # in call order
    assert result.tool_calls == ["check_stock"] * 3


async def test_a_long_tool_output_keeps_its_start_and_end_within_the_limit(
    fake_llm: FakeLLMServer,
) -> None:
    rows = "\n".join(f"row {n}: {'x' * 50}" for n in range(20_000))  # about 1.2 MB

    def export_orders() -> str:
        return f"header\n{rows}\ntotal: 20000 rows"

    cfg = team("openai", max_iterations=3)
    limit = cfg.agent("bookings").tool_output_max_chars
    tools = [Tool("export_orders", "Export the orders", export_orders)]
    agent = Agent(cfg.agent("bookings"), cfg, provider_for("openai", fake_llm), tools)
    fake_llm.queue(FakeReply.tool_call("export_orders", {}))
    fake_llm.on(agent="bookings", after_tool_result=True, reply=FakeReply.text("done"))
    assert (await agent.run(request("export my orders"))).reply == "done"
    (seen,) = fake_llm.requests[-1].tool_results
    assert len(seen) <= limit
    assert seen.startswith("header\nrow 0:") and seen.endswith("total: 20000 rows")
    cut = len(export_orders()) - len(seen.split("\n[... ", 1)[0]) - len(seen.rsplit("]\n", 1)[1])
    assert f"[... {cut:,} characters cut ...]" in seen


async def test_what_tools_did_is_recorded_and_told_to_the_agent_handed_the_thread(
    fake_llm: FakeLLMServer,
) -> None:
    """An agent that books and then hands off: the next agent is told the booking is done."""

    def book_room(hotel: str) -> str:
        return f"booked {hotel}, confirmation BK-123"

    cfg = team("openai", max_iterations=3)
    tools = [Tool("book_room", "Book a room", book_room)]
    bookings = Agent(cfg.agent("bookings"), cfg, provider_for("openai", fake_llm), tools)
    fake_llm.queue(
        FakeReply.tool_call("book_room", {"hotel": "Ritz"}),
        FakeReply.tool_call("return_to_supervisor", {"reason": "the app crashes"}),
    )
    handed = await bookings.run(request("Book me the Ritz. Also the app keeps crashing."))
    assert handed.handoff_to == "triage"
    line = 'bookings ran book_room({"hotel": "Ritz"}): booked Ritz, confirmation BK-123'
    assert handed.actions == [line]
    triage = Agent(cfg.agent("triage"), cfg, provider_for("openai", fake_llm), [])
    fake_llm.on(agent="triage", reply=FakeReply.text("Your room is booked; about the app..."))
    follow = request("Book me the Ritz. Also the app keeps crashing.").model_copy(
        update={"handoff_reason": handed.handoff_reason, "earlier": handed.actions}
    )
    await triage.run(follow)
    system = fake_llm.requests[-1].system
    assert quoted(line) in system and "do not run them again" in system


async def test_an_argument_the_function_does_not_take_is_refused_not_dropped() -> None:
    """Dropped, {"orderId": "A-123"} cancelled the latest order, cancel_order's default."""
    cancelled: list[str] = []

    def cancel_order(order_id: str = "latest") -> str:
        cancelled.append(order_id)
        return f"cancelled order {order_id}"

    tool = Tool("cancel_order", "Cancel an order", cancel_order)
    outcome = await tool.call({"orderId": "A-123"})
    assert not outcome.ran and "orderId" in outcome.text and cancelled == []
    assert tool.spec().parameters["additionalProperties"] is False
    assert (await tool.call({"order_id": "A-123"})).text == "cancelled order A-123"


async def test_a_tool_taking_any_keywords_gets_every_argument() -> None:
    def search(city: str, **filters: object) -> str:
        return f"{city} {sorted(filters.items())}"

    assert await Tool("search", "Search", search).run({"city": "Lisbon", "stars": 4}) == (
        "Lisbon [('stars', 4)]"
    )


async def test_null_for_an_argument_with_a_default_means_not_given() -> None:
    """As intents take it: models send null for optional parameters they leave out."""

    def local_time(timezone: str = "UTC") -> str:
        return f"time in {timezone}"

    tool = Tool("local_time", "The time", local_time)
    assert await tool.run({"timezone": None}) == "time in UTC"

    # A required argument given as null is still refused.
    def echo(text: str) -> str:
        return text

    assert "invalid arguments" in await Tool("echo", "Echo", echo).run({"text": None})
