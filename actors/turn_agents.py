"""The agents' side of a turn: who answers, following handoffs, and what it cost.

``run_agents`` asks the thread's active agent (the supervisor when there is none) and
follows its handoffs, up to ``threads.max_handoffs_per_turn``; ``actors.thread.Thread``
records what it returns. Agents are reached through an ``AgentCaller``: Serve handles in
production (``actors.agent_client``), plain objects in unit tests.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from actors.key import ThreadKey
from memory.buffer import BufferEntry
from stickyray.config import TeamConfig
from stickyray.turns import (
    AgentRequest,
    AgentResult,
    CompressRequest,
    CompressResult,
    Handoff,
    InboundMessage,
    TurnResult,
    Usage,
    done,
    sorry,
)

__all__ = ["AgentCaller", "run_agents"]

log = logging.getLogger(__name__)


class AgentCaller(Protocol):
    """Runs an agent by name: Serve handles in production, plain objects in unit tests."""

    async def __call__(self, agent: str, request: AgentRequest) -> AgentResult:
        """The agent's result for ``request``."""
        ...

    async def compress(self, agent: str, request: CompressRequest) -> CompressResult:
        """Have ``agent`` keep messages leaving the buffer as a memory; its id and cost."""
        ...


async def run_agents(
    key: ThreadKey,
    team: TeamConfig,
    agents: AgentCaller,
    message: InboundMessage,
    turn: int,
    *,
    active: str | None,
    buffer: list[BufferEntry],
    clock: Callable[[], float],
) -> tuple[TurnResult, str | None]:
    """Call agents for turn ``turn`` of thread ``key``, following handoffs; the turn's
    result and the thread's active agent after it (None: the supervisor). A failed turn
    leaves the active agent as it was."""
    supervisor = team.supervisor.name
    agent = active or supervisor
    limit = team.threads.max_handoffs_per_turn
    handoffs: list[Handoff] = []
    usage: dict[str, Usage] = {}
    actions: list[str] = []  # the tool calls run so far, by any agent of the turn
    reason: str | None = None

    def outcome(agent: str, reply: str, error: str | None, failed: bool) -> TurnResult:
        return TurnResult(
            thread_id=key.thread_id,
            message_id=message.message_id,
            turn=turn,
            agent=agent,
            reply=reply,
            status="failed" if failed else "completed",
            handoffs=handoffs,
            usage=sum(usage.values(), Usage()),
            usage_by_agent=usage,
            error=error,
            completed_at=clock(),
            actions=actions,
        )

    while True:
        request = AgentRequest(
            thread=str(key),
            turn=turn,
            text=message.text,
            tenant=key.tenant,
            user_id=message.user_id,
            buffer=list(buffer),
            handoff_reason=reason,
            earlier=list(actions),
            stream_to=(
                key.deltas_key(message.message_id, message.fingerprint) if message.stream else None
            ),
        )
        try:
            result = await agents(agent, request)
        except Exception as exc:  # a replica or store failure: failed, with what came before
            log.warning("thread %s turn %d: agent %s: %s", key, turn, agent, exc)
            error = f"{type(exc).__name__}: {exc}"
            return outcome(agent, sorry(actions), error, failed=True), active
        usage[agent] = usage.get(agent, Usage()) + result.usage
        actions += result.actions
        if result.failed:
            # Recorded like any failed turn, with what the calls so far cost and did.
            return outcome(agent, sorry(actions), result.error, failed=True), active
        if result.handoff_to is None:
            break
        if len(handoffs) >= limit:
            log.warning("thread %s turn %d exceeded %d handoffs", key, turn, limit)
            reply = (
                f"Sorry, this request was passed between agents more than {limit} times "
                "without an answer, so I stopped. Please rephrase it, or type /supervisor "
                "to start over."
            )
            if actions:  # the tools named, as for any turn that failed after they ran
                reply += f" {done(actions)}"
            return outcome(agent, reply, "handoff_limit", failed=True), active
        handoffs.append(
            Handoff(from_agent=agent, to=result.handoff_to, reason=result.handoff_reason)
        )
        agent, reason = result.handoff_to, result.handoff_reason
    now_active = None if agent == supervisor else agent
    return outcome(agent, result.reply or "", result.error, failed=False), now_active
