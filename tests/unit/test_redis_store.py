"""What only the Redis thread store has: its keys' expiry (on a real redis-server)."""

from __future__ import annotations

import uuid

import redis.asyncio as aioredis

from actors._thread_scripts import PARTS
from actors.key import ThreadKey
from actors.redis_store import RedisThreadStore, connect_redis
from actors.store import Checkpoint
from stickyray.turns import InboundMessage, TurnResult

TTL_S = 3600
NEARLY_EXPIRED_S = 5


def done(key: ThreadKey, mid: str, turn: int) -> TurnResult:
    return TurnResult(thread_id=key.thread_id, message_id=mid, turn=turn, agent="a", reply="ok")


async def nearly_expired(client: aioredis.Redis, key: ThreadKey) -> list[str]:
    """Bring every key of the thread close to expiry; the parts it has."""
    present = [part for part in PARTS if await client.exists(key.redis_key(part))]
    for part in present:
        await client.expire(key.redis_key(part), NEARLY_EXPIRED_S)
    return present


async def expiries(client: aioredis.Redis, key: ThreadKey, parts: list[str]) -> dict[str, bool]:
    """Per part: whether its expiry was pushed out to the store's TTL again."""
    return {p: await client.ttl(key.redis_key(p)) > NEARLY_EXPIRED_S for p in parts}


async def test_every_write_keeps_all_of_the_thread_for_the_ttl(redis_url: str) -> None:
    """Accepting a message refreshed only some keys: one sent just before the checkpoint
    expired was fenced mid-turn, ran again without its active agent and buffer, and the
    epoch restarted at 1, which a stale incarnation's writes would pass."""
    key = ThreadKey.of(f"ttl-{uuid.uuid4().hex[:12]}")
    client = connect_redis(redis_url)
    try:
        async with RedisThreadStore.from_url(redis_url, ttl_s=TTL_S) as store:
            epoch = (await store.open(key)).epoch
            await store.accept(key, epoch, InboundMessage(text="book", message_id="m1"))
            await store.commit(key, epoch, Checkpoint(turn=1, version=1), done(key, "m1", 1))

            parts = await nearly_expired(client, key)
            assert {"epoch", "checkpoint", "turns", "msgs"} <= set(parts)
            await store.accept(key, epoch, InboundMessage(text="for two", message_id="m2"))
            accepted = await expiries(client, key, [*parts, "pending"])
            await store.commit(key, epoch, Checkpoint(turn=2, version=2), done(key, "m2", 2))

            parts = await nearly_expired(client, key)
            epoch = (await store.open(key)).epoch
            opened = await expiries(client, key, parts)

            await nearly_expired(client, key)
            await store.reset(key, epoch, Checkpoint(version=3))
            reset = await expiries(client, key, ["epoch", "checkpoint"])
    finally:
        await client.aclose()
    assert accepted == dict.fromkeys(accepted, True)
    assert opened == dict.fromkeys(opened, True)
    assert reset == {"epoch": True, "checkpoint": True}
