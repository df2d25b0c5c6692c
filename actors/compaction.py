"""Compaction: what leaves a thread's buffer, and whose memory keeps it.

The thread keeps its active agent's window of messages; older ones leave only once a memory
covers them (a summary the agent's memory stores), so nothing the user said is lost when the
buffer is trimmed.
"""

from __future__ import annotations

import logging
from typing import Protocol

from actors.key import ThreadKey
from memory.buffer import BufferEntry
from stickyray.config import TeamConfig
from stickyray.errors import CompressionNotStored
from stickyray.turns import CompressRequest, CompressResult, Usage, anonymous_owner

__all__ = ["Compressor", "compact", "keeper"]

log = logging.getLogger(__name__)


class Compressor(Protocol):
    """What summarises leaving messages into an agent's memory (the agents of a thread)."""

    async def compress(self, agent: str, request: CompressRequest) -> CompressResult: ...


async def compact(
    key: ThreadKey,
    team: TeamConfig,
    agents: Compressor,
    buffer: list[BufferEntry],
    active: str | None,
) -> tuple[list[BufferEntry], dict[str, Usage]]:
    """Trim the buffer to the active agent's window, keeping what leaves as memories.

    A turn's messages become a memory of the agent that answered it, if that agent
    compresses, else of the active agent, if it does (a failed turn has no answer);
    otherwise they leave unkept. So a specialist's conversation is kept by its memory
    also when it leaves the buffer after a handback, while the supervisor answers.
    Each user's messages become a memory of that user (a thread can be shared, or learn
    its user partway). Messages leave only once the agent has stored them; those whose
    memory failed stay, and the next turn tries again. Returns the buffer and what
    summarising cost, per agent.
    """
    limit = team.buffer_limit(active)
    if len(buffer) <= limit:
        return buffer, {}
    leaving, kept = buffer[:-limit], buffer[-limit:]
    answered_by = {e.turn: e.agent for e in buffer if e.role == "assistant" and e.agent}
    keepers = [(keeper(team, answered_by.get(e.turn), active), e.user_id) for e in leaving]
    groups: dict[tuple[str, str | None], list[BufferEntry]] = {}
    for (agent, user_id), entry in zip(keepers, leaving, strict=True):
        if agent is not None:
            groups.setdefault((agent, user_id), []).append(entry)
    unsaved: set[tuple[str | None, str | None]] = set()
    spent: dict[str, Usage] = {}
    for (agent, user_id), messages in groups.items():
        request = CompressRequest(
            thread=str(key),
            tenant=key.tenant,
            user_id=user_id or anonymous_owner(str(key)),
            messages=messages,
        )
        cost = Usage()
        try:
            cost = (await agents.compress(agent, request)).usage
        except Exception as exc:  # keep the messages; nothing leaves without its memory
            if isinstance(exc, CompressionNotStored):  # the summary was paid for
                cost = Usage.model_validate(exc.usage)
            log.warning(
                "thread %s: compression failed (%s: %s); keeping %d messages",
                key,
                type(exc).__name__,
                exc,
                len(messages),
            )
            unsaved.add((agent, user_id))
        if cost != Usage():
            spent[agent] = spent.get(agent, Usage()) + cost
    stay = [e for owner, e in zip(keepers, leaving, strict=True) if owner in unsaved]
    return stay + kept, spent


def keeper(team: TeamConfig, answered: str | None, active: str | None) -> str | None:
    """The agent whose memory keeps a leaving turn that ``answered`` answered: that agent
    if it compresses, else the active one if it does; None: the turn leaves unkept."""
    for name in (answered, active or team.supervisor.name):
        if name is None:
            continue
        try:
            agent = team.agent(name)
        except KeyError:  # an agent a deploy removed
            continue
        if agent.memory is not None and agent.memory.compression:
            return agent.name
    return None
