"""The run queue's keys in Redis, and reading its streams as the holder of its lease.

The queue (``actors.run_queue``) and the outboxes of replies and webhooks
(``actors.run_replies``) keep one app's state under one set of keys, and one worker at a
time reads them: the one holding the lease. This module names the keys once, and reads the
streams for both.

Keys of one app share a hash tag (``stickyray:{runs/<app>}:...``), so every script's keys
live in one slot of a Redis Cluster:

- ``queue``  stream, one entry per run not yet finished (thread key, message JSON), with
  one consumer group (``workers``) and one consumer in it, under the same name in every
  incarnation of the run worker: an entry read and not acknowledged (its worker stopped)
  is read again by the next one.
- ``run:<tenant>/<thread>/<message id>``  hash: status (queued, running, completed,
  failed, cancelled), created_at, started_at, finished_at, attempts, result (the TurnResult
  JSON), error, entry (its id in ``queue``, for cancelling it). It does not expire while
  its run waits; finishing (or cancelling) the run writes it, acknowledges and deletes the
  entry in one script, and the record then expires ``result_ttl_s`` later.
- ``open:<tenant>/<thread>``  sorted set of the thread's runs not finished (message ids,
  scored by their place in the queue), for listing them: submitting adds one, finishing
  or cancelling removes it in the same script, and the set is gone once its last run is.
- ``last-position``  the place in the queue given last: each run's is its entry id's
  millisecond times 1000 plus its sequence or, when that is not past the last one
  (over 999 entries in a millisecond, or Redis's clock behind its last entry's after a
  failover), the last one plus one: unique, and in queue order, so listing runs by it
  neither reorders nor skips them. The run's record keeps it (``position``).
- ``sends-webhooks``  set once a worker that sends webhooks has held the lease; until then
  (a rolling deploy from a release without them) runs naming one are refused.
- ``lease``  which worker may read the queue (see ``RunQueue.acquire``): one at a time, so a
  thread's runs cannot be split between two workers and reordered.
- ``outbox``  stream of replies to send to a channel (Telegram, WhatsApp), for runs
  submitted with a ``reply_to``; ``webhooks`` the same for runs whose outcome goes to a
  webhook (a stream of its own, read on its own: receivers that are down never keep a
  chat's reply from being read). Finishing such a run adds its entry in the same script,
  so a finished run's reply is never lost between the two.
  The worker holding the lease reads it (same group and consumer names), sends, then
  acknowledges and deletes the entry, and notes on the run's record whether the reply was
  sent: at least once, since a worker that stops between sending and acknowledging leaves
  the entry to the next one.
- ``sent:<platform id>``  the record key of the run a message sent to a channel belongs
  to, by the id the platform gave that message (a WhatsApp ``wamid``), for as long as the
  record lasts: a platform that reports a delivery failure later (WhatsApp's statuses)
  names the message by that id, and the failure is noted on the run.

The Lua scripts are in ``actors._run_scripts``; the records read back, and the entries a
worker reads, in ``actors.run_records``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from actors import _run_scripts as scripts
from actors.key import ThreadKey
from actors.redis_store import redis_outages
from actors.run_records import RunRecord
from stickyray.turns import TurnResult

__all__ = [
    "GROUP",
    "LeaseLost",
    "LeasedStreams",
    "RunKeys",
    "read_record",
    "text",
]

# The consumer group of every stream, and its one consumer (named in the scripts too).
GROUP = "workers"


class LeaseLost(Exception):
    """This worker no longer holds the queue's lease: another one reads it now."""


