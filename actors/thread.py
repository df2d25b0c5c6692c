"""The conversation thread: one turn at a time, sticky active agent, checkpoint after each turn.

``Thread`` is a plain class (unit-tested with an in-memory store and in-process agents);
``ThreadActor`` is what Ray runs, one named actor per thread (see ``actors.directory``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from actors.checkpoint import Checkpoint, CheckpointStore
from actors.commands import parse_command, run_command
from actors.key import ThreadKey
from memory.buffer import BufferEntry, ShortTermBuffer
from stickyray.config import TeamConfig
from stickyray.turns import (
    AgentRequest,
    AgentResult,
    Handoff,
    InboundMessage,
    ThreadSnapshot,
    TurnResult,
    Usage,
)

__all__ = ["AgentCaller", "Thread"]

log = logging.getLogger(__name__)


class AgentCaller(Protocol):
    """Runs an agent by name: Serve handles in production, plain objects in unit tests."""

    async def __call__(self, agent: str, request: AgentRequest) -> AgentResult:
        """The agent's result for ``request``."""
        ...


class Thread:
    """State and turn logic of one conversation thread."""

    def __init__(
        self,
        key: ThreadKey,
        team: TeamConfig,
        store: CheckpointStore,
        agents: AgentCaller,
        checkpoint: Checkpoint | None = None,
    ) -> None:
        self.key = key
        self._team = team
        self._store = store
        self._agents = agents
        self._lock = asyncio.Lock()
        ckpt = checkpoint or Checkpoint()
        # An agent removed from the config since the checkpoint falls back to the supervisor.
        known = {a.name for a in team.specialists}
        self._active = ckpt.active_agent if ckpt.active_agent in known else None
        self._buffer = ShortTermBuffer(team.threads.buffer_size, ckpt.buffer)
        self._turns = ckpt.turn
        self._version = ckpt.version

    @classmethod
    async def restore(
        cls, key: ThreadKey, team: TeamConfig, store: CheckpointStore, agents: AgentCaller
    ) -> Thread:
        """A thread resumed from its latest checkpoint (or new if it has none)."""
        return cls(key, team, store, agents, await store.load(key))

    @property
    def active_agent(self) -> str | None:
        """The specialist that answers follow-ups; None means the supervisor."""
        return self._active

    def snapshot(self) -> ThreadSnapshot:
        """The thread's visible state."""
        return ThreadSnapshot(
            thread_id=self.key.thread_id,
            active_agent=self._active,
            turns=self._turns,
            buffer=self._buffer.entries(),
            version=self._version,
        )

    async def handle(self, message: InboundMessage) -> TurnResult:
        """Run one message. Messages queue on the lock, so turns never interleave."""
        async with self._lock:
            command = parse_command(message.text)
            if command is not None:
                return await self._command(command, message)
            return await self._turn(message)

    async def _command(self, name: str, message: InboundMessage) -> TurnResult:
        outcome = run_command(name, active_agent=self._active, turns=self._turns, team=self._team)
        if outcome.changes_state:
            buffer = [] if outcome.clear_buffer else self._buffer.entries()
            await self._commit(
                None if outcome.back_to_supervisor else self._active, buffer, self._turns
            )
        return TurnResult(
            thread_id=self.key.thread_id,
            message_id=message.message_id,
            turn=self._turns,
            agent=None,
            reply=outcome.reply,
            command=name,
        )

    async def _turn(self, message: InboundMessage) -> TurnResult:
        turn = self._turns + 1
        supervisor = self._team.supervisor.name
        agent = self._active or supervisor
        limit = self._team.threads.max_handoffs_per_turn
        handoffs: list[Handoff] = []
        usage = Usage()
        reason: str | None = None
        error: str | None = None
        while True:
            request = AgentRequest(
                thread=str(self.key),
                turn=turn,
                text=message.text,
                user_id=message.user_id,
                buffer=self._buffer.entries(),
                handoff_reason=reason,
            )
            result = await self._agents(agent, request)
            usage = usage + result.usage
            if result.handoff_to is None:
                reply = result.reply or ""
                error = result.error
                break
            if len(handoffs) >= limit:
                log.warning("thread %s turn %d exceeded %d handoffs", self.key, turn, limit)
                reply = (
                    f"Sorry, this request was passed between agents more than {limit} times "
                    "without an answer, so I stopped. Please rephrase it, or type /supervisor "
                    "to start over."
                )
                error = "handoff_limit"
                agent = self._active or supervisor
                break
            handoffs.append(
                Handoff(from_agent=agent, to=result.handoff_to, reason=result.handoff_reason)
            )
            agent, reason = result.handoff_to, result.handoff_reason
        buffer = self._buffer.entries()
        buffer.append(BufferEntry(role="user", text=message.text, turn=turn))
        buffer.append(BufferEntry(role="assistant", text=reply, turn=turn, agent=agent))
        active = None if agent == supervisor else agent
        if error == "handoff_limit":
            active = self._active
        await self._commit(active, buffer, turn)
        return TurnResult(
            thread_id=self.key.thread_id,
            message_id=message.message_id,
            turn=turn,
            agent=agent,
            reply=reply,
            handoffs=handoffs,
            usage=usage,
            error=error,
        )

    async def _commit(self, active: str | None, buffer: list[BufferEntry], turn: int) -> None:
        """Checkpoint first, then adopt the state: a failed write leaves the thread unchanged."""
        window = buffer[-self._buffer.max_messages :]
        checkpoint = Checkpoint(
            active_agent=active, buffer=window, turn=turn, version=self._version + 1
        )
        await self._store.save(self.key, checkpoint)
        self._active = active
        self._buffer = ShortTermBuffer(self._buffer.max_messages, window)
        self._turns = turn
        self._version = checkpoint.version
