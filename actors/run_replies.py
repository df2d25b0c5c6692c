"""The outboxes of the run queue in Redis: replies to send to a channel, and outcomes to
tell a webhook, of runs that finished.

Finishing a run puts its reply in an outbox in the same step (``RunQueue.finish``); the
worker holding the queue's lease reads them here, sends them, and notes on each run whether
its reply was sent. The keys are described in ``actors.run_streams``.
"""

from __future__ import annotations

import json
import logging

import redis.asyncio as aioredis

from actors import _run_scripts as scripts
from actors.key import ThreadKey
from actors.redis_store import redis_outages
from actors.run_records import OutboundReply, RunRecord
from actors.run_streams import LeasedStreams, LeaseLost, RunKeys, read_record, text

__all__ = ["RunReplies"]

log = logging.getLogger(__name__)

# The longest platform message id kept (WhatsApp's are some 60 characters).
_MAX_PLATFORM_ID = 256


class RunReplies:
    """The outboxes of one app's runs: of replies (to channels) and of webhooks."""

    def __init__(self, client: aioredis.Redis, keys: RunKeys, streams: LeasedStreams) -> None:
        self._client = client
        self._keys = keys
        self._streams = streams
        self._reply_done = client.register_script(scripts.REPLY_DONE)
        self._pieces_sent = client.register_script(scripts.PIECES_SENT)
        self._sent_as = client.register_script(scripts.SENT_AS)
        self._not_delivered = client.register_script(scripts.NOT_DELIVERED)

    def _stream(self, webhooks: bool) -> str:
        return self._keys.webhook_outbox if webhooks else self._keys.outbox

    async def last_read(self, *, webhooks: bool = False) -> str:
        """The id of the newest reply (or webhook) a worker has read (``0-0`` for none)."""
        return await self._streams.last_read(self._stream(webhooks))

    async def wait(self, after: str, block_ms: int, *, webhooks: bool = False) -> None:
        """Return once a reply (or webhook) newer than ``after`` is in its outbox, or after
        ``block_ms``."""
        await self._streams.wait(self._stream(webhooks), after, block_ms)

    async def read(
        self,
        token: str,
        count: int,
        *,
        after: str | None = None,
        seen: str = "0-0",
        webhooks: bool = False,
    ) -> tuple[list[OutboundReply], str | None, str]:
        """Replies to send (or, with ``webhooks``, runs to tell their webhook about), as
        ``RunQueue.read`` reads runs (the same arguments and results). An entry that cannot
        be read is dropped, with a warning."""
        stream = self._stream(webhooks)
        entries, last, delivered = await self._streams.read(stream, token, count, after, seen)
        replies: list[OutboundReply] = []
        for entry, fields in entries:
            try:
                body = json.loads(fields["reply"])
                replies.append(
                    OutboundReply(
                        entry=entry,
                        to=dict(body["to"]),
                        text=str(body["text"]),
                        thread=str(body["thread"]),
                        message_id=str(body["message_id"]),
                        record=text(fields["record"]),
                        stream=stream,
                    )
                )
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("outbox entry %s dropped, unreadable: %r", entry, exc)
                record = text(fields.get("record", ""))
                await self._done(token, stream, entry, record, "failed", "unreadable in the outbox")
        return replies, last, delivered

    async def record_of(self, reply: OutboundReply) -> RunRecord | None:
        """The record of ``reply``'s run; None once it expired."""
        tenant, thread_id = reply.thread.split("/", 1)
        with redis_outages():
            fields = await self._client.hgetall(reply.record)
        key = ThreadKey(tenant, thread_id)
        return read_record(key, reply.message_id, fields) if fields else None

    async def done(self, token: str, reply: OutboundReply, *, error: str | None = None) -> None:
        """Take ``reply`` off its outbox and note on its run whether it was sent."""
        status = "failed" if error is not None else "sent"
        await self._done(token, reply.stream, reply.entry, reply.record, status, error or "")

    async def _done(
        self, token: str, stream: str, entry: str, record: str, status: str, error: str
    ) -> None:
        # A record key outside this app's runs would be written by the script: refuse it.
        if not record.startswith(self._keys.record_prefix):
            record = f"{self._keys.record_prefix}unknown"
        with redis_outages():
            (outcome, *_) = await self._reply_done(
                keys=[self._keys.lease, stream, record, self._keys.progress_of(stream)],
                args=[token, entry, status, error],
            )
        if text(outcome) == "lost":
            raise LeaseLost(token)

    async def sent_as(self, reply: OutboundReply, platform_id: str) -> None:
        """Note that the channel calls a message it was sent of ``reply`` ``platform_id``
        (a WhatsApp ``wamid``), so that a failure it reports later by that id is noted on
        the run (``not_delivered``)."""
        if not platform_id or len(platform_id) > _MAX_PLATFORM_ID:
            return
        with redis_outages():
            await self._sent_as(keys=[reply.record, self._keys.sent(platform_id)])

    async def not_delivered(self, platform_id: str, why: str) -> str | None:
        """Note on the run whose reply the channel calls ``platform_id`` that the channel
        did not deliver it after all (``reply`` failed, ``reply_error`` why). Which run that
        was (``<tenant>/<thread>/<message id>``); None if none is known: not sent by this
        app, or its record expired."""
        if not platform_id or len(platform_id) > _MAX_PLATFORM_ID:
            return None
        prefix = self._keys.record_prefix
        with redis_outages():
            record = await self._client.get(self._keys.sent(platform_id))
            if record is None:
                return None
            record = text(record)
            if not record.startswith(prefix):
                return None
            if not await self._not_delivered(keys=[record], args=[why]):
                return None
        return record.removeprefix(prefix)

    async def pieces_sent(self, reply: OutboundReply) -> int:
        """How many pieces of ``reply`` were sent already (by this or an earlier worker)."""
        with redis_outages():
            sent = await self._client.hget(self._keys.progress_of(reply.stream), reply.entry)
        return int(sent) if sent is not None else 0

    async def piece_sent(self, token: str, reply: OutboundReply, pieces: int) -> None:
        """Record that the first ``pieces`` pieces of ``reply`` were sent, so that a worker
        taking over sends only the rest. Raises LeaseLost unless ``token`` holds the lease."""
        with redis_outages():
            (outcome, *_) = await self._pieces_sent(
                keys=[self._keys.lease, reply.stream, self._keys.progress_of(reply.stream)],
                args=[token, reply.entry, pieces],
            )
        if text(outcome) == "lost":
            raise LeaseLost(token)
