"""Which thread actors are live on a node, least recently used first (a Redis sorted set).

A new thread actor registers before it counts as alive; if the node is over its cap, the
registration atomically claims the least recently used threads for passivation, so two
actors starting at once never pick the same victim or leave the node over the cap.

A member names one incarnation (``thread/<tenant>/<id>#<ray actor id>``), not only the
thread: an actor that crashed leaves its member behind, and by the time that member is
chosen the thread may live again on another node. The victim's incarnation is checked
before anything is passivated, so a leftover costs a slot for a while, never a live thread.
The set expires once no actor on the node has written to it for a while (a node that went
away leaves no set behind).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from actors.redis_store import redis_outages

__all__ = ["Incarnation", "LiveThreads", "live_set_key"]

# KEYS[1]: the node's set. ARGV: now, member, cap, ttl in ms. Returns the members to passivate.
_ACTIVATE = """
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
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


# Actor names cannot contain it (see ``actors.key.ID_PATTERN``); Ray actor ids are hex.
_SEPARATOR = "#"


@dataclass(frozen=True, slots=True)
class Incarnation:
    """One thread actor: its name and the Ray actor id it had when it registered.

    ``actor_id`` is None for a member written by a release that stored names only: whatever
    actor holds that name is the one it counted.
    """

    name: str
    actor_id: str | None

    @property
    def member(self) -> str:
        """How it is stored in the live set."""
        return self.name if self.actor_id is None else f"{self.name}{_SEPARATOR}{self.actor_id}"

    @classmethod
    def parse(cls, member: str | bytes) -> Incarnation:
        """The inverse of ``member``."""
        text = member.decode() if isinstance(member, bytes) else member
        name, separator, actor_id = text.rpartition(_SEPARATOR)
        if not separator:
            return cls(name=text, actor_id=None)
        return cls(name=name, actor_id=actor_id)


def live_set_key(node_id: str) -> str:
    """The Redis key of one node's live set."""
    return f"stickyray:live:{node_id}"


class LiveThreads:
    """The live thread actors of one node, scored by last activity."""

    # Refresh a thread's score at most this often: LRU order at one-second grain is plenty
    # and keeps a write off most turns.
    TOUCH_EVERY_S = 1.0

    def __init__(
        self, client: aioredis.Redis, node_id: str, cap: int, *, idle_timeout_s: float
    ) -> None:
        self._client = client
        self._key = live_set_key(node_id)
        self._cap = cap
        # Every member left by then belongs to an actor that passivated (idle) or died.
        self._ttl_ms = int((2 * idle_timeout_s + 600) * 1000)
        self._activate = client.register_script(_ACTIVATE)
        self._touched: dict[str, float] = {}

    async def activate(self, me: Incarnation) -> list[Incarnation]:
        """Register ``me``; return the incarnations that must go to keep the node at its cap.

        Redis down or refusing writes (out of memory, a replica, loading) is StoreUnavailable,
        here as in ``touch`` and ``remove``.
        """
        with redis_outages():
            victims: list[Any] = await self._activate(
                keys=[self._key], args=[time.time(), me.member, self._cap, self._ttl_ms]
            )
        self._touched[me.member] = time.monotonic()
        return [Incarnation.parse(v) for v in victims]

    async def touch(self, me: Incarnation) -> None:
        """Mark ``me`` as just used (only if it is still registered)."""
        now = time.monotonic()
        if now - self._touched.get(me.member, 0.0) < self.TOUCH_EVERY_S:
            return
        self._touched[me.member] = now
        with redis_outages():
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.zadd(self._key, {me.member: time.time()}, xx=True)
                pipe.pexpire(self._key, self._ttl_ms)
                await pipe.execute()

    async def remove(self, me: Incarnation) -> None:
        """Unregister ``me``."""
        self._touched.pop(me.member, None)
        with redis_outages():
            await self._client.zrem(self._key, me.member)
