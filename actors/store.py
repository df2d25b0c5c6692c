"""Where threads keep their state: the model, the Protocols and the in-memory store.

Every write names the writer's epoch. Opening a thread takes a new epoch, so a write from an
older incarnation is refused (fencing); a checkpoint write is also a compare-and-set on the
version, so the state can only move from version N to N+1 and never forks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, field_validator

from actors.key import ThreadKey
from memory.buffer import BufferEntry
from stickyray.errors import CheckpointConflict, MessageIdReused, ThreadFenced, TurnPending
from stickyray.turns import InboundMessage, TurnResult

__all__ = [
    "Checkpoint",
    "InMemoryThreadStore",
    "Incarnation",
    "PendingTurn",
    "ThreadStore",
    "ThreadView",
]


class Checkpoint(BaseModel):
    """Everything a thread actor needs to resume a conversation."""

    # Stored: an instance still on an older release must open a thread a newer one wrote.
    model_config = ConfigDict(extra="ignore", frozen=True)

    active_agent: str | None = None
    buffer: list[BufferEntry] = Field(default_factory=list)
    turn: int = 0
    version: int = 0


class PendingTurn(BaseModel):
    """A message accepted as turn ``seq`` whose outcome is not stored yet."""

    model_config = ConfigDict(extra="ignore", frozen=True)  # stored, like Checkpoint

    seq: int
    message: InboundMessage
    attempts: int = 1

    @field_validator("message", mode="before")
    @classmethod
    def _known_fields(cls, value: Any) -> Any:
        # InboundMessage itself refuses fields it does not know; stored here, it is a record
        # a newer release may have added some to, and the thread must still open.
        if isinstance(value, str | bytes | dict):
            return InboundMessage.stored(value)
        return value


class Incarnation(BaseModel):
    """What a new incarnation of a thread starts from."""

    model_config = ConfigDict(extra="ignore", frozen=True)  # made of stored records

    epoch: int
    checkpoint: Checkpoint
    pending: PendingTurn | None = None


@runtime_checkable
class ThreadStore(Protocol):
    """The write side, used only by the thread's own actor."""

    async def open(
        self, key: ThreadKey, count_attempt: bool = True, token: str | None = None
    ) -> Incarnation:
        """Take a new epoch and read the state; a pending turn's attempt count goes up,
        unless ``count_attempt`` is False (the caller knows the turn has not run since).

        Epochs never repeat, even after the thread's state expired. ``token`` names this
        open (None: a new one): the token of the last open, while the epoch it took is
        still current, is that open again (its answer was lost), which takes no new epoch
        and counts no attempt.
        """
        ...

    async def accept(self, key: ThreadKey, epoch: int, message: InboundMessage) -> int | TurnResult:
        """Record ``message`` as the next turn and return its number, before it runs.

        A message id seen before returns that message's stored result instead, or raises
        MessageIdReused if it came with a different message (``InboundMessage.fingerprint``).
        Raises ThreadFenced if ``epoch`` is no longer current.
        """
        ...

    async def commit(
        self,
        key: ThreadKey,
        epoch: int,
        checkpoint: Checkpoint,
        result: TurnResult | None,
        fingerprint: str = "",
    ) -> TurnResult | None:
        """Atomically store the checkpoint and, for a turn, its result (resolving the pending).

        A command's result (``command`` set) is remembered under its message id, with its
        message's ``fingerprint``, but is not a turn. If that id was answered before, nothing
        is written and the stored result is returned: a retried command does not run twice
        (MessageIdReused if the id came with a different message). Otherwise returns None.
        Raises ThreadFenced for a stale epoch, CheckpointConflict for a stale version.
        """
        ...

    async def reset(
        self,
        key: ThreadKey,
        epoch: int,
        checkpoint: Checkpoint,
        result: TurnResult | None = None,
        fingerprint: str = "",
        keep: Collection[str] = (),
    ) -> TurnResult | None:
        """Delete the thread's history and message results; store ``checkpoint``.

        ``result`` is the reset command's own, remembered afterwards with ``fingerprint``;
        like a command's in ``commit``, an id answered before writes nothing and returns the
        stored result. Stored results of messages whose fingerprint is in ``keep`` (the
        commands') stay, so a late retry of one is answered and does not run again.
        """
        ...


@runtime_checkable
class ThreadView(Protocol):
    """The read side, used by the API without waking the thread's actor."""

    async def load(self, key: ThreadKey) -> Checkpoint | None:
        """The latest checkpoint, or None for a thread never seen."""
        ...

    async def turns(self, key: ThreadKey, after: int = 0, limit: int = 100) -> list[TurnResult]:
        """Turn records with number > ``after``, oldest first."""
        ...

    async def ping(self) -> None:
        """Raise StoreUnavailable when the store cannot be reached."""
        ...


@dataclass(frozen=True)
class _Seen:
    """A message id: when it was accepted, its turn, its result once stored, and the
    fingerprint of the message it came with."""

    at: float
    seq: int
    result: TurnResult | None
    fingerprint: str


@dataclass
class _ThreadData:
    epoch: int = 0
    opened: tuple[str, int] | None = None  # the last open's token and the epoch it took
    checkpoint: Checkpoint | None = None
    pending: PendingTurn | None = None
    turns: dict[int, TurnResult] = field(default_factory=dict)
    results: dict[str, _Seen] = field(default_factory=dict)


