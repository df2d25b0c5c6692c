"""The conversation thread: one turn at a time, sticky active agent, nothing lost.

A message is accepted (recorded in the store with the next turn number) before its turn runs;
the turn's outcome, the new checkpoint and the message's stored reply are then written in one
atomic, fenced commit. A new incarnation resolves a turn its predecessor left pending: it
runs it again once, and records it as failed if that incarnation died too.

``Thread`` is a plain class (unit-tested with the in-memory store and in-process agents);
``actors.thread_actor.ThreadActor`` is what Ray runs.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

from actors.commands import CHANGING, Command, parse_command, run_command
from actors.compaction import compact
from actors.key import ThreadKey
from actors.store import Checkpoint, Incarnation, PendingTurn, ThreadStore
from actors.turn_agents import AgentCaller, run_agents
from memory.buffer import BufferEntry, ShortTermBuffer
from stickyray.config import TeamConfig
from stickyray.errors import (
    CheckpointConflict,
    MessageIdReused,
    StoreUnavailable,
    ThreadFenced,
    ThreadPassivated,
    TurnPending,
)
from stickyray.turns import (
    REFUSED_ERRORS,
    SORRY_REPLY,
    InboundMessage,
    ThreadSnapshot,
    TurnResult,
    Usage,
    fingerprint,
)

__all__ = ["MAX_TURN_ATTEMPTS", "Thread"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# A turn interrupted this many times (its actor died, its request was cancelled) is recorded
# as failed instead of run again, so a message that kills its actor cannot take the thread
# down forever. A store outage is no interruption: the turn runs again once the store is back.
MAX_TURN_ATTEMPTS = 2

_SORRY = SORRY_REPLY

# Trimming is ``compact``'s job; this cap only bounds memory if compression keeps failing.
_BUFFER_CAP = 4
# What the commands that change the thread are fingerprinted as: a reset keeps their answers.
_COMMANDS_SAID = frozenset(fingerprint(f"/{name}") for name in CHANGING)


def _with_usage(result: TurnResult, extra: dict[str, Usage]) -> TurnResult:
    """``result`` with ``extra`` usage added, per agent and in total."""
    by_agent = dict(result.usage_by_agent)
    for agent, usage in extra.items():
        by_agent[agent] = by_agent.get(agent, Usage()) + usage
    return result.model_copy(
        update={"usage_by_agent": by_agent, "usage": sum(by_agent.values(), Usage())}
    )


class Thread:
    """State and turn logic of one conversation thread (one incarnation of it)."""

    def __init__(
        self,
        key: ThreadKey,
        team: TeamConfig,
        store: ThreadStore,
        agents: AgentCaller,
        incarnation: Incarnation,
        clock: Callable[[], float] = time.time,
        observe: Callable[[TurnResult, float], None] | None = None,
    ) -> None:
        self.key = key
        self._team = team
        self._store = store
        self._agents = agents
        self._clock = clock
        self._observe = observe
        self._lock = asyncio.Lock()
        self._fenced = False
        self._closed = False
        self._stale = False
        # Whether what left the thread stale may have been the turn's fault (a cancelled
        # request), so the reopen counts an attempt; a store outage alone is not.
        self._interrupted = False
        # The token of a reopen that failed: the next one sends it again, so that if Redis
        # ran the failed one (its answer lost), it does not take a second epoch or attempt.
        self._open_token: str | None = None
        self._adopt(incarnation)
        self.last_active = clock()

    def _adopt(self, incarnation: Incarnation) -> None:
        ckpt = incarnation.checkpoint
        # An agent removed from the config since the checkpoint falls back to the supervisor.
        known = {a.name for a in self._team.specialists}
        self._epoch = incarnation.epoch
        self._active = ckpt.active_agent if ckpt.active_agent in known else None
        self._buffer = ShortTermBuffer(_BUFFER_CAP * self._team.threads.buffer_size, ckpt.buffer)
        self._turns = ckpt.turn
        self._version = ckpt.version

    @classmethod
    async def open(
        cls,
        key: ThreadKey,
        team: TeamConfig,
        store: ThreadStore,
        agents: AgentCaller,
        clock: Callable[[], float] = time.time,
        observe: Callable[[TurnResult, float], None] | None = None,
        token: str | None = None,
    ) -> Thread:
        """A new incarnation: takes an epoch, restores the checkpoint, resolves a pending turn.

        ``observe`` is called with each turn this incarnation stores, completed or failed,
        with the seconds it took: one left pending by a previous incarnation included, a
        retried message's stored result and commands not. ``token`` names the opening (the
        store's ``open``): the caller passes the token of an opening that failed again, so
        that one Redis ran (its answer lost) takes no second epoch or attempt.
        """
        incarnation = await store.open(key, token=token)
        thread = cls(key, team, store, agents, incarnation, clock, observe)
        await thread._resolve(incarnation.pending)
        return thread

    @property
    def epoch(self) -> int:
        """This incarnation's fencing token."""
        return self._epoch

    @property
    def active_agent(self) -> str | None:
        """The specialist that answers follow-ups; None means the supervisor."""
        return self._active

    @property
    def busy(self) -> bool:
        """Whether a message is being handled or waiting."""
        return self._lock.locked()

    def snapshot(self) -> ThreadSnapshot:
        """The thread's visible state."""
        return ThreadSnapshot(
            thread_id=self.key.thread_id,
            active_agent=self._active,
            turns=self._turns,
            buffer=self._buffer.entries(),
            version=self._version,
        )

    async def close(self) -> None:
        """Stop serving after the turn in progress (passivation). Idempotent."""
        async with self._lock:
            self._closed = True

    async def handle(self, message: InboundMessage) -> TurnResult:
        """Handle one message. Messages queue on the lock, so turns never interleave."""
        async with self._lock:
            self.last_active = self._clock()
            if self._fenced:
                raise ThreadFenced(str(self.key), self._epoch)
            if self._closed:
                raise ThreadPassivated(str(self.key))
            try:
                try:
                    return await self._handle(message)
                except (TurnPending, CheckpointConflict):
                    # Only this incarnation writes (fencing), so the store holding a write
                    # it did not see complete means an earlier send of that write was applied
                    # and its answer lost (a retried script). Reopening reads it back and
                    # completes a pending turn, which has not run yet: no attempt is counted.
                    await self._reopen(count_attempt=False)
                    return await self._handle(message)
            except (ThreadFenced, MessageIdReused):
                raise  # superseded, or refused before anything was written
            except BaseException as exc:
                # Whatever stopped this message midway (a cancelled request, a store error),
                # the store may hold what this incarnation did not see: the turn may be
                # accepted and not committed, which would block every later message.
                # Reopening before the next one completes it, as after a crash.
                self._stale = True
                if not isinstance(exc, StoreUnavailable):
                    self._interrupted = True
                raise
            finally:  # idle time counts from the reply: a long turn is no idle time
                self.last_active = self._clock()

    async def _handle(self, message: InboundMessage) -> TurnResult:
        if self._stale:
            await self._reopen(count_attempt=self._interrupted)
        command = parse_command(message.text)
        if command is not None:
            return await self._command(command, message)
        accepted = await self._guard(self._store.accept(self.key, self._epoch, message))
        if isinstance(accepted, TurnResult):
            return accepted  # a retry: the first delivery's stored result, no new turn
        return await self._run(message, accepted)

    async def _guard(self, write: Awaitable[T]) -> T:
        """Await a store write; remember when this incarnation is superseded."""
        try:
            return await write
        except ThreadFenced:
            self._fenced = True
            raise

    async def _reopen(self, count_attempt: bool = True) -> None:
        if self._open_token is None:
            self._open_token = uuid.uuid4().hex
        opening = self._store.open(self.key, count_attempt, self._open_token)
        incarnation = await self._guard(opening)
        self._open_token = None
        self._adopt(incarnation)
        self._stale = self._interrupted = False
        await self._resolve(incarnation.pending)

    async def _resolve(self, pending: PendingTurn | None) -> None:
        if pending is None:
            return
        if pending.attempts > MAX_TURN_ATTEMPTS:
            log.warning(
                "thread %s turn %d failed after %d attempts",
                self.key,
                pending.seq,
                pending.attempts - 1,
            )
            reason = (
                f"this turn was interrupted {pending.attempts - 1} times (its actor stopped or "
                "its request was cancelled); the turn was abandoned"
            )
            await self._record_failure(pending.message, pending.seq, reason)
            return
        log.info(
            "thread %s: completing turn %d left by a previous incarnation", self.key, pending.seq
        )
        await self._run(pending.message, pending.seq)

    async def _command(self, command: Command, message: InboundMessage) -> TurnResult:
        name = command.name
        outcome = run_command(
            name, active_agent=self._active, turns=self._turns, team=self._team, after=command.after
        )
        result = TurnResult(
            thread_id=self.key.thread_id,
            message_id=message.message_id,
            turn=0 if outcome.clear_buffer else self._turns,
            agent=None,
            reply=outcome.reply,
            command=name,
            completed_at=self._clock(),
        )
        # A command that changes the thread is stored with its message id, so a retry gets the
        # first answer back instead of, say, resetting the turns accepted in between. It is
        # the same command however it was sent ("/RESET", by POST .../reset, by any user).
        said = fingerprint(f"/{name}")
        stored: TurnResult | None = None
        if outcome.clear_buffer:
            checkpoint = Checkpoint(version=self._version + 1)
            reset = self._store.reset(
                self.key, self._epoch, checkpoint, result, fingerprint=said, keep=_COMMANDS_SAID
            )
            stored = await self._guard(reset)
            if stored is None:
                self._adopt_checkpoint(checkpoint)
        elif outcome.back_to_supervisor:
            stored = await self._commit(None, self._buffer.entries(), self._turns, result, said)
        if stored is not None:
            # Answered before: by a retry of the message, or by an earlier send of this very
            # write whose answer was lost, in which case the store holds the command's state
            # and this incarnation does not. Read it back before the next message.
            self._stale = True
        return stored or result

    async def _run(self, message: InboundMessage, turn: int) -> TurnResult:
        started = time.monotonic()
        try:
            result, active = await run_agents(
                self.key,
                self._team,
                self._agents,
                message,
                turn,
                active=self._active,
                buffer=self._buffer.entries(),
                clock=self._clock,
            )
        except Exception as exc:  # any failure of an accepted turn is recorded, not lost
            log.warning("thread %s turn %d failed: %s", self.key, turn, type(exc).__name__)
            reason = f"{type(exc).__name__}: {exc}"
            return await self._record_failure(message, turn, reason, started)
        buffer = self._buffer.entries()
        user = message.user_id
        # What the turn's tools did goes on its last entry: also when the turn failed after
        # doing it, so that the message sent again is not done twice.
        before_failing = result.actions if result.status == "failed" else []
        # A refused exchange is no context: later turns sent with it could be refused for it
        # too (unless tools ran in it, which the next turns must know of). It stays a turn.
        if result.error not in REFUSED_ERRORS or result.actions:
            buffer.append(
                BufferEntry(
                    role="user", text=message.text, turn=turn, user_id=user, actions=before_failing
                )
            )
            if result.status == "completed":  # an apology is no context for the next turn
                reply = BufferEntry(
                    role="assistant",
                    text=result.reply,
                    turn=turn,
                    agent=result.agent,
                    user_id=user,
                    actions=result.actions,
                )
                buffer.append(reply)
        buffer, compressed = await compact(self.key, self._team, self._agents, buffer, active)
        if compressed:  # the summaries were written by a model within this turn: its cost
            result = _with_usage(result, compressed)
        await self._commit(active, buffer, turn, result)
        self._observed(result, started)
        return result

    def _observed(self, result: TurnResult, started: float) -> None:
        """Hand a stored turn to the observer; a failing observer never fails the turn."""
        if self._observe is None:
            return
        try:
            self._observe(result, time.monotonic() - started)
        except Exception:
            log.debug("turn observer failed", exc_info=True)

    async def _record_failure(
        self, message: InboundMessage, turn: int, reason: str, started: float | None = None
    ) -> TurnResult:
        started = time.monotonic() if started is None else started
        result = TurnResult(
            thread_id=self.key.thread_id,
            message_id=message.message_id,
            turn=turn,
            agent=None,
            reply=_SORRY,
            status="failed",
            error=reason,
            completed_at=self._clock(),
        )
        buffer = self._buffer.entries()
        entry = BufferEntry(role="user", text=message.text, turn=turn, user_id=message.user_id)
        buffer.append(entry)
        await self._commit(self._active, buffer, turn, result)
        self._observed(result, started)
        return result

    async def _commit(
        self,
        active: str | None,
        buffer: list[BufferEntry],
        turn: int,
        result: TurnResult | None,
        fingerprint: str = "",
    ) -> TurnResult | None:
        """Store first, then adopt: a failed write leaves the in-memory thread unchanged.

        Returns the stored result when ``result`` is a command answered before (nothing is
        written or adopted then); ``fingerprint`` is that command's message's.
        """
        checkpoint = Checkpoint(
            active_agent=active, buffer=buffer, turn=turn, version=self._version + 1
        )
        write = self._store.commit(self.key, self._epoch, checkpoint, result, fingerprint)
        stored = await self._guard(write)
        if stored is None:
            self._adopt_checkpoint(checkpoint)
        return stored

    def _adopt_checkpoint(self, checkpoint: Checkpoint) -> None:
        self._active = checkpoint.active_agent
        self._buffer = ShortTermBuffer(self._buffer.max_messages, checkpoint.buffer)
        self._turns = checkpoint.turn
        self._version = checkpoint.version
