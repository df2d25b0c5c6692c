"""The run queue in Redis: messages accepted now and answered later, in order per thread.

A run is one message of a thread, identified by the thread and its message id. Submitting
it records it and appends it to the app's stream in one Lua script, so a run is queued
exactly once however often its submission is retried, and a full queue refuses it before
anything is written.

The keys are described, and the streams read, in ``actors.run_streams``; the outboxes of
replies and webhooks are ``RunQueue.replies`` (``actors.run_replies``). The Lua scripts are
in ``actors._run_scripts``; the records read back, and the entries a worker reads, in
``actors.run_records``.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import redis.asyncio as aioredis

from actors import _run_scripts as scripts
from actors.key import ThreadKey
from actors.redis_store import redis_outages
from actors.run_records import QueuedRun, RunRecord
from actors.run_replies import RunReplies
from actors.run_streams import GROUP, LeasedStreams, LeaseLost, RunKeys, read_record, text
from stickyray.config import RunsConfig
from stickyray.errors import InvalidThreadKey, MessageIdReused, RunQueueFull
from stickyray.turns import SORRY_REPLY, InboundMessage, TurnResult
from stickyray.webhooks import WEBHOOK_CHANNEL

__all__ = [
    "LeaseLost",
    "RunQueue",
]

log = logging.getLogger(__name__)


def _position(entry: str) -> int:
    """A run's place in its thread's open index, from its stream entry id, as a release
    that kept no ``position`` in the record gave it."""
    ms, seq = entry.split("-")
    return int(ms) * 1000 + min(int(seq), 999)


class RunQueue:
    """The run queue of one Serve application (``app``), on one Redis client."""

    def __init__(self, client: aioredis.Redis, app: str, config: RunsConfig) -> None:
        self._client = client
        self._config = config
        self.keys = RunKeys.of(app)
        self._streams = LeasedStreams(client, self.keys)
        self.replies = RunReplies(client, self.keys, self._streams)
        self._submit = client.register_script(scripts.SUBMIT)
        self._start = client.register_script(scripts.START)
        self._finish = client.register_script(scripts.FINISH)
        self._acquire = client.register_script(scripts.ACQUIRE)
        self._renew = client.register_script(scripts.RENEW)
        self._release = client.register_script(scripts.RELEASE)
        self._cancel = client.register_script(scripts.CANCEL)

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
                    self.keys.queue,
                    self.keys.record(key, message.message_id),
                    self.keys.open(key),
                    self.keys.last_position,
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
        if text(status) == "full":
            raise RunQueueFull(int(fields), self._config.max_queued)
        if text(status) == "exists":
            named = {text(k): text(v) for k, v in zip(fields[::2], fields[1::2], strict=True)}
            stored = named.get("fingerprint")
            # None: queued by a release before fingerprints, taken as the same message.
            if stored and stored != message.fingerprint:
                raise MessageIdReused(str(key), message.message_id)
        return read_record(key, message.message_id, fields), text(status) == "queued"

    async def get(self, key: ThreadKey, message_id: str) -> RunRecord | None:
        """The run of ``key`` with ``message_id``; None if never queued, or long finished."""
        with redis_outages():
            fields = await self._client.hgetall(self.keys.record(key, message_id))
        return read_record(key, message_id, fields) if fields else None

    async def cancel(self, key: ThreadKey, message_id: str) -> tuple[RunRecord | None, bool]:
        """Take a queued run off the queue: its record, and whether this call cancelled it.

        Only a run that has not started: a turn in progress cannot be stopped halfway. A run
        cancelled before is returned as it is (False), as is one that started or finished;
        None if there is no such run. The cancelled record expires ``result_ttl_s`` later.
        """
        with redis_outages():
            outcome, fields = await self._cancel(
                keys=[self.keys.queue, self.keys.record(key, message_id), self.keys.open(key)],
                args=[time.time(), self._config.result_ttl_s, message_id],
            )
        if text(outcome) == "missing":
            return None, False
        return read_record(key, message_id, fields), text(outcome) == "cancelled"

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
                    self.keys.record(key, after), ["position", "entry"]
                )
                if position is None and entry is None:
                    return None
                # Queued by a release that kept no position: the one it was listed by.
                start = f"({text(position) if position is not None else _position(text(entry))}"
            while True:
                index = self.keys.open(key)
                page = await self._client.zrangebyscore(index, start, "+inf", start=0, num=limit)
                mids = [text(m) for m in page]
                async with self._client.pipeline(transaction=False) as pipe:
                    for mid in mids:
                        pipe.hgetall(self.keys.record(key, mid))
                    found = await pipe.execute()
                pairs = zip(mids, found, strict=True)
                records = [read_record(key, m, f) if f else None for m, f in pairs]
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
            await self._client.set(self.keys.sends_webhooks, "1")

    async def takes_webhooks(self) -> bool:
        """Whether a run worker of a release that sends webhooks has held the lease."""
        with redis_outages():
            return bool(await self._client.exists(self.keys.sends_webhooks))

    async def depth(self) -> int:
        """Runs waiting or running."""
        with redis_outages():
            return int(await self._client.xlen(self.keys.queue))

    async def acquire(self, token: str, ttl_s: float) -> bool:
        """Take the lease that lets one worker read the queue, unless another holds it."""
        with redis_outages():
            ms = int(ttl_s * 1000)
            return bool(await self._acquire(keys=[self.keys.lease], args=[token, ms]))

    async def renew(self, token: str, ttl_s: float) -> bool:
        """Extend the lease; False if ``token`` no longer holds it (it expired)."""
        with redis_outages():
            return bool(await self._renew(keys=[self.keys.lease], args=[token, int(ttl_s * 1000)]))

    async def release(self, token: str) -> None:
        """Give the lease up, if ``token`` holds it, so the next worker need not wait."""
        with redis_outages():
            await self._release(keys=[self.keys.lease], args=[token])

    async def join(self) -> None:
        """Create the consumer groups of the queue and the outboxes if missing (idempotent)."""
        await self._streams.join()

    async def last_read(self) -> str:
        """The id of the newest run a worker has read (``0-0`` for none)."""
        return await self._streams.last_read(self.keys.queue)

    async def wait(self, after: str, block_ms: int) -> None:
        """Return once a run newer than ``after`` is queued, or after ``block_ms``."""
        await self._streams.wait(self.keys.queue, after, block_ms)

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
        stream = self.keys.queue
        entries, last, delivered = await self._streams.read(stream, token, count, after, seen)
        runs: list[QueuedRun] = []
        for entry, fields in entries:
            run = await self._parse(token, entry, fields)
            if run is not None:
                runs.append(run)
        return runs, last, delivered

    async def _parse(self, token: str, entry: str, data: dict[str, Any]) -> QueuedRun | None:
        """The run in a stream entry; None, with the entry gone, if it cannot be read."""
        try:
            key = ThreadKey(*text(data["thread"]).split("/", 1))
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
            key = ThreadKey(*text(data["thread"]).split("/", 1))
            message_id = json.loads(data["message"])["message_id"]
            if not isinstance(message_id, str) or not message_id:
                raise ValueError("no message id")
        except (KeyError, TypeError, ValueError, InvalidThreadKey):
            with redis_outages():  # an entry deleted while pending, or one naming no run
                await self._client.xack(self.keys.queue, GROUP, entry)
                await self._client.xdel(self.keys.queue, entry)
            return None
        unreadable = QueuedRun(entry, key, InboundMessage(text="", message_id=message_id))
        await self.finish(token, unreadable, error=reason)
        return None

    async def _leased(
        self, script: Any, token: str, run: QueuedRun, *args: Any, outbox: str | None = None
    ) -> str:
        record = self.keys.record(run.key, run.message.message_id)
        box = outbox or self.keys.outbox
        with redis_outages():
            status, *_ = await script(
                keys=[self.keys.lease, self.keys.queue, record, box, self.keys.open(run.key)],
                args=[token, run.entry, *args],
            )
        if text(status) == "lost":
            raise LeaseLost(token)
        return text(status)

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
            outbox=self.keys.webhook_outbox if webhook else self.keys.outbox,
        )
        return status == "finished"
