"""A thread's recovery, with the in-memory store and in-process agents (no Ray): turns left
pending or failing, store outages, cancelled requests, writes applied twice, fencing."""

from __future__ import annotations

import asyncio

import pytest

from actors.store import InMemoryThreadStore
from actors.thread import MAX_TURN_ATTEMPTS, Thread
from stickyray.config import TeamConfig
from stickyray.errors import (
    ProviderError,
    StoreUnavailable,
    ThreadFenced,
)
from stickyray.turns import (
    AgentRequest,
    AgentResult,
    Usage,
)
from tests.unit.test_thread import KEY, Agents, Behaviour, booking_agents, hand, msg, reply, team

__all__ = ["team"]  # the fixture


async def test_turn_left_pending_is_completed_by_the_next_incarnation(team: TeamConfig) -> None:
    agents, store = booking_agents(), InMemoryThreadStore()
    dead = await Thread.open(KEY, team, store, agents)
    await store.accept(KEY, dead.epoch, msg("book", mid="m1"))  # accepted, then the actor died
    heir = await Thread.open(KEY, team, store, agents)
    assert [t.message_id for t in await store.turns(KEY)] == ["m1"]
    assert heir.active_agent == "bookings"
    retry = await heir.handle(msg("book", mid="m1"))  # the client's retry gets the same turn
    assert (retry.turn, retry.status) == (1, "completed")
    assert agents.calls == [("triage", 1), ("bookings", 1)]


async def test_turn_that_keeps_killing_its_actor_is_failed(team: TeamConfig) -> None:
    agents, store = booking_agents(), InMemoryThreadStore()
    first = await Thread.open(KEY, team, store, agents)
    await store.accept(KEY, first.epoch, msg("poison", mid="m1"))
    for _ in range(MAX_TURN_ATTEMPTS - 1):
        await store.open(KEY)  # incarnations that died while re-running it
    heir = await Thread.open(KEY, team, store, agents)
    (record,) = await store.turns(KEY)
    assert record.status == "failed" and "interrupted 2 times" in (record.error or "")
    assert agents.calls == []
    assert (await heir.handle(msg("next"))).turn == 2


async def test_a_failing_provider_fails_the_turn_not_the_thread(team: TeamConfig) -> None:
    def broken(req: AgentRequest) -> AgentResult:
        raise ProviderError("openai", "bookings", "503 after 3 retries")

    agents = Agents({"triage": hand("triage", "bookings"), "bookings": broken})
    store = InMemoryThreadStore()
    thread = await Thread.open(KEY, team, store, agents)
    result = await thread.handle(msg("book"))
    assert result.status == "failed" and "503 after 3 retries" in (result.error or "")
    assert [t.status for t in await store.turns(KEY)] == ["failed"]
    agents.behaviours["bookings"] = reply("bookings")
    assert (await thread.handle(msg("book again"))).turn == 2


async def test_an_agent_call_that_raises_fails_the_turn_with_what_came_before(
    team: TeamConfig,
) -> None:
    """A replica or its memory store down: the supervisor's routing was still paid for."""

    def down(request: AgentRequest) -> AgentResult:
        raise StoreUnavailable("postgres", "connection refused")

    agents = Agents({"triage": hand("triage", "bookings"), "bookings": down})
    store = InMemoryThreadStore()
    thread = await Thread.open(KEY, team, store, agents)
    result = await thread.handle(msg("book a table"))
    assert (result.status, result.agent) == ("failed", "bookings")
    assert "StoreUnavailable" in (result.error or "")
    assert [(h.from_agent, h.to) for h in result.handoffs] == [("triage", "bookings")]
    assert result.usage_by_agent == {"triage": Usage(input_tokens=5, output_tokens=1)}
    assert (await store.turns(KEY)) == [result]
    assert thread.active_agent is None  # the handoff did not complete


async def test_a_failed_answer_is_a_failed_turn_that_still_counts_its_tokens(
    team: TeamConfig,
) -> None:
    def broken(req: AgentRequest) -> AgentResult:
        return AgentResult(
            agent="bookings",
            usage=Usage(input_tokens=40, output_tokens=7),
            error="openai call for agent 'bookings' failed: 429",
            failed=True,
        )

    agents = Agents({"triage": hand("triage", "bookings"), "bookings": broken})
    store = InMemoryThreadStore()
    thread = await Thread.open(KEY, team, store, agents)
    result = await thread.handle(msg("book"))
    assert result.status == "failed" and "failed: 429" in (result.error or "")
    assert result.usage_by_agent == {
        "triage": Usage(input_tokens=5, output_tokens=1),
        "bookings": Usage(input_tokens=40, output_tokens=7),
    }
    assert result.usage == Usage(input_tokens=45, output_tokens=8)
    assert [t.status for t in await store.turns(KEY)] == ["failed"]
    # The user's message stays as context; the apology does not.
    assert [e.role for e in thread.snapshot().buffer] == ["user"]
    assert thread.active_agent is None


