"""The thread store in Redis: every write is one Lua script, so it is atomic and fenced.

Keys of one thread share a hash tag (``stickyray:{tenant/thread}:...``), so they live in one
slot of a Redis Cluster and every script declares all the keys it touches:

- ``epoch``       incarnation counter (INCR on open), started from Redis's clock
- ``checkpoint``  hash: version, turn, data (Checkpoint JSON); ``opened``: the token and epoch
                  of the last open, so an open sent again (its answer lost) is not a new one
- ``pending``     hash: seq, message, attempts; the accepted turn not yet stored
- ``turns``       hash: turn number -> TurnResult JSON (the history)
- ``msgs``        hash: message id -> seq, or the TurnResult JSON once stored (a turn's or a
                  state-changing command's)
- ``msgidx``      zset: message id scored by acceptance time, to expire ``msgs`` entries
- ``msgfp``       hash: message id -> "<acceptance time> <fingerprint>" of the message it
                  came with, so an id sent again with a different message is refused. It
                  counts only while ``msgidx`` holds the id at that time: a release before
                  fingerprints neither writes nor deletes it, and its writes (an id accepted
                  again after a reset or its expiry) leave a stale one, taken as none: the
                  same message, as that release took it
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Collection, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import (
    ClusterDownError,
    MasterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from actors.key import ThreadKey
from actors.store import Checkpoint, Incarnation, PendingTurn
from stickyray.errors import (
    CheckpointConflict,
    MessageIdReused,
    StoreUnavailable,
    ThreadFenced,
    TurnPending,
)
from stickyray.turns import InboundMessage, TurnResult

__all__ = ["RedisThreadStore", "connect_redis", "redis_outages"]

_PARTS = ("epoch", "checkpoint", "pending", "turns", "msgs", "msgidx", "msgfp")


# Every write (opening included) gives all the thread's keys the same expiry, ARGV[t], so they
# go together: a checkpoint outliving its epoch would restart the epoch at 1 and let a stale
# incarnation's writes through, and a message accepted just before its checkpoint expired
# would be run again without the state it was accepted on.
def _expire_all(t: int) -> str:
    return f"""
for i = 1, 7 do redis.call('EXPIRE', KEYS[i], ARGV[{t}]) end
"""


# KEYS: the seven keys above. ARGV[1]: ttl, ARGV[2]: '1' to count an attempt of a pending turn,
# ARGV[3]: the open's token. An epoch key that is missing (a new thread, or one whose keys
# expired while an old incarnation may still hold it open) starts from Redis's clock, in
# seconds times a million: an epoch is then the time its thread's state began and how many
# opens it has had since. It is never handed out twice: the keys expire at least an hour
# (checkpoint_ttl_s) after the last open, so a new start is past every epoch of the state
# before, unless that one had a million opens a second. (Under 2^53 until the year 2255:
# exact as a Lua number.) The same token as the last open's, with the epoch it took still
# current, is that open sent again by the client after its answer was lost: it takes no new
# epoch and counts no attempt.
_OPEN = (
    """
local epoch = redis.call('GET', KEYS[1])
if not (epoch and redis.call('HGET', KEYS[2], 'opened') == ARGV[3] .. ' ' .. epoch) then
  if not epoch then
    redis.call('SET', KEYS[1], redis.call('TIME')[1] .. '000000')
  end
  redis.call('INCR', KEYS[1])
  epoch = redis.call('GET', KEYS[1])
  redis.call('HSET', KEYS[2], 'opened', ARGV[3] .. ' ' .. epoch)
  if redis.call('EXISTS', KEYS[3]) == 1 and ARGV[2] == '1' then
    redis.call('HINCRBY', KEYS[3], 'attempts', 1)
  end
end
"""
    + _expire_all(1)
    + """
return {epoch, redis.call('HGET', KEYS[2], 'data') or false,
        redis.call('HMGET', KEYS[3], 'seq', 'message', 'attempts')}
"""
)

# Every write starts here: ARGV[1] is the writer's epoch, refused unless it is current.
_FENCE = """
if tonumber(redis.call('GET', KEYS[1]) or '0') ~= tonumber(ARGV[1]) then
  return {'fenced'}
end
"""

# And a checkpoint write goes on here: ARGV[2] is the new version, which must follow the stored one.
_CAS = """
local found = tonumber(redis.call('HGET', KEYS[2], 'version') or '0')
if found ~= tonumber(ARGV[2]) - 1 then
  return {'conflict', found}
