"""Tenants cannot see each other's memories, even when the other tenant's are the nearest.

The queries fall in ten tight clusters. Tenant B holds a near-copy of every query plus more
memories around the cluster centres, so each query's few hundred nearest memories are all
B's; tenant A's memories are random, far from every query. Every search as A must still
return exactly k of A's own memories. In Postgres that means the HNSW pass (which filters
after scanning, in pgvector 0.6) comes back empty and the store must fall back to an exact
scan. Postgres also gets a raw query that forgets its WHERE clause: row-level security alone
must keep B's rows out.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import numpy as np
import pytest

from memory.in_memory import InMemoryMemoryStore
from memory.long_term import NewMemory
from memory.postgres import PostgresMemoryStore, init_connection

DIM = 384
PER_TENANT = 2_000
QUERIES = 1_000
K = 10
BATCH = 500

Store = InMemoryMemoryStore | PostgresMemoryStore


def units(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def around(rng: np.random.Generator, centres: np.ndarray, n: int, noise: float) -> np.ndarray:
    """n unit vectors near the centres, taken in turn."""
    v = centres[np.arange(n) % len(centres)] + rng.normal(scale=noise, size=(n, DIM))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


async def index_serves(url: str, tenant: str, query: np.ndarray) -> bool:
    """Whether, with fresh statistics, the planner takes the HNSW index for tenant's search."""
    conn = await asyncpg.connect(url)
    try:
        await init_connection(conn)
        await conn.execute("ANALYZE memories")  # what autovacuum would soon do
        async with conn.transaction():
            await conn.execute("SELECT set_config('stickyray.tenant', $1, true)", tenant)
            plan = await conn.fetch(
                "EXPLAIN SELECT id FROM memories WHERE tenant = $1 AND user_id = 'user'"
                " ORDER BY embedding <=> $2 LIMIT 40",
                tenant,
                query,
            )
    finally:
        await conn.close()
    return any("memories_embedding_idx" in row[0] for row in plan)


@pytest.fixture(params=["memory", "postgres"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    if request.param == "memory":
        yield InMemoryMemoryStore(DIM)
        return
    url = request.getfixturevalue("postgres_url")
    async with PostgresMemoryStore.from_url(url, DIM, pool_size=2) as pg:
        await pg.setup()
        yield pg


async def fill(store: Store, tenant: str, vectors: np.ndarray) -> set[str]:
    ids: set[str] = set()
    for start in range(0, len(vectors), BATCH):
        batch = vectors[start : start + BATCH]
        new = [NewMemory(content=f"{tenant} #{start + i}") for i in range(len(batch))]
        ids.update(r.id for r in await store.add(tenant, "user", new, batch))
    return ids


async def test_nearest_memories_of_another_tenant_never_leak(
    store: Store, request: pytest.FixtureRequest
) -> None:
    rng = np.random.default_rng(42)
    a, b = f"a-{uuid.uuid4().hex[:8]}", f"b-{uuid.uuid4().hex[:8]}"
    centres = units(rng, 10)
    queries = around(rng, centres, QUERIES, noise=0.02)
    planted = around(rng, queries, QUERIES, noise=1e-3)
    ids_a = await fill(store, a, units(rng, PER_TENANT))
    ids_b = await fill(
        store, b, np.vstack([planted, around(rng, centres, PER_TENANT - QUERIES, noise=0.02)])
    )
    if isinstance(store, PostgresMemoryStore):
        # Otherwise the test could pass on the btree path alone, never meeting the HNSW gap.
        assert await index_serves(request.getfixturevalue("postgres_url"), a, queries[0])

    # The plant works: as B, each query's nearest memory is its near-copy.
    for i in (0, QUERIES - 1):
        (hit,) = await store.search(b, "user", queries[i], k=1)
        assert hit.memory.content == f"{b} #{i}" and hit.similarity > 0.99

    for query in queries:
        hits = await store.search(a, "user", query, k=K)
        assert len(hits) == K
        # Record ids, not the tenant field, which a store could fill from its arguments.
        assert {hit.memory.id for hit in hits} <= ids_a
        assert not {hit.memory.id for hit in hits} & ids_b
        assert max(hit.similarity for hit in hits) < 0.5  # A's own, far from the plant


async def test_row_level_security_holds_without_a_where_clause(postgres_url: str) -> None:
    a, b = f"a-{uuid.uuid4().hex[:8]}", f"b-{uuid.uuid4().hex[:8]}"
    rng = np.random.default_rng(7)
    async with PostgresMemoryStore.from_url(postgres_url, DIM, pool_size=1) as store:
        await store.setup()
        for tenant, n in ((a, 3), (b, 5)):
            new = [NewMemory(content=f"{tenant} {i}") for i in range(n)]
            await store.add(tenant, "user", new, units(rng, n))
            await store.put_core(tenant, "user", "persona", tenant, 100)

    conn = await asyncpg.connect(postgres_url)
    try:
        async with conn.transaction():
            await conn.execute("SELECT set_config('stickyray.tenant', $1, true)", a)
            assert await conn.fetchval("SELECT count(*) FROM memories") == 3
            assert await conn.fetchval("SELECT count(*) FROM memories WHERE tenant = $1", b) == 0
            assert await conn.fetchval("SELECT count(*) FROM core_blocks") == 1
            # Writes hit the wall too: B's rows can be neither changed nor forged.
            assert await conn.execute("UPDATE memories SET access_count = 99") == "UPDATE 3"
            assert await conn.execute("DELETE FROM core_blocks") == "DELETE 1"
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
            async with conn.transaction():
                await conn.execute("SELECT set_config('stickyray.tenant', $1, true)", a)
                await conn.execute(
                    "INSERT INTO core_blocks VALUES ($1, 'user', 'persona', 'forged', 10, now())",
                    b,
                )
        # No tenant set: no rows at all.
        assert await conn.fetchval("SELECT count(*) FROM memories") == 0
        async with conn.transaction():
            await conn.execute("SELECT set_config('stickyray.tenant', $1, true)", b)
            assert await conn.fetchval("SELECT count(*) FROM memories") == 5
            assert await conn.fetchval("SELECT max(access_count) FROM memories") == 0
            assert await conn.fetchval("SELECT value FROM core_blocks") == b
    finally:
        await conn.close()
