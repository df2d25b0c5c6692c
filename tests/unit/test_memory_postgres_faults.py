"""The Postgres memory store under contention and faults: concurrent searches, a blocked
table, connections the server closed. Each test works in a tenant of its own."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter

import asyncpg
import numpy as np

from memory.long_term import NewMemory
from memory.postgres import PostgresMemoryStore, init_connection

DIM = 384


def scope() -> tuple[str, str]:
    """A tenant no other test uses, and a user."""
    return f"tenant-{uuid.uuid4().hex[:10]}", "user-1"


def vectors(n: int, seed: int = 0) -> np.ndarray:
    """``n`` random embeddings around one centre, so every search hits many of them."""
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=DIM)
    return (centre + rng.normal(scale=0.5, size=(n, DIM))).astype(np.float32)


async def test_concurrent_searches_of_one_user_do_not_deadlock(postgres_url: str) -> None:
    # How Postgres finds the rows a search touches depends on how many there are and on the
    # table's statistics: by primary key (uuid order) for a few, by a bitmap or a scan
    # (physical order) for more. One pool is pinned to the first, as a big table does for
    # small k; the other plans as this small table does.
    by_key = {"enable_bitmapscan": "off", "enable_seqscan": "off"}
    by_page: dict[str, str] = {}
    pools = [
        await asyncpg.create_pool(
            postgres_url, min_size=2, max_size=2, init=init_connection, server_settings=plan
        )
        for plan in (by_key, by_page)
    ]
    try:
        stores = [PostgresMemoryStore(pool, DIM) for pool in pools]
        await stores[0].setup()
        tenant, user = scope()
        new = [NewMemory(content=f"m{i}") for i in range(200)]
        await stores[0].add(tenant, user, new, vectors(200))
        await pools[0].execute("ANALYZE memories")  # so the planner knows the user has 200
        queries = vectors(100, seed=1)

        async def search(store: PostgresMemoryStore, query: np.ndarray, k: int) -> str:
            try:
                hits = await store.search(tenant, user, query, k=k)
            except Exception as exc:
                return type(exc).__name__
            return "ok" if len(hits) == k else f"{len(hits)} hits"

        outcomes: Counter[str] = Counter()
        for query in queries:
            # The same query with different k: overlapping rows, locked in either order.
            searches = [search(stores[i % 2], query, (10, 20, 30, 40)[i]) for i in range(4)]
            outcomes.update(await asyncio.gather(*searches))
    finally:
        for pool in pools:
            await pool.close()
    assert outcomes == {"ok": 400}


async def test_a_search_does_not_wait_for_a_row_another_transaction_holds(
    postgres_url: str,
) -> None:
    tenant, user = scope()
    async with PostgresMemoryStore.from_url(postgres_url, DIM, pool_size=1) as store:
        await store.setup()
        held, _ = await store.add(
            tenant, user, [NewMemory(content="held"), NewMemory(content="free")], vectors(2)
        )
        other = await asyncpg.connect(postgres_url)
        try:
            async with other.transaction():
                await other.execute("SELECT set_config('stickyray.tenant', $1, true)", tenant)
                await other.execute(
                    "SELECT 1 FROM memories WHERE id = $1 FOR UPDATE", uuid.UUID(held.id)
                )
                hits = await asyncio.wait_for(store.search(tenant, user, vectors(1)[0], k=2), 5)
        finally:
            await other.close()
    # Both are found; only the free one's access was counted.
    counts = {hit.memory.content: hit.memory.access_count for hit in hits}
    assert counts == {"held": 0, "free": 1}
