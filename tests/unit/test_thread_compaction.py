"""Compaction: what leaves a thread's buffer is kept as memories, and by whose memory."""

from __future__ import annotations

from actors.store import InMemoryThreadStore
from actors.thread import Thread
from stickyray.config import TeamConfig
from stickyray.turns import InboundMessage, Usage
from tests.unit.test_thread import KEY, Agents, booking_agents, hand, msg, reply, team

__all__ = ["team"]  # the fixture


async def test_overflow_is_compressed_before_it_leaves(team: TeamConfig) -> None:
    data = team.model_dump()
    data["specialists"][1]["memory"] = {"short_window": 4}  # bookings
    with_memory = TeamConfig.model_validate(data)
    agents, store = booking_agents(), InMemoryThreadStore()
    thread = await Thread.open(KEY, with_memory, store, agents)
    results = [await thread.handle(msg(text)) for text in ("book", "two people", "at nine")]
    assert agents.compressed == [("bookings", ["book", "bookings: book"])]
    # The summary was written within the third turn: its tokens are that turn's.
    assert results[2].usage_by_agent["bookings"] == Usage(input_tokens=103, output_tokens=12)
    assert results[2].usage == Usage(input_tokens=103, output_tokens=12)
    assert results[1].usage == Usage(input_tokens=3, output_tokens=2)
    assert [e.text for e in thread.snapshot().buffer] == [
        "two people",
        "bookings: two people",
        "at nine",
        "bookings: at nine",
    ]
    agents.compress_fails = True
    await thread.handle(msg("by the window"))
    assert len(thread.snapshot().buffer) == 6, "nothing leaves without its memory"
    agents.compress_fails, agents.summary_not_stored = False, True
    unstored = await thread.handle(msg("for four"))
    assert len(thread.snapshot().buffer) == 8, "nothing leaves without its memory"
    # A summary that was written but not stored was paid for within this turn.
    assert unstored.usage == Usage(input_tokens=103, output_tokens=12)
    agents.summary_not_stored = False
    await thread.handle(msg("thanks"))
    assert agents.compressed[-1][1][:2] == ["two people", "bookings: two people"]
    assert len(thread.snapshot().buffer) == 4


async def test_each_users_messages_become_that_users_memory(team: TeamConfig) -> None:
    data = team.model_dump()
    data["specialists"][1]["memory"] = {"short_window": 4}  # bookings
    with_memory = TeamConfig.model_validate(data)
    agents = booking_agents()
    thread = await Thread.open(KEY, with_memory, InMemoryThreadStore(), agents)

    def said(text: str, user: str | None) -> InboundMessage:
        return InboundMessage(text=text, message_id=f"{user}-{text}", user_id=user)

    await thread.handle(said("my card ends 4242", "alice"))
    await thread.handle(said("book", None))  # before the channel knew who it was
    await thread.handle(said("for two", "bob"))  # a shared thread: a new user joins
    await thread.handle(said("at nine", "bob"))
    # Leaving: alice's turn and the anonymous one, each kept for its own user only.
    assert agents.compressed_for == ["alice", "thread:default/t"]
    assert agents.compressed[0][1] == ["my card ends 4242", "bookings: my card ends 4242"]
    assert [e.user_id for e in thread.snapshot().buffer] == ["bob"] * 4


async def test_a_specialists_turns_are_kept_by_its_memory_while_the_supervisor_answers(
    team: TeamConfig,
) -> None:
    """The sample supervisor has no memory: after /supervisor, the bookings turns left the
    buffer unkept once it was full, although bookings keeps its conversation as memories."""
    data = team.model_dump()
    data["threads"]["buffer_size"] = 12
    small = TeamConfig.model_validate(data)
    assert small.supervisor.memory is None and small.agent("bookings").memory is not None
    agents = Agents({"triage": hand("triage", "bookings"), "bookings": reply("bookings")})
    thread = await Thread.open(KEY, small, InMemoryThreadStore(), agents)
    await thread.handle(msg("book a table"))
    await thread.handle(msg("for two"))
    await thread.handle(msg("/supervisor"))
    agents.behaviours["triage"] = reply("triage")  # the supervisor answers from now on
    said = [f"question {i}" for i in range(6)]
    for text in said:
        await thread.handle(msg(text))
    assert agents.compressed == [
        ("bookings", ["book a table", "bookings: book a table"]),
        ("bookings", ["for two", "bookings: for two"]),
    ]
    assert [e.text for e in thread.snapshot().buffer][:2] == ["question 0", "triage: question 0"]
    # The supervisor's own turns, when they leave, have no memory to keep them.
    await thread.handle(msg("bye"))
    assert len(agents.compressed) == 2 and len(thread.snapshot().buffer) == 12
