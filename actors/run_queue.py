"""The run queue in Redis: messages accepted now and answered later, in order per thread.

A run is one message of a thread, identified by the thread and its message id. Submitting
it records it and appends it to its partition's stream in one Lua script, so a run is
queued exactly once however often its submission is retried. A partition is chosen by a
hash of the thread, so a thread's runs stay in one stream, in the order they came.

Keys of one partition share a hash tag (``stickyray:{runs/<app>/<p>}:...``), so they live in
one slot of a Redis Cluster:

- ``queue``  stream, one entry per run not yet finished (thread key, message JSON), with
  one consumer group (``workers``) and one consumer in it: the partition's run worker. An
  entry it read and did not acknowledge (it died) is read again by its next incarnation.
- ``run:<tenant>/<thread>/<message id>``  hash: status (queued, running, completed,
  failed), created_at, started_at, finished_at, attempts, result (the TurnResult JSON),
  error. Finishing a run writes it, acknowledges and deletes the entry in one script; the
  record then expires after ``runs.result_ttl_s``.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict
from redis.exceptions import ResponseError

from actors.key import ThreadKey
from actors.redis_store import redis_outages
from stickyray.config import MAX_PARTITIONS, RunsConfig
from stickyray.errors import RunQueueFull
from stickyray.turns import InboundMessage, TurnResult

__all__ = ["GROUP", "QueuedRun", "RunQueue", "RunRecord", "RunStatus"]

GROUP = "workers"
_CONSUMER = "worker"  # one per partition: its worker, under the same name in every incarnation

RunStatus = Literal["queued", "running", "completed", "failed"]

# KEYS: queue, record. ARGV: thread key, message id, message JSON, now, cap, ttl.
_SUBMIT = """
if redis.call('EXISTS', KEYS[2]) == 1 then
  return {'exists'}
end
local queued = redis.call('XLEN', KEYS[1])
if queued >= tonumber(ARGV[5]) then
  return {'full', queued}
end
local entry = redis.call('XADD', KEYS[1], '*', 'thread', ARGV[1], 'message', ARGV[3])
redis.call('HSET', KEYS[2], 'thread', ARGV[1], 'message_id', ARGV[2], 'status', 'queued',
           'created_at', ARGV[4], 'attempts', 0)
redis.call('EXPIRE', KEYS[2], ARGV[6])
return {'queued', entry}
"""

# KEYS: record. ARGV: thread key, message id, now, ttl. A record that expired while its run
# waited (a queue stalled past the ttl) is written again, with the time the run started.
_START = """
redis.call('HSETNX', KEYS[1], 'created_at', ARGV[3])
redis.call('HSET', KEYS[1], 'thread', ARGV[1], 'message_id', ARGV[2], 'status', 'running',
           'started_at', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('EXPIRE', KEYS[1], ARGV[4])
"""

# KEYS: queue, record. ARGV: entry id, status, now, result JSON or '', error or '', ttl,
# thread key, message id.
_FINISH = """
redis.call('HSET', KEYS[2], 'thread', ARGV[7], 'message_id', ARGV[8], 'status', ARGV[2],
           'finished_at', ARGV[3])
redis.call('HSETNX', KEYS[2], 'created_at', ARGV[3])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[2], 'result', ARGV[4]) end
if ARGV[5] ~= '' then redis.call('HSET', KEYS[2], 'error', ARGV[5]) end
redis.call('EXPIRE', KEYS[2], ARGV[6])
redis.call('XACK', KEYS[1], 'workers', ARGV[1])
redis.call('XDEL', KEYS[1], ARGV[1])
return 1
"""


class RunRecord(BaseModel):
    """A queued run as GET /v1/threads/{thread_id}/runs/{message_id} shows it.

    ``result`` is the turn (or command) once the run finished, as POST .../messages would
    have returned it; ``status`` is then that turn's. ``error`` without a result: the
    message could not be delivered to its thread (not an outage: those are retried).
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


@dataclass(frozen=True)
class QueuedRun:
    """One stream entry: a run to deliver."""

    entry: str
    key: ThreadKey
    message: InboundMessage


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _parse_key(text: str) -> ThreadKey:
    tenant, thread_id = text.split("/", 1)
    return ThreadKey(tenant, thread_id)


