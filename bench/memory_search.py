"""Long-term memory search in Postgres: HNSW recall@10 against exact search, and latency.

Loads clustered synthetic memories (1,000 random centres plus gaussian noise, normalised) for
one tenant and user into an embedded Postgres, builds the HNSW index after loading (m=16,
ef_construction=64), then runs the same queries through ``PostgresMemoryStore.search`` at
several ``hnsw.ef_search`` values. Exact top-10 comes from brute force in numpy. All memories
are semantic with one importance, so the store's combined score orders exactly as cosine does.
The sweep searches by similarity alone (recency and importance weighted 0), so recall
measures the index alone. The default weights are measured apart, at the store's default
ef_search: there recency and importance could lift a memory from beyond the candidates, so
the store also looks further (the index's next candidates, then every row in reach), and
that row says what the exact result costs. Latency is the whole ``search`` call: the
transaction, the tenant setting, the index scan, the re-rank and the access-count UPDATE.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import psutil

from memory.embedded_postgres import EmbeddedPostgres
from memory.long_term import NewMemory, SearchWeights
from memory.migrations import EMBEDDING_INDEX
from memory.postgres import DEFAULT_EF_SEARCH, PostgresMemoryStore, init_connection

RESULTS = Path(__file__).parent / "results"
DIMENSION = 384
CENTRES = 1_000
NOISE = 0.08  # per coordinate: noise norm ~1.6, so clusters overlap (cosine ~0.3 within)
K = 10
EF_SEARCH = (40, 64, 100, 200)  # below 40 is moot: k=10 fetches 40 candidates
GOAL = {"recall_at_10": 0.95, "p50_ms": 20.0}
BATCH = 2_000
TENANT, USER = "bench", "user"


def clustered(rng: np.random.Generator, centres: np.ndarray, n: int) -> np.ndarray:
    """n unit vectors, each a random centre plus gaussian noise."""
    points = centres[rng.integers(len(centres), size=n)]
    points = points + rng.normal(scale=NOISE, size=points.shape).astype(np.float32)
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


async def load(store: PostgresMemoryStore, vectors: np.ndarray) -> list[str]:
    """Add every vector as a memory, in batches; returns the ids in vector order."""
    ids: list[str] = []
    for start in range(0, len(vectors), BATCH):
        batch = vectors[start : start + BATCH]
        memories = [NewMemory(content=f"memory {start + i}") for i in range(len(batch))]
        ids.extend(record.id for record in await store.add(TENANT, USER, memories, batch))
    return ids


async def build_index(pool: asyncpg.Pool) -> float:
    """Seconds to build the HNSW index on the loaded table."""
    async with pool.acquire() as conn:
        # A graph that fits in maintenance_work_mem builds far faster than one that spills.
        await conn.execute("SET maintenance_work_mem = '1GB'")
        await conn.execute("SET max_parallel_maintenance_workers = 1")
        start = time.perf_counter()
        await conn.execute(EMBEDDING_INDEX)
        elapsed = time.perf_counter() - start
        await conn.execute("ANALYZE memories")
    return elapsed


async def uses_hnsw(pool: asyncpg.Pool, query: np.ndarray) -> bool:
    """Whether the planner serves the store's candidate query from the HNSW index."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT set_config('stickyray.tenant', $1, true)", TENANT)
        plan = await conn.fetch(
            "EXPLAIN SELECT id FROM memories WHERE tenant = $1 AND user_id = $2"
            " ORDER BY embedding <=> $3 LIMIT 40",
            TENANT,
            USER,
            query,
        )
    return any("memories_embedding_idx" in row[0] for row in plan)


SIMILARITY_ONLY = SearchWeights(recency=0.0, importance=0.0)


async def measure(
    store: PostgresMemoryStore,
    queries: np.ndarray,
    exact: list[set[str]],
    weights: SearchWeights = SIMILARITY_ONLY,
) -> dict[str, float]:
    """recall@10 and latency of ``store.search`` over the queries."""
    for query in queries[:5]:  # warm the connection, the plan cache and the index pages
        await store.search(TENANT, USER, query, K, weights=weights)
    latencies, recalls = [], []
    for query, truth in zip(queries, exact, strict=True):
        start = time.perf_counter()
        hits = await store.search(TENANT, USER, query, K, weights=weights)
        latencies.append(time.perf_counter() - start)
        recalls.append(len({hit.memory.id for hit in hits} & truth) / K)
    ordered = sorted(latencies)
    return {
        "recall_at_10": statistics.fmean(recalls),
        "p50_ms": 1000 * statistics.median(ordered),
        "p95_ms": 1000 * ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
    }


