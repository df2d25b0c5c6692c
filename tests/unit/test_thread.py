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
    StoreUnavailable,
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