async def test_store_outage_leaves_state_unchanged_and_recovers(team: TeamConfig) -> None:
    class Flaky(InMemoryThreadStore):
        down = False

        async def commit(self, *args, **kwargs):
            if self.down:
                raise StoreUnavailable("redis", "down")
            return await super().commit(*args, **kwargs)

    agents, store = booking_agents(), Flaky()
    thread = await Thread.open(KEY, team, store, agents)
    store.down = True
    with pytest.raises(StoreUnavailable):
        await thread.handle(msg("book", mid="m1"))
    snap = thread.snapshot()
    assert (snap.turns, snap.active_agent, snap.buffer) == (0, None, [])
    store.down = False
    retry = await thread.handle(msg("book", mid="m1"))  # recovers the accepted turn first
    assert (retry.turn, retry.agent) == (1, "bookings")
    assert [t.message_id for t in await store.turns(KEY)] == ["m1"]


class BlockingAgents(Agents):
    """Agents whose calls hang while ``block`` is set, as a slow model would."""

    def __init__(self, behaviours: dict[str, Behaviour]) -> None:
        super().__init__(behaviours)
        self.block = False
        self.started = asyncio.Event()

    async def __call__(self, agent: str, request: AgentRequest) -> AgentResult:
        if self.block:
            self.started.set()
            await asyncio.Event().wait()  # until cancelled
        return await super().__call__(agent, request)


async def test_a_turn_cancelled_midway_is_completed_before_the_next(team: TeamConfig) -> None:
    agents = BlockingAgents({"triage": hand("triage", "bookings"), "bookings": reply("bookings")})
    thread = await Thread.open(KEY, team, InMemoryThreadStore(), agents)
    await thread.handle(msg("book a table"))
    agents.block = True
    turn = asyncio.create_task(thread.handle(msg("for two", "m-cancelled")))
    await agents.started.wait()
    turn.cancel()  # as when the HTTP client disconnects
    with pytest.raises(asyncio.CancelledError):
        await turn
    agents.block = False
    after = await thread.handle(msg("at 8pm"))
    assert (after.turn, after.agent, after.status) == (3, "bookings", "completed")
    retried = await thread.handle(msg("for two", "m-cancelled"))
    assert (retried.turn, retried.reply) == (2, "bookings: for two")


async def test_a_retry_cancelled_again_does_not_wedge_the_thread(team: TeamConfig) -> None:
    agents = BlockingAgents({"triage": hand("triage", "bookings"), "bookings": reply("bookings")})
    store = InMemoryThreadStore()
    thread = await Thread.open(KEY, team, store, agents)
    await thread.handle(msg("book a table"))
    agents.block = True
    for _ in range(2):  # the client times out, retries, and times out again
        agents.started.clear()
        turn = asyncio.create_task(thread.handle(msg("for two", "m2")))
        await agents.started.wait()
        turn.cancel()
        with pytest.raises(asyncio.CancelledError):
            await turn
    agents.block = False
    # Interrupted twice, the turn is given up (recorded as failed); the thread goes on.
    assert (await thread.handle(msg("at 8pm"))).turn == 3
    assert [t.status for t in await store.turns(KEY)] == ["completed", "failed", "completed"]


class ResendingStore(InMemoryThreadStore):
    """Applies a write twice, as a client retrying a script whose answer was lost does."""

    resend: str | None = None

    async def accept(self, *args, **kwargs):
        if self.resend == "accept":
            await super().accept(*args, **kwargs)
        return await super().accept(*args, **kwargs)

    async def commit(self, *args, **kwargs):
        if self.resend == "commit":
            await super().commit(*args, **kwargs)
        return await super().commit(*args, **kwargs)

    async def reset(self, *args, **kwargs):
        if self.resend == "commit":
            await super().reset(*args, **kwargs)
        return await super().reset(*args, **kwargs)