end
"""


# A message id answered (or accepted) before is not answered again: the stored value stands,
# unless the id came with another message. ARGV[n] is the message id ('' = none), ARGV[f]
# the new message's fingerprint ('' = unknown).
def _seen(n: int, f: int) -> str:
    return f"""
if ARGV[{n}] ~= '' then
  local seen = redis.call('HGET', KEYS[5], ARGV[{n}])
  if seen then
    local stamped = redis.call('HGET', KEYS[7], ARGV[{n}])
    if stamped and ARGV[{f}] ~= '' then
      local at, fingerprint = string.match(stamped, '^(%S+) (%x+)$')
      local score = redis.call('ZSCORE', KEYS[6], ARGV[{n}])
      if fingerprint and score and tonumber(score) == tonumber(at)
         and fingerprint ~= ARGV[{f}] then
        return {{'reused'}}
      end
    end
    return {{'seen', seen}}
  end
end
"""


# The fingerprint ARGV[f] of message id ARGV[n], stamped with its acceptance time ARGV[t].
def _stamp(n: int, t: int, f: int) -> str:
    return f"""
if ARGV[{f}] ~= '' then
  redis.call('HSET', KEYS[7], ARGV[{n}], ARGV[{t}] .. ' ' .. ARGV[{f}])
end
"""


# ARGV: epoch, message id, message JSON, now, message-id ttl, ttl, fingerprint.
_ACCEPT = (
    _FENCE
    + """
local expired = redis.call('ZRANGEBYSCORE', KEYS[6], '-inf', ARGV[4] - ARGV[5], 'LIMIT', 0, 100)
if #expired > 0 then
  redis.call('HDEL', KEYS[5], unpack(expired))
  redis.call('HDEL', KEYS[7], unpack(expired))
  redis.call('ZREM', KEYS[6], unpack(expired))
end
"""
    + _seen(2, 7)
    + """
if redis.call('EXISTS', KEYS[3]) == 1 then
  return {'busy', redis.call('HGET', KEYS[3], 'seq')}
end
local seq = tonumber(redis.call('HGET', KEYS[2], 'turn') or '0') + 1
redis.call('HSET', KEYS[3], 'seq', seq, 'message', ARGV[3], 'attempts', 1)
redis.call('HSET', KEYS[5], ARGV[2], seq)
redis.call('ZADD', KEYS[6], ARGV[4], ARGV[2])
"""
    + _stamp(2, 4, 7)
    + _expire_all(6)
    + """
return {'accepted', seq}
"""
)


# ARGV: epoch, new version, turn, checkpoint JSON, ttl, message id ('' = none), result JSON,
# kind ('turn' or 'command'), now, a command's fingerprint. A turn's result resolves the
# pending turn and joins the history; a command's is only remembered under its message id.
_COMMIT = (
    _FENCE
    + """
if ARGV[8] == 'command' then
"""
    + _seen(6, 10)
    + """
end
"""
    + _CAS
    + """
redis.call('HSET', KEYS[2], 'version', ARGV[2], 'turn', ARGV[3], 'data', ARGV[4])
if ARGV[6] ~= '' then
  redis.call('HSET', KEYS[5], ARGV[6], ARGV[7])
  if ARGV[8] == 'command' then
    redis.call('ZADD', KEYS[6], ARGV[9], ARGV[6])
"""
    + _stamp(6, 9, 10)
    + """
  else
    redis.call('HSET', KEYS[4], ARGV[3], ARGV[7])
    redis.call('DEL', KEYS[3])
  end
end
"""
    + _expire_all(5)
    + """
return {'ok'}
"""
)

# ARGV: epoch, new version, checkpoint JSON, ttl, message id ('' = none), result JSON, now,
# fingerprint, then the fingerprints to keep. The reset forgets every message id but its own
# and those answered (not pending) whose current fingerprint is one to keep: the commands'.
_RESET = (
    _FENCE
    + _seen(5, 8)
    + _CAS
    + """
