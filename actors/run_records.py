"""The records of the run queue: a run as the API shows it, and the entries a worker reads.

``RunRecord`` is what GET /v1/threads/{thread_id}/runs/{message_id} returns; ``QueuedRun``
is an entry of the queue, ``OutboundReply`` one of an outbox (``actors.run_streams``
describes the streams, and reads the records from Redis).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from actors.key import ThreadKey
from stickyray.turns import InboundMessage, TurnResult

__all__ = [
    "OutboundReply",
    "QueuedRun",
    "ReplyStatus",
    "RunRecord",
    "RunStatus",
]

RunStatus = Literal["queued", "running", "completed", "failed", "cancelled"]
ReplyStatus = Literal["pending", "sent", "failed"]


class RunRecord(BaseModel):
    """A queued run as GET /v1/threads/{thread_id}/runs/{message_id} shows it.

    ``result`` is the turn (or command) once the run finished, as POST .../messages would
    have returned it; ``status`` is then that turn's. ``error`` without a result: the
    message could not be delivered to its thread (not an outage: those are retried).
    ``attempts`` counts deliveries. ``reply``: for a run from a channel, whether its reply
    was sent to the channel; for a run with a webhook, whether the webhook took its outcome
    (``reply_error`` says why not).
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    thread_id: str
    message_id: str
    status: RunStatus
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    result: TurnResult | None = None
    error: str | None = None
    reply: ReplyStatus | None = None
    reply_error: str | None = None

    @property
    def finished(self) -> bool:
        """Whether the run is over: completed, failed or cancelled."""
        return self.status not in ("queued", "running")


@dataclass(frozen=True)
class QueuedRun:
    """One stream entry: a run to deliver; ``reply_to`` says where its reply goes, if
    anywhere but the run's record (a channel's address, opaque to the queue)."""

    entry: str
    key: ThreadKey
    message: InboundMessage
    reply_to: dict[str, Any] | None = None

    @property
    def queued_at(self) -> float:
        """When the entry was added: its id starts with Redis's clock in milliseconds."""
        return int(self.entry.split("-", 1)[0]) / 1000.0


@dataclass(frozen=True)
class OutboundReply:
    """One outbox entry: the reply of a finished run, for the channel in ``to`` (or its
    webhook); ``stream`` is the outbox it is in."""

    entry: str
    to: dict[str, Any]
    text: str
    thread: str
    message_id: str
    record: str
    stream: str