@pytest.mark.parametrize("write", ["accept", "commit"])
async def test_a_write_applied_twice_still_answers_the_message_once(
    team: TeamConfig, write: str
) -> None:
    agents, store = booking_agents(), ResendingStore()
    thread = await Thread.open(KEY, team, store, agents)
    store.resend = write
    result = await thread.handle(msg("book", mid="m1"))
    store.resend = None
    assert (result.turn, result.agent, result.status) == (1, "bookings", "completed")
    assert [t.message_id for t in await store.turns(KEY)] == ["m1"]
    assert (await thread.handle(msg("for two"))).turn == 2
    # The second send of an accept answers "turn 1 is pending": it runs once, not twice.
    assert agents.calls == [("triage", 1), ("bookings", 1), ("bookings", 2)]


@pytest.mark.parametrize("command", ["/supervisor", "/reset"])
async def test_a_command_applied_twice_is_in_force_for_the_next_message(
    team: TeamConfig, command: str
) -> None:
    """The second send answers with the stored result; the state it stored still counts."""
    agents, store = booking_agents(), ResendingStore()
    thread = await Thread.open(KEY, team, store, agents)
    await thread.handle(msg("book", mid="m1"))
    store.resend = "commit"
    await thread.handle(msg(command, mid="c1"))
    store.resend = None
    agents.calls.clear()
    after = await thread.handle(msg("book again", mid="m2"))
    assert agents.calls[0] == ("triage", after.turn)  # routed again, not sent to bookings
    assert after.turn == (1 if command == "/reset" else 2)


async def test_a_lost_answer_does_not_count_as_an_interruption(team: TeamConfig) -> None:
    """A turn's accept applied twice, then one cancelled request: it still gets its run."""
    agents = BlockingAgents({"triage": hand("triage", "bookings"), "bookings": reply("bookings")})
    store = ResendingStore()
    thread = await Thread.open(KEY, team, store, agents)
    store.resend = "accept"
    agents.block = True
    turn = asyncio.create_task(thread.handle(msg("book", mid="m1")))
    await agents.started.wait()
    store.resend = None
    turn.cancel()  # the one real interruption
    with pytest.raises(asyncio.CancelledError):
        await turn
    agents.block = False
    retried = await thread.handle(msg("book", mid="m1"))
    assert (retried.status, retried.agent) == ("completed", "bookings")


async def test_a_late_retry_of_a_reset_wipes_nothing_after_another_reset(
    team: TeamConfig,
) -> None:
    agents, store = booking_agents(), InMemoryThreadStore()
    thread = await Thread.open(KEY, team, store, agents)
    await thread.handle(msg("book", mid="m1"))
    first = await thread.handle(msg("/reset", mid="r1"))
    left = await thread.handle(msg("/supervisor", mid="s1"))
    await thread.handle(msg("/reset", mid="r2"))  # forgets m1, not the commands' answers
    await thread.handle(msg("book", mid="m2"))
    await thread.handle(msg("for two", mid="m3"))
    assert await thread.handle(msg("/reset", mid="r1")) == first
    assert await thread.handle(msg("/supervisor", mid="s1")) == left
    assert [t.message_id for t in await store.turns(KEY)] == ["m2", "m3"]
    assert thread.active_agent == "bookings"
    retried = await thread.handle(msg("book", mid="m1"))  # a turn's id is forgotten
    assert retried.turn == 3


async def test_a_superseded_incarnation_cannot_confirm_a_supervisor_command(
    team: TeamConfig,
) -> None:
    agents, store = booking_agents(), InMemoryThreadStore()
    stale = await Thread.open(KEY, team, store, agents)
    current = await Thread.open(KEY, team, store, agents)
    await current.handle(msg("book"))
    assert stale.active_agent is None  # it never saw the handoff
    with pytest.raises(ThreadFenced):
        await stale.handle(msg("/supervisor"))
    left = await current.handle(msg("/supervisor"))
    assert "Leaving bookings" in left.reply


async def test_stale_incarnation_is_fenced_and_stops_serving(team: TeamConfig) -> None:
    agents, store = booking_agents(), InMemoryThreadStore()
    stale = await Thread.open(KEY, team, store, agents)
    await stale.handle(msg("book"))
    current = await Thread.open(KEY, team, store, agents)
    await current.handle(msg("current wins"))
    with pytest.raises(ThreadFenced):
        await stale.handle(msg("stale write"))
    with pytest.raises(ThreadFenced):
        await stale.handle(msg("/supervisor"))  # no longer serving anything
    assert [t.message_id for t in await store.turns(KEY)] == ["id-book", "id-current wins"]
    saved = await store.load(KEY)
    assert saved is not None and saved.version == 2 and saved.turn == 2
