"""Turn logic of a thread with the in-memory store and in-process agents (no Ray)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from actors.key import ThreadKey
from actors.store import InMemoryThreadStore
from actors.thread import MAX_TURN_ATTEMPTS, Thread
from stickyray.config import TeamConfig, load_config
from stickyray.errors import (
    CompressionNotStored,
    MessageIdReused,
    ProviderError,
    StoreUnavailable,
    ThreadFenced,
    ThreadPassivated,
)
from stickyray.turns import (
    AgentRequest,
    AgentResult,
    CompressRequest,
    CompressResult,
    InboundMessage,
    TurnResult,
    Usage,
)

Behaviour = Callable[[AgentRequest], AgentResult]
KEY = ThreadKey.of("t")


class Agents:
    """Agents as plain functions; records every call."""

    def __init__(self, behaviours: dict[str, Behaviour]) -> None:
        self.behaviours = behaviours
        self.calls: list[tuple[str, int]] = []
        self.compressed: list[tuple[str, list[str]]] = []
        self.compressed_for: list[str] = []
        self.compress_fails = False
        self.summary_not_stored = False

    async def __call__(self, agent: str, request: AgentRequest) -> AgentResult:
        self.calls.append((agent, request.turn))
        await asyncio.sleep(0)  # let other turns try to interleave
        return self.behaviours[agent](request)

    async def compress(self, agent: str, request: CompressRequest) -> CompressResult:
        self.compressed.append((agent, [e.text for e in request.messages]))
        self.compressed_for.append(request.user_id)
        if self.compress_fails:
            raise RuntimeError("memory store down")
        summary = Usage(input_tokens=100, output_tokens=10)  # a model wrote the summary
        if self.summary_not_stored:
            raise CompressionNotStored("StoreUnavailable: postgres is down", summary.model_dump())
        return CompressResult(memory_id=f"memory-{len(self.compressed)}", usage=summary)


def reply(agent: str) -> Behaviour:
    return lambda req: AgentResult(
        agent=agent, reply=f"{agent}: {req.text}", usage=Usage(input_tokens=3, output_tokens=2)
    )


def hand(agent: str, to: str) -> Behaviour:
    return lambda req: AgentResult(
        agent=agent,
        handoff_to=to,
        handoff_reason=f"{agent}->{to}",
        usage=Usage(input_tokens=5, output_tokens=1),
    )


def booking_agents() -> Agents:
    return Agents({"triage": hand("triage", "bookings"), "bookings": reply("bookings")})


@pytest.fixture
def team() -> TeamConfig:
    return load_config(None)


def msg(text: str, mid: str | None = None) -> InboundMessage:
    return InboundMessage(text=text, message_id=mid or f"id-{text}")


async def test_first_turn_routes_then_sticks(team: TeamConfig) -> None:
    agents, store = booking_agents(), InMemoryThreadStore()
    thread = await Thread.open(KEY, team, store, agents)
    first = await thread.handle(msg("book a table"))
    assert (first.turn, first.agent, first.status) == (1, "bookings", "completed")
    assert first.usage == Usage(input_tokens=8, output_tokens=3)
    assert first.usage_by_agent == {
        "triage": Usage(input_tokens=5, output_tokens=1),
        "bookings": Usage(input_tokens=3, output_tokens=2),
    }
    second = await thread.handle(msg("for two"))
    assert (second.turn, second.agent, second.handoffs) == (2, "bookings", [])
    assert agents.calls == [("triage", 1), ("bookings", 1), ("bookings", 2)]
    saved = await store.load(KEY)
    assert saved is not None and saved.active_agent == "bookings" and saved.version == 2
    assert [e.text for e in saved.buffer] == [
        "book a table",
        "bookings: book a table",
        "for two",
        "bookings: for two",
    ]
    history = await store.turns(KEY)
    assert [(t.turn, t.message_id, t.agent) for t in history] == [
        (1, "id-book a table", "bookings"),
        (2, "id-for two", "bookings"),
    ]


@pytest.mark.parametrize("error", ["refusal", "empty reply (content_filter)"])
async def test_a_refused_exchange_is_no_context_for_the_next_turns(
    team: TeamConfig, error: str
) -> None:
    """Claude asks for the context to be reset after a refusal: sent again with every later
    turn, the refused message could have them refused too."""
    agents = booking_agents()
    thread = await Thread.open(KEY, team, InMemoryThreadStore(), agents)
    await thread.handle(msg("book a table"))
    agents.behaviours["bookings"] = lambda req: AgentResult(
        agent="bookings", reply="I can't help with that.", error=error
    )
    refused = await thread.handle(msg("something it refuses"))
    assert (refused.turn, refused.status, refused.error) == (2, "completed", error)
    agents.behaviours["bookings"] = reply("bookings")
    later = await thread.handle(msg("for two"))
    assert later.turn == 3
    texts = [e.text for e in thread.snapshot().buffer]
    assert "something it refuses" not in texts and "I can't help with that." not in texts
    assert texts[-2:] == ["for two", "bookings: for two"]


async def test_new_incarnation_continues_with_the_specialist(team: TeamConfig) -> None:
    agents, store = booking_agents(), InMemoryThreadStore()
    await (await Thread.open(KEY, team, store, agents)).handle(msg("book"))
    again = await Thread.open(KEY, team, store, agents)
    assert again.active_agent == "bookings" and again.epoch == 2
    result = await again.handle(msg("more"))
    assert (result.turn, result.agent) == (2, "bookings")
    assert agents.calls[-1] == ("bookings", 2)


async def test_return_to_supervisor_reroutes_in_the_same_turn(team: TeamConfig) -> None:
    agents = Agents(
        {
            "triage": lambda r: hand("triage", "invoices" if "invoice" in r.text else "bookings")(
                r
            ),
            "bookings": lambda r: (
                hand("bookings", "triage") if "invoice" in r.text else reply("bookings")
            )(r),
            "invoices": reply("invoices"),
        }
    )
    thread = await Thread.open(KEY, team, InMemoryThreadStore(), agents)
    await thread.handle(msg("book"))
    result = await thread.handle(msg("an invoice"))
    assert result.agent == "invoices"
    assert [(h.from_agent, h.to) for h in result.handoffs] == [
        ("bookings", "triage"),
        ("triage", "invoices"),
    ]
    assert thread.active_agent == "invoices"


async def test_handoff_limit_fails_the_turn_with_a_reply(team: TeamConfig) -> None:
    agents = Agents(
        {
            "triage": hand("triage", "invoices"),
            "invoices": hand("invoices", "support"),
            "support": hand("support", "invoices"),
        }
    )
    store = InMemoryThreadStore()
    thread = await Thread.open(KEY, team, store, agents)
    result = await thread.handle(msg("loop"))
    assert (result.status, result.error, len(result.handoffs)) == ("failed", "handoff_limit", 3)
    assert len(agents.calls) == 4
    assert thread.active_agent is None and thread.snapshot().turns == 1
    assert (await store.turns(KEY))[0].status == "failed"


async def test_concurrent_messages_never_interleave(team: TeamConfig) -> None:
    agents = Agents({"triage": reply("triage")})
    thread = await Thread.open(KEY, team, InMemoryThreadStore(), agents)
    results = await asyncio.gather(*(thread.handle(msg(f"n{i}")) for i in range(20)))
    assert [r.turn for r in results] == list(range(1, 21))  # asyncio.Lock is FIFO
    assert [turn for _, turn in agents.calls] == list(range(1, 21))


async def test_same_message_id_is_one_turn(team: TeamConfig) -> None:
    agents, store = booking_agents(), InMemoryThreadStore()
    thread = await Thread.open(KEY, team, store, agents)
    sequential = [await thread.handle(msg("book", mid="m1")) for _ in range(5)]
    concurrent = await asyncio.gather(*(thread.handle(msg("book", mid="m2")) for _ in range(5)))
    assert len({r.model_dump_json() for r in sequential}) == 1
    assert len({r.model_dump_json() for r in concurrent}) == 1
    assert [r.turn for r in (sequential[0], concurrent[0])] == [1, 2]
    assert agents.calls == [("triage", 1), ("bookings", 1), ("bookings", 2)]
    assert len(await store.turns(KEY)) == 2


async def test_a_message_id_reused_for_another_message_is_refused(team: TeamConfig) -> None:
    """Refused whether it named a turn or a command; the thread serves on as it was."""
    agents, store = booking_agents(), InMemoryThreadStore()
    thread = await Thread.open(KEY, team, store, agents)
    await thread.handle(msg("book", mid="m1"))
    left = await thread.handle(msg("/supervisor", mid="c1"))
    epoch = thread._epoch
    for reused in (msg("book two", mid="m1"), msg("/reset", mid="m1"), msg("hi", mid="c1")):
        with pytest.raises(MessageIdReused):
            await thread.handle(reused)
    assert thread._epoch == epoch  # refused before any write: the thread was not reopened
    assert await thread.handle(msg("/supervisor", mid="c1")) == left
    # A command is the same command however it is written, and whoever sends it.
    again = InboundMessage(text=" /SUPERVISOR! ", message_id="c1", user_id="u2")
    assert await thread.handle(again) == left
    assert (await thread.handle(msg("book two", mid="m2"))).turn == 2
    assert [t.message_id for t in await store.turns(KEY)] == ["m1", "m2"]
    assert agents.calls == [("triage", 1), ("bookings", 1), ("triage", 2), ("bookings", 2)]


async def test_commands_change_state_without_agents(team: TeamConfig) -> None:
    agents, store = booking_agents(), InMemoryThreadStore()
    thread = await Thread.open(KEY, team, store, agents)
    await thread.handle(msg("book"))
    calls = len(agents.calls)
    status = await thread.handle(msg("/status"))
    assert status.command == "status" and status.turn == 1 and "bookings" in status.reply
    await thread.handle(msg("/supervisor"))
    assert thread.active_agent is None
    await thread.handle(msg("/reset"))
    assert thread.snapshot().buffer == [] and thread.snapshot().turns == 0
    assert len(agents.calls) == calls
    assert await store.turns(KEY) == []
    saved = await store.load(KEY)
    assert saved is not None and saved.buffer == [] and saved.active_agent is None
    assert (await thread.handle(msg("book again"))).turn == 1


async def test_a_retried_command_answers_again_without_running_again(team: TeamConfig) -> None:
    agents, store = booking_agents(), InMemoryThreadStore()
    thread = await Thread.open(KEY, team, store, agents)
    await thread.handle(msg("book", mid="m1"))
    left = await thread.handle(msg("/supervisor", mid="c1"))
    await thread.handle(msg("book", mid="m2"))  # routed to bookings again
    assert thread.active_agent == "bookings"
    # The client did not get the first answer and sends /supervisor again, late.
    assert await thread.handle(msg("/supervisor", mid="c1")) == left
    assert thread.active_agent == "bookings"
    reset = await thread.handle(msg("/reset", mid="r1"))
    await thread.handle(msg("book", mid="m3"))
    assert await thread.handle(msg("/reset", mid="r1")) == reset
    assert thread.snapshot().turns == 1
    assert [t.message_id for t in await store.turns(KEY)] == ["m3"]
    # A new incarnation remembers too: the ids are in the store, not the actor.
    heir = await Thread.open(KEY, team, store, agents)
    assert await heir.handle(msg("/reset", mid="r1")) == reset
    assert heir.snapshot().turns == 1


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


async def test_closed_thread_refuses_messages(team: TeamConfig) -> None:
    thread = await Thread.open(KEY, team, InMemoryThreadStore(), booking_agents())
    await thread.close()
    with pytest.raises(ThreadPassivated):
        await thread.handle(msg("hello"))


async def test_buffer_keeps_the_last_n_messages(team: TeamConfig) -> None:
    small = team.model_copy(update={"threads": team.threads.model_copy(update={"buffer_size": 4})})
    agents = Agents({"triage": reply("triage")})
    thread = await Thread.open(KEY, small, InMemoryThreadStore(), agents)
    for i in range(5):
        await thread.handle(msg(f"n{i}"))
    assert [e.text for e in thread.snapshot().buffer] == ["n3", "triage: n3", "n4", "triage: n4"]


async def test_observe_sees_each_turn_run_once(team: TeamConfig) -> None:
    seen: list[tuple[int, str | None, float]] = []
    thread = await Thread.open(
        KEY,
        team,
        InMemoryThreadStore(),
        booking_agents(),
        observe=lambda result, seconds: seen.append((result.turn, result.agent, seconds)),
    )
    await thread.handle(msg("book a table"))
    await thread.handle(msg("book a table"))  # a retry: the stored result, no turn run
    await thread.handle(msg("/status"))  # a command is not a turn
    await thread.handle(msg("for two"))
    assert [(turn, agent) for turn, agent, _ in seen] == [(1, "bookings"), (2, "bookings")]
    assert all(seconds >= 0 for *_, seconds in seen)


async def test_observe_sees_turns_completed_or_abandoned_after_a_crash(team: TeamConfig) -> None:
    seen: list[tuple[int, str | None, str]] = []

    def observe(result: TurnResult, seconds: float) -> None:
        seen.append((result.turn, result.agent, result.status))

    # An actor died mid-turn: its heir completes the turn, which counts once.
    agents, store = booking_agents(), InMemoryThreadStore()
    dead = await Thread.open(KEY, team, store, agents)
    await store.accept(KEY, dead.epoch, msg("book", mid="m1"))
    heir = await Thread.open(KEY, team, store, agents, observe=observe)
    await heir.handle(msg("book", mid="m1"))
    assert seen == [(1, "bookings", "completed")]
    # A turn interrupted too often is abandoned: a failed turn.
    seen.clear()
    store = InMemoryThreadStore()
    first = await Thread.open(KEY, team, store, agents)
    await store.accept(KEY, first.epoch, msg("poison", mid="m1"))
    for _ in range(MAX_TURN_ATTEMPTS - 1):
        await store.open(KEY)
    await Thread.open(KEY, team, store, agents, observe=observe)
    assert seen == [(1, None, "failed")]


async def test_observe_counts_a_turn_whose_commit_failed_once_when_it_is_stored(
    team: TeamConfig,
) -> None:
    class Flaky(InMemoryThreadStore):
        down = False

        async def commit(self, *args: Any, **kwargs: Any) -> Any:
            if self.down:
                raise StoreUnavailable("redis", "down")
            return await super().commit(*args, **kwargs)

    seen: list[int] = []
    store = Flaky()
    thread = await Thread.open(
        KEY, team, store, booking_agents(), observe=lambda result, _: seen.append(result.turn)
    )
    store.down = True
    with pytest.raises(StoreUnavailable):
        await thread.handle(msg("book", mid="m1"))
    assert seen == []  # run, but not stored
    store.down = False
    await thread.handle(msg("book", mid="m1"))
    assert seen == [1]


async def test_a_streamed_message_asks_every_agent_of_its_turn_to_stream(team: TeamConfig) -> None:
    """Each agent called in the turn writes to the message's stream; other turns to none."""
    seen: list[tuple[str, str | None]] = []

    def noting(agent: str, behaviour: Behaviour) -> Behaviour:
        def call(request: AgentRequest) -> AgentResult:
            seen.append((agent, request.stream_to))
            return behaviour(request)

        return call

    agents = Agents(
        {
            "triage": noting("triage", hand("triage", "bookings")),
            "bookings": noting("bookings", reply("bookings")),
        }
    )
    store = InMemoryThreadStore()
    thread = await Thread.open(KEY, team, store, agents)
    streamed = msg("book a table", "m1").model_copy(update={"stream": True})
    await thread.handle(streamed)
    await thread.handle(msg("for two", "m2"))
    key = KEY.deltas_key("m1", streamed.fingerprint)
    assert seen == [("triage", key), ("bookings", key), ("bookings", None)]
    assert key == f"stickyray:{{default/t}}:deltas:m1:{streamed.fingerprint}"