class RunQueue:
    """The run queue of one Serve application (``app``), on one Redis client."""

    def __init__(self, client: aioredis.Redis, app: str, config: RunsConfig) -> None:
        self._client = client
        self._app = app
        self._config = config
        self._submit = client.register_script(_SUBMIT)
        self._start = client.register_script(_START)
        self._finish = client.register_script(_FINISH)

    @property
    def partitions(self) -> int:
        """How many partitions (and run workers) the queue has."""
        return self._config.partitions

    def partition(self, key: ThreadKey) -> int:
        """The partition of a thread's runs (a stable hash, the same in every process)."""
        return zlib.crc32(str(key).encode()) % self._config.partitions

    def _prefix(self, partition: int) -> str:
        return f"stickyray:{{runs/{self._app}/{partition}}}"

    def _queue(self, partition: int) -> str:
        return f"{self._prefix(partition)}:queue"

    def _record(self, key: ThreadKey, message_id: str) -> str:
        return f"{self._prefix(self.partition(key))}:run:{key}/{message_id}"

    async def submit(self, key: ThreadKey, message: InboundMessage) -> tuple[RunRecord, bool]:
        """Queue ``message`` for ``key``; the run's record, and whether this call queued it.

        A message id already queued (or run) returns that run, unchanged. Raises
        RunQueueFull when the thread's partition holds ``partition_cap()`` runs.
        """
        partition = self.partition(key)
        with redis_outages():
            status, *rest = await self._submit(
                keys=[self._queue(partition), self._record(key, message.message_id)],
                args=[
                    str(key),
                    message.message_id,
                    message.model_dump_json(),
                    time.time(),
                    self._config.partition_cap(),
                    self._config.result_ttl_s,
                ],
            )
        status = _text(status)
        if status == "full":
            raise RunQueueFull(partition, int(rest[0]), self._config.partition_cap())
        record = await self.get(key, message.message_id)
        if record is None:  # finished and expired between the two reads: queue it again
            return await self.submit(key, message)
        return record, status == "queued"

    async def get(self, key: ThreadKey, message_id: str) -> RunRecord | None:
        """The run of ``key`` with ``message_id``; None if never queued, or long expired."""
        with redis_outages():
            raw = await self._client.hgetall(self._record(key, message_id))
        if not raw:
            return None
        fields = {_text(k): _text(v) for k, v in raw.items()}

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
        )

    async def depth(self, partition: int) -> int:
        """Runs waiting or running in ``partition``."""
        with redis_outages():
            return int(await self._client.xlen(self._queue(partition)))

    async def busy_partitions(self) -> list[int]:
        """The partitions holding runs (to start their workers after a restart).

        Every partition a config may have is looked at, not only this config's: runs queued
        under a larger ``runs.partitions`` still get their worker after it was lowered.
        """
        with redis_outages():
            async with self._client.pipeline(transaction=False) as pipe:
                for partition in range(MAX_PARTITIONS):
                    pipe.xlen(self._queue(partition))
                depths = await pipe.execute()
        return [p for p, depth in enumerate(depths) if depth]

    async def join(self, partition: int) -> None:
        """Create the partition's consumer group if it does not exist (idempotent)."""
        with redis_outages():
            try:
                # From id 0: runs queued before the group existed are delivered too.
                queue = self._queue(partition)
                await self._client.xgroup_create(queue, GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def read(
        self, partition: int, count: int, *, after: str | None = None, block_ms: int = 1000
    ) -> tuple[list[QueuedRun], str | None]:
        """Up to ``count`` runs of ``partition``, oldest first, and the last entry id read.

        Without ``after``: runs never read before, waiting up to ``block_ms`` for one. With
        ``after`` (``"0"`` to start): the runs this partition's worker read before and did
        not finish, past that entry id, without waiting; the id is None when none are left.
        """
        queue = self._queue(partition)
        with redis_outages():
            try:
                reply: Any = await self._client.xreadgroup(
                    GROUP,
                    _CONSUMER,
                    {queue: after or ">"},
                    count=count,
                    block=None if after else block_ms,
                )
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self.join(partition)  # the stream was deleted (a flushed Redis)
                return [], None
            runs: list[QueuedRun] = []
            last: str | None = None
            gone: list[str] = []
            for _stream, entries in reply or []:
                for entry, fields in entries:
                    last = _text(entry)
                    if not fields:  # deleted while pending: nothing left to deliver
                        gone.append(last)
                        continue
                    data = {_text(k): v for k, v in fields.items()}
                    runs.append(
                        QueuedRun(
                            entry=last,
                            key=_parse_key(_text(data["thread"])),
                            message=InboundMessage.model_validate_json(data["message"]),
                        )
                    )
            if gone:
                await self._client.xack(queue, GROUP, *gone)
        return runs, last

    async def start(self, run: QueuedRun) -> None:
        """Mark ``run`` running, one more attempt."""
        with redis_outages():
            await self._start(
                keys=[self._record(run.key, run.message.message_id)],
                args=[str(run.key), run.message.message_id, time.time(), self._config.result_ttl_s],
            )

    async def finish(
        self, run: QueuedRun, *, result: TurnResult | None = None, error: str | None = None
    ) -> None:
        """Store ``run``'s outcome and take it off the queue, in one step."""
        status = result.status if result is not None else "failed"
        partition = self.partition(run.key)
        with redis_outages():
            await self._finish(
                keys=[self._queue(partition), self._record(run.key, run.message.message_id)],
                args=[
                    run.entry,
                    status,
                    time.time(),
                    result.model_dump_json(by_alias=True) if result is not None else "",
                    error or "",
                    self._config.result_ttl_s,
                    str(run.key),
                    run.message.message_id,
                ],
            )
