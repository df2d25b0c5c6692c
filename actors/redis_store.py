"""The thread store in Redis: every write is one Lua script, so it is atomic and fenced.

Keys of one thread share a hash tag (``stickyray:{tenant/thread}:...``), so they live in one
slot of a Redis Cluster and every script (``actors._thread_scripts``) declares all the
keys it touches:

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

from actors import _thread_scripts as scripts
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
        self._open = client.register_script(scripts.OPEN)
        self._accept = client.register_script(scripts.ACCEPT)
        self._commit = client.register_script(scripts.COMMIT)
        self._reset = client.register_script(scripts.RESET)

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
        return [key.redis_key(part) for part in scripts.PARTS]

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
