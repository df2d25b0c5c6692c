"""Thread checkpoints: the Protocol, the Redis store and the in-memory store.

A checkpoint write is a compare-and-set on the version: a thread's state can only move from
version N to N+1, so two writers can never fork it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Protocol, runtime_checkable

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from actors.key import ThreadKey
from memory.buffer import BufferEntry
from stickyray.errors import CheckpointConflict, StoreUnavailable

__all__ = [
    "Checkpoint",
    "CheckpointStore",
    "InMemoryCheckpointStore",
    "RedisCheckpointStore",
]

DEFAULT_TTL_S = 30 * 24 * 3600


class Checkpoint(BaseModel):
    """Everything a thread actor needs to resume a conversation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    active_agent: str | None = None
    buffer: list[BufferEntry] = Field(default_factory=list)
    turn: int = 0
    version: int = 0
    updated_at: float = 0.0


@runtime_checkable
class CheckpointStore(Protocol):
    """Where thread actors keep their state between incarnations."""

    async def load(self, key: ThreadKey) -> Checkpoint | None:
        """The latest checkpoint, or None for a thread never saved."""
        ...

    async def save(self, key: ThreadKey, checkpoint: Checkpoint) -> None:
        """Store ``checkpoint`` if the stored version is ``checkpoint.version - 1``.

        Raises CheckpointConflict otherwise.
        """
        ...

    async def delete(self, key: ThreadKey) -> None:
        """Forget the thread."""
        ...

    async def ping(self) -> None:
        """Raise StoreUnavailable when the store cannot be reached."""
        ...


class InMemoryCheckpointStore:
    """A CheckpointStore in a dict: for unit tests and single-process use."""

    def __init__(self) -> None:
        self._data: dict[ThreadKey, Checkpoint] = {}

    async def load(self, key: ThreadKey) -> Checkpoint | None:
        return self._data.get(key)

    async def save(self, key: ThreadKey, checkpoint: Checkpoint) -> None:
        current = self._data.get(key)
        found = current.version if current else 0
        if found != checkpoint.version - 1:
            raise CheckpointConflict(str(key), checkpoint.version - 1, found)
        self._data[key] = checkpoint

    async def delete(self, key: ThreadKey) -> None:
        self._data.pop(key, None)

    async def ping(self) -> None:
        return None


# KEYS[1] checkpoint hash; ARGV: new version, payload, ttl seconds (0 = none).
# Returns -1 when written, else the version found (the write lost the race).
_CAS_SCRIPT = """
local found = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if found ~= tonumber(ARGV[1]) - 1 then
  return found
end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'data', ARGV[2])
local ttl = tonumber(ARGV[3])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
end
return -1
"""

_REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, OSError)


class RedisCheckpointStore:
    """A CheckpointStore in Redis, one hash per thread, written by an atomic Lua CAS."""

    def __init__(self, client: aioredis.Redis, ttl_s: int = DEFAULT_TTL_S) -> None:
        self._client = client
        self._ttl_s = ttl_s
        self._cas = client.register_script(_CAS_SCRIPT)

    @classmethod
    @asynccontextmanager
    async def from_url(
        cls, url: str, ttl_s: int = DEFAULT_TTL_S
    ) -> AsyncIterator[RedisCheckpointStore]:
        """A store on a new client for ``url``, closed on exit."""
        client = connect_redis(url)
        try:
            yield cls(client, ttl_s=ttl_s)
        finally:
            await client.aclose()

    async def setup(self) -> None:
        """Nothing to migrate in Redis; checks the connection so start-up fails early."""
        await self.ping()

    @staticmethod
    def _key(key: ThreadKey) -> str:
        return key.redis_key("checkpoint")

    async def load(self, key: ThreadKey) -> Checkpoint | None:
        try:
            raw = await self._client.hget(self._key(key), "data")
        except _REDIS_DOWN as exc:
            raise StoreUnavailable("redis", str(exc)) from exc
        if raw is None:
            return None
        return Checkpoint.model_validate_json(raw)

    async def save(self, key: ThreadKey, checkpoint: Checkpoint) -> None:
        stamped = checkpoint.model_copy(update={"updated_at": time.time()})
        try:
            found = await self._cas(
                keys=[self._key(key)],
                args=[checkpoint.version, stamped.model_dump_json(), self._ttl_s],
            )
        except _REDIS_DOWN as exc:
            raise StoreUnavailable("redis", str(exc)) from exc
        if int(found) != -1:
            raise CheckpointConflict(str(key), checkpoint.version - 1, int(found))

    async def delete(self, key: ThreadKey) -> None:
        try:
            await self._client.delete(self._key(key))
        except _REDIS_DOWN as exc:
            raise StoreUnavailable("redis", str(exc)) from exc

    async def ping(self) -> None:
        try:
            await self._client.ping()
        except _REDIS_DOWN as exc:
            raise StoreUnavailable("redis", str(exc)) from exc


def connect_redis(url: str) -> aioredis.Redis:
    """An asyncio Redis client for ``url`` (redis://, rediss:// or unix://)."""
    return aioredis.from_url(
        url, socket_connect_timeout=2.0, socket_timeout=5.0, health_check_interval=30
    )
