"""The run queue in Redis: messages accepted now and answered later, in order per thread.

A run is one message of a thread, identified by the thread and its message id. Submitting
it records it and appends it to the app's stream in one Lua script, so a run is queued
exactly once however often its submission is retried, and a full queue refuses it before
anything is written.

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
- ``lease``  which worker may read the queue (see ``acquire``): one at a time, so a
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

import json
import logging
import time
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from actors import _run_scripts as scripts
from actors.key import ThreadKey
from actors.redis_store import redis_outages
from actors.run_records import OutboundReply, QueuedRun, RunRecord
from stickyray.config import RunsConfig
from stickyray.errors import InvalidThreadKey, MessageIdReused, RunQueueFull
from stickyray.turns import SORRY_REPLY, InboundMessage, TurnResult
from stickyray.webhooks import WEBHOOK_CHANNEL

__all__ = [
    "GROUP",
    "LeaseLost",
    "RunQueue",
]

log = logging.getLogger(__name__)

GROUP = "workers"
_CONSUMER = "worker"
# The longest platform message id kept (WhatsApp's are some 60 characters).
_MAX_PLATFORM_ID = 256


class LeaseLost(Exception):
    """This worker no longer holds the queue's lease: another one reads it now."""


def _position(entry: str) -> int:
    """A run's place in its thread's open index, from its stream entry id, as a release
    that kept no ``position`` in the record gave it."""
    ms, seq = entry.split("-")
    return int(ms) * 1000 + min(int(seq), 999)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _record(key: ThreadKey, message_id: str, flat: list[Any] | dict[Any, Any]) -> RunRecord:
    """A record from HGETALL's flat reply (as a script returns it) or a dict."""
    pairs = zip(flat[::2], flat[1::2], strict=True) if isinstance(flat, list) else flat.items()
    fields = {_text(k): _text(v) for k, v in pairs}

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


