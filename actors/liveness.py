"""Which thread actors are live on a node, least recently used first (a Redis sorted set).

A new thread actor registers before it counts as alive; if the node is over its cap, the
registration atomically claims the least recently used threads for passivation, so two
actors starting at once never pick the same victim or leave the node over the cap.
"""

from __future__ import annotations

import time
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from stickyray.errors import StoreUnavailable

__all__ = ["LiveThreads"]

# KEYS[1]: the node's set. ARGV: now, member, cap. Returns the members to passivate.
_ACTIVATE = """
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
local excess = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[3])
if excess <= 0 then
  return {}
end
local victims = {}
for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, excess)) do
  if member ~= ARGV[2] and #victims < excess then
    table.insert(victims, member)
  end
end
if #victims > 0 then
  redis.call('ZREM', KEYS[1], unpack(victims))
end
return victims
"""


class LiveThreads:
    """The live thread actors of one node, scored by last activity."""

    # Refresh a thread's score at most this often: LRU order at one-second grain is plenty
    # and keeps a write off most turns.
    TOUCH_EVERY_S = 1.0

    def __init__(self, client: aioredis.Redis, node_id: str, cap: int) -> None:
        self._client = client
        self._key = f"stickyray:live:{node_id}"
        self._cap = cap
        self._activate = client.register_script(_ACTIVATE)
        self._touched: dict[str, float] = {}

    async def activate(self, name: str) -> list[str]:
        """Register ``name``; return the names that must passivate to keep the node at its cap."""
        try:
            victims: list[Any] = await self._activate(
                keys=[self._key], args=[time.time(), name, self._cap]
            )
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise StoreUnavailable("redis", str(exc)) from exc
        self._touched[name] = time.monotonic()
        return [v.decode() if isinstance(v, bytes) else str(v) for v in victims]

    async def touch(self, name: str) -> None:
        """Mark ``name`` as just used (only if it is still registered)."""
        now = time.monotonic()
        if now - self._touched.get(name, 0.0) < self.TOUCH_EVERY_S:
            return
        self._touched[name] = now
        await self._client.zadd(self._key, {name: time.time()}, xx=True)

    async def remove(self, name: str) -> None:
        """Unregister ``name``."""
        self._touched.pop(name, None)
        await self._client.zrem(self._key, name)