local kept = {}
if #ARGV > 8 then
  local keep = {}
  for i = 9, #ARGV do keep[ARGV[i]] = true end
  local stamps = redis.call('HGETALL', KEYS[7])
  for i = 1, #stamps, 2 do
    local at, fingerprint = string.match(stamps[i + 1], '^(%S+) (%x+)$')
    if fingerprint and keep[fingerprint] then
      local score = redis.call('ZSCORE', KEYS[6], stamps[i])
      local seen = redis.call('HGET', KEYS[5], stamps[i])
      if score and tonumber(score) == tonumber(at) and seen and string.sub(seen, 1, 1) == '{' then
        table.insert(kept, {stamps[i], seen, score, stamps[i + 1]})
      end
    end
  end
end
redis.call('DEL', KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7])
redis.call('HSET', KEYS[2], 'version', ARGV[2], 'turn', 0, 'data', ARGV[3])
for _, id in ipairs(kept) do
  redis.call('HSET', KEYS[5], id[1], id[2])
  redis.call('ZADD', KEYS[6], id[3], id[1])
  redis.call('HSET', KEYS[7], id[1], id[4])
end
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[5], ARGV[5], ARGV[6])
  redis.call('ZADD', KEYS[6], ARGV[7], ARGV[5])
"""
    + _stamp(5, 7, 8)
    + """
end
"""
    + _expire_all(4)
    + """
