"""A thread's idle time, which passivates its actor: it counts from the reply."""

from __future__ import annotations

from actors.store import InMemoryThreadStore
from actors.thread import Thread
from stickyray.config import load_config
from stickyray.turns import AgentRequest, AgentResult
from tests.unit.test_thread import KEY, Agents, msg


async def test_a_turn_longer_than_the_idle_timeout_is_not_idle_time() -> None:
    """Counted from when the turn started, a 400 s turn made its actor idle the moment it
    replied: the user's next message paid for a cold start."""
    team = load_config(None)
    now = [1000.0]

    def slow(request: AgentRequest) -> AgentResult:
        now[0] += team.threads.idle_timeout_s + 100
        return AgentResult(agent="triage", reply="done")

    thread = await Thread.open(
        KEY, team, InMemoryThreadStore(), Agents({"triage": slow}), clock=lambda: now[0]
    )
    await thread.handle(msg("a long job"))
    assert thread.last_active == now[0]