def text(value: Any) -> str:
    """A Redis reply's bytes (or number) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def read_record(key: ThreadKey, message_id: str, flat: list[Any] | dict[Any, Any]) -> RunRecord:
    """A run's record from HGETALL's flat reply (as a script returns it) or a dict."""
    pairs = zip(flat[::2], flat[1::2], strict=True) if isinstance(flat, list) else flat.items()
    fields = {text(k): text(v) for k, v in pairs}

    def number(name: str) -> float | None:
        return float(fields[name]) if name in fields else None

    return RunRecord(
        thread_id=key.thread_id,
        message_id=message_id,
        status=fields["status"],
        created_at=float(fields.get("created_at", 0.0)),
        started_at=number("started_at"),
        finished_at=number("finished_at"),
        attempts=int(fields.get("attempts", 0)),
        result=TurnResult.model_validate_json(fields["result"]) if "result" in fields else None,
        error=fields.get("error"),
        reply=fields.get("reply"),
        reply_error=fields.get("reply_error"),
    )


@dataclass(frozen=True)
class RunKeys:
    """The Redis keys of one app's runs, as the module's docstring describes them."""

    queue: str
    lease: str
    outbox: str
    webhook_outbox: str
    # How many pieces of a long reply were sent, by outbox entry; the webhooks' outbox has
    # its own: entry ids repeat across streams (each numbers its own), so one stream's
    # finished entry must not clear another's count.
    progress: str
    webhook_progress: str
    last_position: str
    sends_webhooks: str
    record_prefix: str
    open_prefix: str
    sent_prefix: str

    @classmethod
    def of(cls, app: str) -> RunKeys:
        """The keys of ``app``'s runs, all under one hash tag."""
        prefix = f"stickyray:{{runs/{app}}}"
        return cls(
            queue=f"{prefix}:queue",
            lease=f"{prefix}:lease",
            outbox=f"{prefix}:outbox",
            webhook_outbox=f"{prefix}:webhooks",
            progress=f"{prefix}:progress",
            webhook_progress=f"{prefix}:webhook-progress",
            last_position=f"{prefix}:last-position",
            sends_webhooks=f"{prefix}:sends-webhooks",
            record_prefix=f"{prefix}:run:",
            open_prefix=f"{prefix}:open:",
            sent_prefix=f"{prefix}:sent:",
        )

    def record(self, key: ThreadKey, message_id: str) -> str:
        """The record of ``key``'s run of ``message_id``."""
        return f"{self.record_prefix}{key}/{message_id}"

    def open(self, key: ThreadKey) -> str:
        """The index of ``key``'s runs not finished."""
        return f"{self.open_prefix}{key}"

    def sent(self, platform_id: str) -> str:
        """The record key of the run a message the channel calls ``platform_id`` was of."""
        return f"{self.sent_prefix}{platform_id}"

    def progress_of(self, stream: str) -> str:
        """The count of pieces sent, for the entries of outbox ``stream``."""
        return self.webhook_progress if stream == self.webhook_outbox else self.progress


class LeasedStreams:
    """The app's three streams (the queue and the two outboxes), read for the worker that
    holds the lease."""

    def __init__(self, client: aioredis.Redis, keys: RunKeys) -> None:
        self._client = client
        self._keys = keys
        self._read = client.register_script(scripts.READ)

    async def join(self) -> None:
        """Create the consumer groups of the queue and the outboxes if missing (idempotent)."""
        keys = self._keys
        with redis_outages():
            for stream in (keys.queue, keys.outbox, keys.webhook_outbox):
                try:
                    # From id 0: runs queued before the group existed are delivered too.
                    await self._client.xgroup_create(stream, GROUP, id="0", mkstream=True)
                except ResponseError as exc:
                    if "BUSYGROUP" not in str(exc):
                        raise

    async def last_read(self, stream: str) -> str:
        """The id of the newest entry of ``stream`` a worker has read (``0-0`` for none)."""
        with redis_outages():
            groups = await self._client.xinfo_groups(stream)
        for group in groups:
            if text(group["name"]) == GROUP:
                return text(group["last-delivered-id"])
        return "0-0"

    async def wait(self, stream: str, after: str, block_ms: int) -> None:
        """Return once ``stream`` has an entry newer than ``after``, or after ``block_ms``."""
        with redis_outages():
            await self._client.xread({stream: after}, count=1, block=block_ms)

    async def read(
        self, stream: str, token: str, count: int, after: str | None, seen: str
    ) -> tuple[list[tuple[str, dict[str, Any]]], str | None, str]:
        """Up to ``count`` entries of ``stream``, as ``RunQueue.read`` describes; each as its
        id and its fields (none: the entry was deleted while pending). Raises LeaseLost
        unless ``token`` holds the lease."""
        with redis_outages():
            try:
                status, *reply = await self._read(
                    keys=[self._keys.lease, stream], args=[token, count, after or ">", seen]
                )
            except ResponseError as exc:
                if "NOGROUP" not in str(exc) and "no such key" not in str(exc):
                    raise
                await self.join()  # the stream was deleted (a flushed Redis)
                return [], None, "0-0"
        if text(status) == "lost":
            raise LeaseLost(token)
        delivered, streams = text(reply[0]), reply[1]
        entries: list[tuple[str, dict[str, Any]]] = []
        last: str | None = None
        for _stream, found in streams or []:
            for entry, flat in found:
                last = text(entry)
                fields = dict(zip(flat[::2], flat[1::2], strict=True)) if flat else {}
                entries.append((last, {text(k): v for k, v in fields.items()}))
        return entries, last, delivered
