"""One contract for every CheckpointStore: in-memory and Redis (a real redis-server)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from actors.checkpoint import (
    Checkpoint,
    CheckpointStore,
    InMemoryCheckpointStore,
    RedisCheckpointStore,
    connect_redis,
)
from actors.key import ThreadKey
from memory.buffer import BufferEntry
from stickyray.errors import CheckpointConflict, StoreUnavailable


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[CheckpointStore]:
    if request.param == "memory":
        yield InMemoryCheckpointStore()
        return
    url = request.getfixturevalue("redis_url")
    async with RedisCheckpointStore.from_url(url, ttl_s=3600) as redis_store:
        await redis_store.setup()
        yield redis_store


def _ckpt(version: int, active: str | None = "bookings") -> Checkpoint:
    return Checkpoint(
        active_agent=active,
        buffer=[BufferEntry(role="user", text=f"m{version}", turn=version)],
        turn=version,
        version=version,
    )


async def test_load_missing_returns_none(store: CheckpointStore) -> None:
    assert await store.load(ThreadKey.of("never-seen")) is None


async def test_save_then_load_round_trips(store: CheckpointStore) -> None:
    key = ThreadKey.of("round-trip-" + type(store).__name__)
    await store.delete(key)
    await store.save(key, _ckpt(1))
    await store.save(key, _ckpt(2, active=None))
    loaded = await store.load(key)
    assert loaded is not None
    assert (loaded.version, loaded.turn, loaded.active_agent) == (2, 2, None)
    assert loaded.buffer == [BufferEntry(role="user", text="m2", turn=2)]


async def test_stale_and_skipping_writes_conflict(store: CheckpointStore) -> None:
    key = ThreadKey.of("cas-" + type(store).__name__)
    await store.delete(key)
    await store.save(key, _ckpt(1))
    with pytest.raises(CheckpointConflict) as err:
        await store.save(key, _ckpt(1))  # a second writer that also read version 0
    assert err.value.found_version == 1
    with pytest.raises(CheckpointConflict):
        await store.save(key, _ckpt(3))  # skipping a version
    loaded = await store.load(key)
    assert loaded is not None and loaded.version == 1


async def test_delete_forgets(store: CheckpointStore) -> None:
    key = ThreadKey.of("delete-" + type(store).__name__)
    await store.delete(key)
    await store.save(key, _ckpt(1))
    await store.delete(key)
    assert await store.load(key) is None
    await store.save(key, _ckpt(1))  # numbering starts again after a delete


async def test_ping(store: CheckpointStore) -> None:
    await store.ping()


async def test_redis_sets_the_ttl(redis_url: str) -> None:
    key = ThreadKey.of("ttl")
    async with RedisCheckpointStore.from_url(redis_url, ttl_s=120) as store:
        await store.delete(key)
        await store.save(key, _ckpt(1))
    client = connect_redis(redis_url)
    try:
        assert 0 < await client.ttl(key.redis_key("checkpoint")) <= 120
    finally:
        await client.aclose()


async def test_unreachable_redis_is_store_unavailable(tmp_path) -> None:
    async with RedisCheckpointStore.from_url(f"unix://{tmp_path}/no.sock") as store:
        with pytest.raises(StoreUnavailable):
            await store.ping()
        with pytest.raises(StoreUnavailable):
            await store.load(ThreadKey.of("x"))