async def run(url: str, memories: int, queries: int) -> dict[str, Any]:
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(CENTRES, DIMENSION)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    vectors = clustered(rng, centres, memories)
    query_vectors = clustered(rng, centres, queries)
    pool = await asyncpg.create_pool(url, min_size=1, max_size=2, init=init_connection)
    try:
        await PostgresMemoryStore(pool, DIMENSION).setup()
        async with pool.acquire() as conn:
            # Inserting into a live HNSW graph row by row is far slower than one build.
            await conn.execute("DROP INDEX memories_embedding_idx")
        start = time.perf_counter()
        ids = await load(PostgresMemoryStore(pool, DIMENSION), vectors)
        load_s = time.perf_counter() - start
        build_s = await build_index(pool)
        exact = [{ids[i] for i in np.argpartition(-(vectors @ q), K)[:K]} for q in query_vectors]
        sweep = []
        for ef_search in EF_SEARCH:
            store = PostgresMemoryStore(pool, DIMENSION, ef_search=ef_search)
            sweep.append({"ef_search": ef_search, **await measure(store, query_vectors, exact)})
        store = PostgresMemoryStore(pool, DIMENSION)
        default_weights = {
            "ef_search": DEFAULT_EF_SEARCH,
            **await measure(store, query_vectors, exact, SearchWeights()),
        }
        hnsw = await uses_hnsw(pool, query_vectors[0])
    finally:
        await pool.close()
    meeting = [
        row
        for row in sweep
        if row["recall_at_10"] >= GOAL["recall_at_10"] and row["p50_ms"] <= GOAL["p50_ms"]
    ]
    return {
        "memories": memories,
        "dimension": DIMENSION,
        "queries": queries,
        "k": K,
        "load_s": load_s,
        "index": {"m": 16, "ef_construction": 64, "build_s": build_s, "used_by_planner": hnsw},
        "sweep": sweep,
        "default_weights": default_weights,
        "smallest_meeting_goal": meeting[0] if meeting else None,
        "store_default": next(row for row in sweep if row["ef_search"] == DEFAULT_EF_SEARCH),
        "goal_met_by_default": any(row["ef_search"] == DEFAULT_EF_SEARCH for row in meeting),
        "goal": GOAL,
    }


def main(quick: bool = False) -> int:
    """Run the benchmark, print its table, write ``bench/results/memory_search.json``."""
    memories, queries = (10_000, 50) if quick else (100_000, 200)
    with tempfile.TemporaryDirectory(prefix="stickyray-bench-") as tmp:
        server = EmbeddedPostgres(Path(tmp) / "pg")
        try:
            result = asyncio.run(run(server.start(), memories, queries))
        finally:
            server.stop()
    result["machine"] = (
        f"{psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB"
    )
    result["quick"] = quick
    _print(result)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "memory_search.json").write_text(json.dumps(result, indent=2))
    return 0


def _print(result: dict[str, Any]) -> None:
    index = result["index"]
    print(
        f"\nmemory search: {result['memories']:,} memories x {result['dimension']} dims, "
        f"{result['queries']} queries, k={result['k']}, on {result['machine']}"
    )
    print(
        f"load {result['load_s']:.1f} s, HNSW build {index['build_s']:.1f} s (m=16, ef_c=64), "
        f"planner uses the index: {'yes' if index['used_by_planner'] else 'NO'}"
    )
    print("by similarity alone (the index):")
    print(f"{'ef_search':>10}{'recall@10':>12}{'p50 ms':>10}{'p95 ms':>10}")
    for row in result["sweep"]:
        print(
            f"{row['ef_search']:>10}{row['recall_at_10']:>12.3f}"
            f"{row['p50_ms']:>10.2f}{row['p95_ms']:>10.2f}"
        )
    row = result["default_weights"]
    print(
        f"{'default weights (recency, importance) at ef_search':<52}{row['ef_search']}: "
        f"recall@10 {row['recall_at_10']:.3f}, p50 {row['p50_ms']:.2f} ms, "
        f"p95 {row['p95_ms']:.2f} ms"
    )
    smallest, goal = result["smallest_meeting_goal"], result["goal"]
    print(
        f"goal {goal}: smallest ef_search meeting it", smallest["ef_search"] if smallest else "none"
    )
    met = "meets" if result["goal_met_by_default"] else "MISSES"
    print(f"store default ef_search {DEFAULT_EF_SEARCH} {met} the goal")
