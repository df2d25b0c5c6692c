"""What a turn's tools did stays known: to the agent handed the thread, in the turn's record,
in the buffer for later turns, and in the apology of a turn that failed after doing it."""

from __future__ import annotations

from actors.store import InMemoryThreadStore
from actors.thread import Thread
from memory.buffer import BufferEntry
from serve_app.agent import Agent
from stickyray.config import TeamConfig, load_config
from stickyray.testing import FakeLLMServer, FakeReply
from stickyray.turns import AgentRequest, AgentResult, action_line
from tests.unit.test_agent_loop import close_providers, provider_for, request, team  # noqa: F401
from tests.unit.test_thread import KEY, Agents, hand, msg, reply

BOOKED = action_line("bookings", "book_room", {"hotel": "Ritz"}, "booked, confirmation BK-123")


def books_then(outcome: str):
    def bookings(req: AgentRequest) -> AgentResult:
        if outcome == "hands off":
            return AgentResult(agent="bookings", handoff_to="support", actions=[BOOKED])
        return AgentResult(agent="bookings", failed=True, error="529 overloaded", actions=[BOOKED])

    return bookings


async def test_the_agent_handed_the_thread_is_told_what_was_done_and_the_turn_keeps_it() -> None:
    seen: list[AgentRequest] = []

    def support(req: AgentRequest) -> AgentResult:
        seen.append(req)
        return reply("support")(req)

    agents = Agents(
        {
            "triage": hand("triage", "bookings"),
            "bookings": books_then("hands off"),
            "support": support,
        }
    )
    store = InMemoryThreadStore()
    team = load_config(None)
    thread = await Thread.open(KEY, team, store, agents)
    result = await thread.handle(msg("Book me the Ritz. Also the app keeps crashing."))
    assert result.status == "completed" and result.agent == "support"
    assert seen[0].earlier == [BOOKED] and result.actions == [BOOKED]
    saved = await store.load(KEY)
    assert saved is not None
    assert [(e.role, e.actions) for e in saved.buffer] == [("user", []), ("assistant", [BOOKED])]


async def test_a_turn_that_failed_after_doing_something_says_so_and_remembers_it() -> None:
    later: list[AgentRequest] = []

    def triage(req: AgentRequest) -> AgentResult:
        if req.turn == 2:
            later.append(req)
            return reply("triage")(req)
        return hand("triage", "bookings")(req)

    agents = Agents({"triage": triage, "bookings": books_then("fails")})
    team: TeamConfig = load_config(None)
    thread = await Thread.open(KEY, team, InMemoryThreadStore(), agents)
    failed = await thread.handle(msg("Book me a room at the Ritz"))
    assert failed.status == "failed" and failed.actions == [BOOKED]
    assert "already done (book_room)" in failed.reply and "before sending it again" in failed.reply
    await thread.handle(msg("Book me a room at the Ritz", "again"))
    (asked,) = later
    assert [(e.role, e.text, e.actions) for e in asked.buffer] == [
        ("user", "Book me a room at the Ritz", [BOOKED])
    ]


async def test_the_model_sees_what_earlier_turns_did(fake_llm: FakeLLMServer) -> None:
    cfg = team("openai")
    agent = Agent(cfg.agent("bookings"), cfg, provider_for("openai", fake_llm), [])
    fake_llm.on(agent="bookings", reply=FakeReply.text("It is booked already: BK-123."))
    failed_turn = BufferEntry(role="user", text="Book the Ritz", turn=1, actions=[BOOKED])
    answered = [
        BufferEntry(role="user", text="And a cab?", turn=2),
        BufferEntry(role="assistant", text="Cab booked.", turn=2, actions=["bookings ran cab()"]),
    ]
    await agent.run(request("Book the Ritz", [failed_turn, *answered]))
    sent = [(m["role"], m["content"]) for m in fake_llm.requests[-1].messages[1:]]
    assert sent == [
        ("user", "Book the Ritz"),
        ("assistant", f"[tool calls run in this turn: {BOOKED}]"),
        ("user", "And a cab?"),
        ("assistant", "[tool calls run in this turn: bookings ran cab()]"),
        ("assistant", "Cab booked."),
        ("user", "Book the Ritz"),
    ]