return {'ok'}
"""
)

_REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, OSError)
# Redis refusing writes for now: loading, out of memory, a replica after a failover, a
# script running too long. redis-py raises some as their own classes; inside a script they
# come back as a ResponseError carrying the code ("... -OOM command not allowed ...").
_REFUSING = (OutOfMemoryError, ReadOnlyError, MasterDownError, TryAgainError, ClusterDownError)
_REFUSING_CODES = (
    "LOADING",
    "MISCONF",
    "OOM",
    "READONLY",
    "MASTERDOWN",
    "CLUSTERDOWN",
    "TRYAGAIN",
    "BUSY",
)


def _refusing(exc: ResponseError) -> bool:
    text = str(exc)
    return isinstance(exc, _REFUSING) or any(
        text.startswith(code) or f"-{code} " in text for code in _REFUSING_CODES
    )


@contextmanager
def redis_outages() -> Iterator[None]:
    """Redis down or refusing for now is StoreUnavailable (a 503 to retry), reads included."""
    try:
        yield
    except _REDIS_DOWN as exc:
        raise StoreUnavailable("redis", str(exc)) from exc
    except ResponseError as exc:
        if _refusing(exc):  # an outage to retry, not a bug in the request
            raise StoreUnavailable("redis", str(exc)) from exc
        raise


# Connections per process (thread actor, host, ingress replica).
MAX_REDIS_CONNECTIONS = 64


def connect_redis(url: str) -> aioredis.Redis:
    """An asyncio Redis client for ``url`` (redis://, rediss:// or unix://).

    Retries are short: a dropped connection is re-dialled at once, but an outage must turn
    into a quick 503, not a request that hangs through seconds of backoff.
    """
    # A blocking pool: a burst of turns (many threads opening at once in one host) waits for
    # a connection instead of failing with MaxConnectionsError, which would be a false 503.
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_REDIS_CONNECTIONS,
        timeout=5.0,
        socket_connect_timeout=2.0,
        socket_timeout=5.0,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), retries=2),
    )
    return aioredis.Redis.from_pool(pool)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _stored(key: ThreadKey, value: Any) -> TurnResult:
    """A message id's stored value: its result, or the number of its turn still pending."""
    if _text(value).startswith("{"):
        return TurnResult.model_validate_json(value)
    raise TurnPending(str(key), int(_text(value)))


class RedisThreadStore:
    """ThreadStore and ThreadView on one Redis client."""

    def __init__(
        self,
        client: aioredis.Redis,
        ttl_s: int = 30 * 24 * 3600,
        message_id_ttl_s: int = 24 * 3600,
    ) -> None:
        self._client = client
        self._ttl_s = ttl_s
        self._message_id_ttl_s = message_id_ttl_s
        self._open = client.register_script(_OPEN)
        self._accept = client.register_script(_ACCEPT)
        self._commit = client.register_script(_COMMIT)
        self._reset = client.register_script(_RESET)

    @classmethod
    @asynccontextmanager
    async def from_url(cls, url: str, **options: int) -> AsyncIterator[RedisThreadStore]:
        """A store on a new client for ``url``, closed on exit."""
        client = connect_redis(url)
        try:
            yield cls(client, **options)
        finally:
            await client.aclose()

    async def setup(self) -> None:
        """Nothing to migrate in Redis; checks the connection so start-up fails early."""
        await self.ping()

    @staticmethod
    def _keys(key: ThreadKey) -> list[str]:
        return [key.redis_key(part) for part in _PARTS]

    async def _run(self, script: Any, key: ThreadKey, *args: Any) -> list[Any]:
        with redis_outages():
            result: list[Any] = await script(keys=self._keys(key), args=list(args))
        return result

    async def open(
        self, key: ThreadKey, count_attempt: bool = True, token: str | None = None
    ) -> Incarnation:
        epoch, data, (seq, message, attempts) = await self._run(
            self._open,
            key,
            self._ttl_s,
            "1" if count_attempt else "0",
            token or uuid.uuid4().hex,
        )
        checkpoint = Checkpoint.model_validate_json(data) if data else Checkpoint()
        pending = None
        if seq is not None:
            pending = PendingTurn.model_validate(
                {"seq": int(seq), "message": message, "attempts": int(attempts)}
            )
        return Incarnation(epoch=int(epoch), checkpoint=checkpoint, pending=pending)

    async def accept(self, key: ThreadKey, epoch: int, message: InboundMessage) -> int | TurnResult:
        status, *rest = await self._run(
            self._accept,
            key,
            epoch,
            message.message_id,
            message.model_dump_json(),
            time.time(),
            self._message_id_ttl_s,
            self._ttl_s,
            message.fingerprint,
        )
        status = _text(status)
        if status == "fenced":
            raise ThreadFenced(str(key), epoch)
        if status == "reused":
            raise MessageIdReused(str(key), message.message_id)
        if status == "accepted":
            return int(rest[0])
        if status == "seen":
            return _stored(key, rest[0])
        raise TurnPending(str(key), int(_text(rest[0])))

    async def commit(
        self,
        key: ThreadKey,
        epoch: int,
        checkpoint: Checkpoint,
        result: TurnResult | None,
        fingerprint: str = "",
    ) -> TurnResult | None:
        command = result is not None and result.command is not None
        status, *rest = await self._run(
            self._commit,
            key,
            epoch,
            checkpoint.version,
            checkpoint.turn,
            checkpoint.model_dump_json(),
            self._ttl_s,
            result.message_id if result is not None else "",
            result.model_dump_json(by_alias=True) if result is not None else "",
            "command" if command else "turn",
            time.time(),
            fingerprint,
        )
        return self._check(_text(status), rest, key, epoch, checkpoint, result)

    async def reset(
        self,
        key: ThreadKey,
        epoch: int,
        checkpoint: Checkpoint,
        result: TurnResult | None = None,
        fingerprint: str = "",
        keep: Collection[str] = (),
    ) -> TurnResult | None:
        status, *rest = await self._run(
            self._reset,
            key,
            epoch,
            checkpoint.version,
            checkpoint.model_dump_json(),
            self._ttl_s,
            result.message_id if result is not None else "",
            result.model_dump_json(by_alias=True) if result is not None else "",
            time.time(),
            fingerprint,
            *sorted(keep),
        )
        return self._check(_text(status), rest, key, epoch, checkpoint, result)

    @staticmethod
    def _check(
        status: str,
        rest: list[Any],
        key: ThreadKey,
        epoch: int,
        checkpoint: Checkpoint,
        result: TurnResult | None,
    ) -> TurnResult | None:
        if status == "fenced":
            raise ThreadFenced(str(key), epoch)
        if status == "reused" and result is not None:
            raise MessageIdReused(str(key), result.message_id)
        if status == "conflict":
            raise CheckpointConflict(str(key), checkpoint.version - 1, int(rest[0]))
        if status == "seen":
            return _stored(key, rest[0])
        return None

    async def load(self, key: ThreadKey) -> Checkpoint | None:
        with redis_outages():
            raw = await self._client.hget(key.redis_key("checkpoint"), "data")
        return Checkpoint.model_validate_json(raw) if raw else None

    async def turns(self, key: ThreadKey, after: int = 0, limit: int = 100) -> list[TurnResult]:
        # Turn numbers have no gaps, so a page is a plain HMGET of the next numbers.
        fields = [str(n) for n in range(after + 1, after + 1 + limit)]
        if not fields:
            return []
        with redis_outages():
            raw = await self._client.hmget(key.redis_key("turns"), fields)
        return [TurnResult.model_validate_json(item) for item in raw if item is not None]

    async def ping(self) -> None:
        with redis_outages():
            await self._client.ping()
