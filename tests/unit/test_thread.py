"""Turn logic of a thread with an in-memory store and in-process agents (no Ray)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from actors.checkpoint import InMemoryCheckpointStore
from actors.key import ThreadKey
from actors.thread import Thread
from stickyray.config import TeamConfig, load_config
from stickyray.errors import StoreUnavailable
from stickyray.turns import AgentRequest, AgentResult, InboundMessage, Usage

Behaviour = Callable[[AgentRequest], AgentResult]


class Agents:
    """Agents as plain functions; records every call."""

    def __init__(self, behaviours: dict[str, Behaviour]) -> None:
        self.behaviours = behaviours
        self.calls: list[tuple[str, int]] = []

    async def __call__(self, agent: str, request: AgentRequest) -> AgentResult:
        self.calls.append((agent, request.turn))
        await asyncio.sleep(0)  # let other turns try to interleave
        return self.behaviours[agent](request)


def reply(agent: str) -> Behaviour:
    return lambda req: AgentResult(
        agent=agent,
        reply=f"{agent}: {req.text}",
        usage=Usage(input_tokens=3, output_tokens=2),
        llm_calls=1,
    )


def hand(agent: str, to: str) -> Behaviour:
    return lambda req: AgentResult(
        agent=agent, handoff_to=to, handoff_reason=f"{agent}->{to}", llm_calls=1
    )


@pytest.fixture
def team() -> TeamConfig:
    return load_config(None)


def msg(text: str, n: int = 0) -> InboundMessage:
    return InboundMessage(text=text, message_id=f"m{n}-{text[:10]}")


async def test_first_turn_routes_then_sticks(team: TeamConfig) -> None:
    agents = Agents({"triage": hand("triage", "bookings"), "bookings": reply("bookings")})
    store = InMemoryCheckpointStore()
    thread = Thread(ThreadKey.of("t"), team, store, agents)
    first = await thread.handle(msg("book a table"))
    assert (first.turn, first.agent) == (1, "bookings")
    assert first.usage == Usage(input_tokens=3, output_tokens=2)
    second = await thread.handle(msg("for two", 2))
    assert (second.turn, second.agent, second.handoffs) == (2, "bookings", [])
    assert agents.calls == [("triage", 1), ("bookings", 1), ("bookings", 2)]
    saved = await store.load(ThreadKey.of("t"))
    assert saved is not None and saved.active_agent == "bookings" and saved.version == 2
    assert [e.text for e in saved.buffer] == [
        "book a table",
        "bookings: book a table",
        "for two",
        "bookings: for two",
    ]


async def test_restore_continues_with_the_specialist(team: TeamConfig) -> None:
    agents = Agents({"triage": hand("triage", "bookings"), "bookings": reply("bookings")})
    store = InMemoryCheckpointStore()
    await Thread(ThreadKey.of("t"), team, store, agents).handle(msg("book"))
    again = await Thread.restore(ThreadKey.of("t"), team, store, agents)
    assert again.active_agent == "bookings"
    result = await again.handle(msg("more", 2))
    assert (result.turn, result.agent) == (2, "bookings")
    assert agents.calls[-1] == ("bookings", 2)


async def test_return_to_supervisor_reroutes_in_the_same_turn(team: TeamConfig) -> None:
    agents = Agents(
        {
            "triage": lambda r: hand("triage", "invoices" if "invoice" in r.text else "bookings")(
                r
            ),
            "bookings": lambda r: (
                hand("bookings", "triage")(r) if "invoice" in r.text else reply("bookings")(r)
            ),
            "invoices": reply("invoices"),
        }
    )
    thread = Thread(ThreadKey.of("t"), team, InMemoryCheckpointStore(), agents)
    await thread.handle(msg("book"))
    result = await thread.handle(msg("an invoice", 2))
    assert result.agent == "invoices"
    assert [(h.from_agent, h.to) for h in result.handoffs] == [
        ("bookings", "triage"),
        ("triage", "invoices"),
    ]
    assert thread.active_agent == "invoices"


async def test_handoff_limit_ends_the_turn_with_an_error(team: TeamConfig) -> None:
    agents = Agents(
        {
            "triage": hand("triage", "invoices"),
            "invoices": hand("invoices", "support"),
            "support": hand("support", "invoices"),
        }
    )
    thread = Thread(ThreadKey.of("t"), team, InMemoryCheckpointStore(), agents)
    result = await thread.handle(msg("loop"))
    assert result.error == "handoff_limit" and len(result.handoffs) == 3
    assert len(agents.calls) == 4
    assert thread.active_agent is None
    assert thread.snapshot().turns == 1


async def test_concurrent_messages_never_interleave(team: TeamConfig) -> None:
    agents = Agents({"triage": reply("triage")})
    thread = Thread(ThreadKey.of("t"), team, InMemoryCheckpointStore(), agents)
    results = await asyncio.gather(*(thread.handle(msg(f"n{i}", i)) for i in range(20)))
    assert [r.turn for r in results] == list(range(1, 21))  # asyncio.Lock is FIFO
    assert [turn for _, turn in agents.calls] == list(range(1, 21))


async def test_commands_change_state_without_agents(team: TeamConfig) -> None:
    agents = Agents({"triage": hand("triage", "bookings"), "bookings": reply("bookings")})
    store = InMemoryCheckpointStore()
    thread = Thread(ThreadKey.of("t"), team, store, agents)
    await thread.handle(msg("book"))
    calls = len(agents.calls)
    status = await thread.handle(msg("/status", 2))
    assert status.command == "status" and status.turn == 1 and "bookings" in status.reply
    await thread.handle(msg("/supervisor", 3))
    assert thread.active_agent is None
    await thread.handle(msg("/reset", 4))
    assert thread.snapshot().buffer == [] and thread.snapshot().turns == 1
    assert len(agents.calls) == calls
    saved = await store.load(ThreadKey.of("t"))
    assert saved is not None and saved.buffer == [] and saved.active_agent is None


async def test_failed_checkpoint_leaves_the_thread_unchanged(team: TeamConfig) -> None:
    class Broken(InMemoryCheckpointStore):
        async def save(self, key, checkpoint):  # type: ignore[override]
            raise StoreUnavailable("redis", "down")

    agents = Agents({"triage": hand("triage", "bookings"), "bookings": reply("bookings")})
    thread = Thread(ThreadKey.of("t"), team, Broken(), agents)
    with pytest.raises(StoreUnavailable):
        await thread.handle(msg("book"))
    snap = thread.snapshot()
    assert (snap.turns, snap.active_agent, snap.buffer, snap.version) == (0, None, [], 0)


async def test_buffer_keeps_the_last_n_messages(team: TeamConfig) -> None:
    small = team.model_copy(update={"threads": team.threads.model_copy(update={"buffer_size": 4})})
    thread = Thread(
        ThreadKey.of("t"), small, InMemoryCheckpointStore(), Agents({"triage": reply("triage")})
    )
    for i in range(5):
        await thread.handle(msg(f"n{i}", i))
    assert [e.text for e in thread.snapshot().buffer] == ["n3", "triage: n3", "n4", "triage: n4"]