class InMemoryThreadStore:
    """ThreadStore and ThreadView in a dict: for unit tests and single-process use."""

    def __init__(
        self, message_id_ttl_s: float = 24 * 3600, clock: Callable[[], float] = time.time
    ) -> None:
        self._threads: dict[ThreadKey, _ThreadData] = {}
        self._message_id_ttl_s = message_id_ttl_s
        self._now = clock

    def _data(self, key: ThreadKey) -> _ThreadData:
        return self._threads.setdefault(key, _ThreadData())

    def _fence(self, key: ThreadKey, epoch: int) -> _ThreadData:
        data = self._data(key)
        if data.epoch != epoch:
            raise ThreadFenced(str(key), epoch)
        return data

    async def open(
        self, key: ThreadKey, count_attempt: bool = True, token: str | None = None
    ) -> Incarnation:
        # Nothing here expires, so the epoch counts on from 1 and never repeats.
        data = self._data(key)
        if token is None or data.opened != (token, data.epoch):
            data.epoch += 1
            data.opened = (token, data.epoch) if token is not None else None
            if data.pending is not None and count_attempt:
                attempts = data.pending.attempts + 1
                data.pending = data.pending.model_copy(update={"attempts": attempts})
        return Incarnation(
            epoch=data.epoch, checkpoint=data.checkpoint or Checkpoint(), pending=data.pending
        )

    async def accept(self, key: ThreadKey, epoch: int, message: InboundMessage) -> int | TurnResult:
        data = self._fence(key, epoch)
        now = self._now()
        for message_id, seen in list(data.results.items()):
            if now - seen.at > self._message_id_ttl_s:
                del data.results[message_id]
        stored = self._answered(key, data, message.message_id, message.fingerprint)
        if stored is not None:
            return stored
        if data.pending is not None:
            raise TurnPending(str(key), data.pending.seq)
        seq = (data.checkpoint.turn if data.checkpoint else 0) + 1
        data.pending = PendingTurn(seq=seq, message=message)
        data.results[message.message_id] = _Seen(now, seq, None, message.fingerprint)
        return seq

    def _answered(
        self, key: ThreadKey, data: _ThreadData, message_id: str, fingerprint: str
    ) -> TurnResult | None:
        """The stored result of ``message_id``; raises if the id came with another message,
        or if it is a turn still pending."""
        seen = data.results.get(message_id)
        if seen is None:
            return None
        if seen.fingerprint and fingerprint and seen.fingerprint != fingerprint:
            raise MessageIdReused(str(key), message_id)
        if seen.result is None:
            raise TurnPending(str(key), seen.seq)
        return seen.result

    def _cas(self, key: ThreadKey, data: _ThreadData, checkpoint: Checkpoint) -> None:
        found = data.checkpoint.version if data.checkpoint else 0
        if found != checkpoint.version - 1:
            raise CheckpointConflict(str(key), checkpoint.version - 1, found)
        data.checkpoint = checkpoint

    async def commit(
        self,
        key: ThreadKey,
        epoch: int,
        checkpoint: Checkpoint,
        result: TurnResult | None,
        fingerprint: str = "",
    ) -> TurnResult | None:
        data = self._fence(key, epoch)
        if result is not None and result.command is not None:
            stored = self._answered(key, data, result.message_id, fingerprint)
            if stored is not None:
                return stored
            self._cas(key, data, checkpoint)
            data.results[result.message_id] = _Seen(self._now(), result.turn, result, fingerprint)
            return None
        self._cas(key, data, checkpoint)
        if result is not None:
            data.turns[result.turn] = result
            seen = data.results.get(result.message_id)
            accepted = seen or _Seen(self._now(), result.turn, None, fingerprint)
            data.results[result.message_id] = replace(accepted, result=result)
            data.pending = None
        return None

    async def reset(
        self,
        key: ThreadKey,
        epoch: int,
        checkpoint: Checkpoint,
        result: TurnResult | None = None,
        fingerprint: str = "",
        keep: Collection[str] = (),
    ) -> TurnResult | None:
        data = self._fence(key, epoch)
        if result is not None:
            stored = self._answered(key, data, result.message_id, fingerprint)
            if stored is not None:
                return stored
        self._cas(key, data, checkpoint)
        data.turns.clear()
        now = self._now()
        data.results = {
            message_id: seen
            for message_id, seen in data.results.items()
            if seen.result is not None
            and seen.fingerprint in keep
            and now - seen.at <= self._message_id_ttl_s
        }
        data.pending = None
        if result is not None:
            data.results[result.message_id] = _Seen(self._now(), result.turn, result, fingerprint)
        return None

    async def load(self, key: ThreadKey) -> Checkpoint | None:
        data = self._threads.get(key)
        return data.checkpoint if data else None

    async def turns(self, key: ThreadKey, after: int = 0, limit: int = 100) -> list[TurnResult]:
        data = self._threads.get(key)
        if data is None:
            return []
        return [data.turns[n] for n in sorted(data.turns) if n > after][:limit]

    async def ping(self) -> None:
        return None