class RunQueue:
    """The run queue of one Serve application (``app``), on one Redis client."""

    def __init__(self, client: aioredis.Redis, app: str, config: RunsConfig) -> None:
        self._client = client
        self._config = config
        prefix = f"stickyray:{{runs/{app}}}"
        self._queue = f"{prefix}:queue"
        self._lease = f"{prefix}:lease"
        self._outbox = f"{prefix}:outbox"
        self._webhook_box = f"{prefix}:webhooks"
        # How many pieces of a long reply were sent, by outbox entry.
        self._progress = f"{prefix}:progress"
        # The same for the webhooks' outbox: entry ids repeat across streams (each stream
        # numbers its own), so one stream's finished entry must not clear another's count.
        self._webhook_progress = f"{prefix}:webhook-progress"
        self._records = f"{prefix}:run:"
        self._open = f"{prefix}:open:"
        self._last_position = f"{prefix}:last-position"
        self._webhooks = f"{prefix}:sends-webhooks"
        self._sent = f"{prefix}:sent:"
        self._submit = client.register_script(scripts.SUBMIT)
        self._read = client.register_script(scripts.READ)
        self._start = client.register_script(scripts.START)
        self._finish = client.register_script(scripts.FINISH)
        self._acquire = client.register_script(scripts.ACQUIRE)
        self._renew = client.register_script(scripts.RENEW)
        self._release = client.register_script(scripts.RELEASE)
        self._reply_done = client.register_script(scripts.REPLY_DONE)
        self._pieces_sent = client.register_script(scripts.PIECES_SENT)
        self._cancel = client.register_script(scripts.CANCEL)
        self._sent_as = client.register_script(scripts.SENT_AS)
        self._not_delivered = client.register_script(scripts.NOT_DELIVERED)

    def _record_key(self, key: ThreadKey, message_id: str) -> str:
        return f"{self._records}{key}/{message_id}"

    def _open_key(self, key: ThreadKey) -> str:
        return f"{self._open}{key}"

    async def submit(
        self, key: ThreadKey, message: InboundMessage, reply_to: dict[str, Any] | None = None
    ) -> tuple[RunRecord, bool]:
        """Queue ``message`` for ``key``; the run's record, and whether this call queued it.

        A message id already queued (or run) returns that run, unchanged, full queue or not;
        MessageIdReused if it was queued with a different message.
        With ``reply_to``, finishing the run puts its reply in the outbox for that address.
        Raises RunQueueFull when ``runs.max_queued`` runs wait or run.
        """
        with redis_outages():
            status, fields = await self._submit(
                keys=[
                    self._queue,
                    self._record_key(key, message.message_id),
                    self._open_key(key),
                    self._last_position,
                ],
                args=[
                    str(key),
                    message.message_id,
                    message.model_dump_json(),
                    time.time(),
                    self._config.max_queued,
                    json.dumps(reply_to) if reply_to is not None else "",
                    message.fingerprint,
                ],
            )
        if _text(status) == "full":
            raise RunQueueFull(int(fields), self._config.max_queued)
        if _text(status) == "exists":
            named = {_text(k): _text(v) for k, v in zip(fields[::2], fields[1::2], strict=True)}
            stored = named.get("fingerprint")
            # None: queued by a release before fingerprints, taken as the same message.
            if stored and stored != message.fingerprint:
                raise MessageIdReused(str(key), message.message_id)
        return _record(key, message.message_id, fields), _text(status) == "queued"

    async def get(self, key: ThreadKey, message_id: str) -> RunRecord | None:
        """The run of ``key`` with ``message_id``; None if never queued, or long finished."""
        with redis_outages():
            fields = await self._client.hgetall(self._record_key(key, message_id))
        return _record(key, message_id, fields) if fields else None

    async def cancel(self, key: ThreadKey, message_id: str) -> tuple[RunRecord | None, bool]:
        """Take a queued run off the queue: its record, and whether this call cancelled it.

        Only a run that has not started: a turn in progress cannot be stopped halfway. A run
        cancelled before is returned as it is (False), as is one that started or finished;
        None if there is no such run. The cancelled record expires ``result_ttl_s`` later.
        """
        with redis_outages():
            outcome, fields = await self._cancel(
                keys=[self._queue, self._record_key(key, message_id), self._open_key(key)],
                args=[time.time(), self._config.result_ttl_s, message_id],
            )
        if _text(outcome) == "missing":
            return None, False
        return _record(key, message_id, fields), _text(outcome) == "cancelled"

    async def open_runs(
        self, key: ThreadKey, limit: int, after: str | None = None
    ) -> list[RunRecord] | None:
        """The thread's runs not finished (queued or running), in queue order, at most
        ``limit``, from the one queued after run ``after`` (None: ``after`` names no run of
        the thread, or one whose record expired)."""
        with redis_outages():
            start = "-inf"
            if after is not None:
                position, entry = await self._client.hmget(
                    self._record_key(key, after), ["position", "entry"]
                )
                if position is None and entry is None:
                    return None
                # Queued by a release that kept no position: the one it was listed by.
                start = f"({_text(position) if position is not None else _position(_text(entry))}"
            while True:
                index = self._open_key(key)
                page = await self._client.zrangebyscore(index, start, "+inf", start=0, num=limit)
                mids = [_text(m) for m in page]
                async with self._client.pipeline(transaction=False) as pipe:
                    for mid in mids:
                        pipe.hgetall(self._record_key(key, mid))
                    found = await pipe.execute()
                pairs = zip(mids, found, strict=True)
                records = [_record(key, m, f) if f else None for m, f in pairs]
                # Finished between the two reads, or by a worker of an earlier release that
                # did not keep the index (during a rolling deploy): not open, and not kept.
                stale = [m for m, r in zip(mids, records, strict=True) if r is None or r.finished]
                if not stale:
                    return [r for r in records if r is not None]
                await self._client.zrem(index, *stale)

    async def mark_webhooks(self) -> None:
        """Note that the app's run worker sends webhooks: a worker of a release without them
        would fail them (what ``takes_webhooks`` tells the ingress)."""
        with redis_outages():
            await self._client.set(self._webhooks, "1")

    async def takes_webhooks(self) -> bool:
        """Whether a run worker of a release that sends webhooks has held the lease."""
        with redis_outages():
            return bool(await self._client.exists(self._webhooks))

    async def depth(self) -> int:
        """Runs waiting or running."""
        with redis_outages():
            return int(await self._client.xlen(self._queue))

    async def acquire(self, token: str, ttl_s: float) -> bool:
        """Take the lease that lets one worker read the queue, unless another holds it."""
        with redis_outages():
            ms = int(ttl_s * 1000)
            return bool(await self._acquire(keys=[self._lease], args=[token, ms]))

    async def renew(self, token: str, ttl_s: float) -> bool:
        """Extend the lease; False if ``token`` no longer holds it (it expired)."""
        with redis_outages():
            return bool(await self._renew(keys=[self._lease], args=[token, int(ttl_s * 1000)]))

    async def release(self, token: str) -> None:
        """Give the lease up, if ``token`` holds it, so the next worker need not wait."""
        with redis_outages():
            await self._release(keys=[self._lease], args=[token])

    async def join(self) -> None:
        """Create the consumer groups of the queue and the outboxes if missing (idempotent)."""
        with redis_outages():
            for stream in (self._queue, self._outbox, self._webhook_box):
                try:
                    # From id 0: runs queued before the group existed are delivered too.
                    await self._client.xgroup_create(stream, GROUP, id="0", mkstream=True)
                except ResponseError as exc:
                    if "BUSYGROUP" not in str(exc):
                        raise

    def _progress_of(self, stream: str) -> str:
        return self._webhook_progress if stream == self._webhook_box else self._progress

    def _stream(self, outbox: bool, webhooks: bool) -> str:
        if webhooks:
            return self._webhook_box
        return self._outbox if outbox else self._queue

    async def last_read(self, *, outbox: bool = False, webhooks: bool = False) -> str:
        """The id of the newest run (or reply, or webhook) a worker has read (``0-0`` for
        none)."""
        with redis_outages():
            groups = await self._client.xinfo_groups(self._stream(outbox, webhooks))
        for group in groups:
            if _text(group["name"]) == GROUP:
                return _text(group["last-delivered-id"])
        return "0-0"

    async def wait(
        self, after: str, block_ms: int, *, outbox: bool = False, webhooks: bool = False
    ) -> None:
        """Return once a run (or reply, or webhook) newer than ``after`` is queued, or after
        ``block_ms``."""
        stream = self._stream(outbox, webhooks)
        with redis_outages():
            await self._client.xread({stream: after}, count=1, block=block_ms)

    async def read(
        self, token: str, count: int, *, after: str | None = None, seen: str = "0-0"
    ) -> tuple[list[QueuedRun], str | None, str]:
        """Up to ``count`` runs, oldest first; the last entry id read; and the last id the
        group delivered. Never waits.

        Without ``after``: runs never read before, after those read and lost since ``seen``
        (the newest id this worker got). With ``after`` (``"0"`` to start): runs read
        before and not finished (their worker stopped), past that entry id; the id is None
        when none are left. Raises LeaseLost unless ``token`` holds the lease. An entry that
        cannot be read (written by another release, say) fails its run.
        """
        entries, last, delivered = await self._read_stream(self._queue, token, count, after, seen)
        runs: list[QueuedRun] = []
        for entry, fields in entries:
            run = await self._parse(token, entry, fields)
            if run is not None:
                runs.append(run)
        return runs, last, delivered

    async def _read_stream(
        self, stream: str, token: str, count: int, after: str | None, seen: str
    ) -> tuple[list[tuple[str, dict[str, Any]]], str | None, str]:
        with redis_outages():
            try:
                status, *reply = await self._read(
                    keys=[self._lease, stream], args=[token, count, after or ">", seen]
                )
            except ResponseError as exc:
                if "NOGROUP" not in str(exc) and "no such key" not in str(exc):
                    raise
                await self.join()  # the stream was deleted (a flushed Redis)
                return [], None, "0-0"
        if _text(status) == "lost":
            raise LeaseLost(token)
        delivered, streams = _text(reply[0]), reply[1]
        entries: list[tuple[str, dict[str, Any]]] = []
        last: str | None = None
        for _stream, found in streams or []:
            for entry, flat in found:
                last = _text(entry)
                # No fields: the entry was deleted while pending.
                fields = dict(zip(flat[::2], flat[1::2], strict=True)) if flat else {}
                entries.append((last, {_text(k): v for k, v in fields.items()}))
        return entries, last, delivered

    async def _parse(self, token: str, entry: str, data: dict[str, Any]) -> QueuedRun | None:
        """The run in a stream entry; None, with the entry gone, if it cannot be read."""
        try:
            key = ThreadKey(*_text(data["thread"]).split("/", 1))
            message = InboundMessage.stored(data["message"])
            reply_to = json.loads(data["reply_to"]) if "reply_to" in data else None
            if reply_to is not None and not isinstance(reply_to, dict):
                raise ValueError(f"reply_to is not an object: {reply_to!r}")
            return QueuedRun(entry, key, message, reply_to)
        except (KeyError, TypeError, ValueError, InvalidThreadKey) as exc:
            reason = f"unreadable run in the queue: {type(exc).__name__}: {exc}"
        if data:
            log.warning("run queue entry %s: %s", entry, reason)
        try:  # fail its run, if the entry still says which
            key = ThreadKey(*_text(data["thread"]).split("/", 1))
            message_id = json.loads(data["message"])["message_id"]
            if not isinstance(message_id, str) or not message_id:
                raise ValueError("no message id")
        except (KeyError, TypeError, ValueError, InvalidThreadKey):
            with redis_outages():  # an entry deleted while pending, or one naming no run
                await self._client.xack(self._queue, GROUP, entry)
                await self._client.xdel(self._queue, entry)
            return None
        unreadable = QueuedRun(entry, key, InboundMessage(text="", message_id=message_id))
        await self.finish(token, unreadable, error=reason)
        return None

    async def _leased(
        self, script: Any, token: str, run: QueuedRun, *args: Any, outbox: str | None = None
    ) -> str:
        record = self._record_key(run.key, run.message.message_id)
        box = outbox or self._outbox
        with redis_outages():
            status, *_ = await script(
                keys=[self._lease, self._queue, record, box, self._open_key(run.key)],
                args=[token, run.entry, *args],
            )
        if _text(status) == "lost":
            raise LeaseLost(token)
        return _text(status)

    async def start(self, token: str, run: QueuedRun) -> bool:
        """Mark ``run`` running, one more attempt; False if it was finished already.

        Raises LeaseLost unless ``token`` holds the lease.
        """
        started = await self._leased(
            self._start, token, run, time.time(), run.queued_at, self._config.result_ttl_s
        )
        return started == "started"

    async def finish(
        self,
        token: str,
        run: QueuedRun,
        *,
        result: TurnResult | None = None,
        error: str | None = None,
    ) -> bool:
        """Store ``run``'s outcome and take it off the queue, in one step; False if it was
        finished already. Raises LeaseLost unless ``token`` holds the lease.

        A run with a ``reply_to`` puts its turn's reply (or, failed without a turn, an
        apology) in the outbox, in the same step; one with a webhook puts a note that the
        run finished in the webhooks' outbox (the webhook's body is its record, read when
        it is sent).
        """
        reply = ""
        # A run that failed without a turn still tells its user, as a failed turn does.
        text = result.reply if result is not None else SORRY_REPLY
        # A webhook hears of every finished run; its body is the record, read when sent.
        webhook = run.reply_to is not None and run.reply_to.get("channel") == WEBHOOK_CHANNEL
        if run.reply_to is not None and (text or webhook):
            reply = json.dumps(
                {
                    "to": run.reply_to,
                    "text": text,
                    "thread": str(run.key),
                    "message_id": run.message.message_id,
                }
            )
        status = await self._leased(
            self._finish,
            token,
            run,
            result.status if result is not None else "failed",
            time.time(),
            result.model_dump_json(by_alias=True) if result is not None else "",
            error or "",
            self._config.result_ttl_s,
            run.queued_at,
            reply,
            run.message.message_id,
            outbox=self._webhook_box if webhook else self._outbox,
        )
        return status == "finished"

    async def read_replies(
        self,
        token: str,
        count: int,
        *,
        after: str | None = None,
        seen: str = "0-0",
        webhooks: bool = False,
    ) -> tuple[list[OutboundReply], str | None, str]:
        """Replies to send (or, with ``webhooks``, runs to tell their webhook about), as
        ``read`` reads runs (the same arguments and results). An entry that cannot be read
        is dropped, with a warning."""
        stream = self._stream(True, webhooks)
        entries, last, delivered = await self._read_stream(stream, token, count, after, seen)
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
                        record=_text(fields["record"]),
                        stream=stream,
                    )
                )
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("outbox entry %s dropped, unreadable: %r", entry, exc)
                record = _text(fields.get("record", ""))
                await self._done(token, stream, entry, record, "failed", "unreadable in the outbox")
        return replies, last, delivered

    async def record_of(self, reply: OutboundReply) -> RunRecord | None:
        """The record of ``reply``'s run; None once it expired."""
        tenant, thread_id = reply.thread.split("/", 1)
        with redis_outages():
            fields = await self._client.hgetall(reply.record)
        return _record(ThreadKey(tenant, thread_id), reply.message_id, fields) if fields else None

    async def reply_done(
        self, token: str, reply: OutboundReply, *, error: str | None = None
    ) -> None:
        """Take ``reply`` off the outbox and note on its run whether it was sent."""
        status = "failed" if error is not None else "sent"
        await self._done(token, reply.stream, reply.entry, reply.record, status, error or "")

    async def _done(
        self, token: str, stream: str, entry: str, record: str, status: str, error: str
    ) -> None:
        # A record key outside this app's runs would be written by the script: refuse it.
        if not record.startswith(self._records):
            record = f"{self._records}unknown"
        with redis_outages():
            (outcome, *_) = await self._reply_done(
                keys=[self._lease, stream, record, self._progress_of(stream)],
                args=[token, entry, status, error],
            )
        if _text(outcome) == "lost":
            raise LeaseLost(token)

    async def sent_as(self, reply: OutboundReply, platform_id: str) -> None:
        """Note that the channel calls a message it was sent of ``reply`` ``platform_id``
        (a WhatsApp ``wamid``), so that a failure it reports later by that id is noted on
        the run (``not_delivered``)."""
        if not platform_id or len(platform_id) > _MAX_PLATFORM_ID:
            return
        with redis_outages():
            await self._sent_as(keys=[reply.record, f"{self._sent}{platform_id}"])

    async def not_delivered(self, platform_id: str, why: str) -> str | None:
        """Note on the run whose reply the channel calls ``platform_id`` that the channel
        did not deliver it after all (``reply`` failed, ``reply_error`` why). Which run that
        was (``<tenant>/<thread>/<message id>``); None if none is known: not sent by this
        app, or its record expired."""
        if not platform_id or len(platform_id) > _MAX_PLATFORM_ID:
            return None
        with redis_outages():
            record = await self._client.get(f"{self._sent}{platform_id}")
            if record is None:
                return None
            record = _text(record)
            if not record.startswith(self._records):
                return None
            if not await self._not_delivered(keys=[record], args=[why]):
                return None
        return record.removeprefix(self._records)

    async def pieces_sent(self, reply: OutboundReply) -> int:
        """How many pieces of ``reply`` were sent already (by this or an earlier worker)."""
        with redis_outages():
            sent = await self._client.hget(self._progress_of(reply.stream), reply.entry)
        return int(sent) if sent is not None else 0

    async def piece_sent(self, token: str, reply: OutboundReply, pieces: int) -> None:
        """Record that the first ``pieces`` pieces of ``reply`` were sent, so that a worker
        taking over sends only the rest. Raises LeaseLost unless ``token`` holds the lease."""
        with redis_outages():
            (outcome, *_) = await self._pieces_sent(
                keys=[self._lease, reply.stream, self._progress_of(reply.stream)],
                args=[token, reply.entry, pieces],
            )
        if _text(outcome) == "lost":
            raise LeaseLost(token)
