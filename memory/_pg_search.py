"""How the Postgres memory store reads memories: the columns it selects, a row as a record,
the combined score of the candidates a search fetches, and the exact pass that makes sure no
row beyond them scores higher."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any

import asyncpg
import numpy as np

from memory._records import rank
from memory.long_term import MemoryHit, MemoryRecord, SearchWeights, combined_score

__all__ = [
    "COLUMNS",
    "DEFAULT_EF_SEARCH",
    "MAX_EF_SEARCH",
    "MIN_CANDIDATES",
    "OVERSAMPLE",
    "SELECT",
    "TOUCH",
    "exact_pass",
    "real",
    "record_of",
    "score_rows",
]

MAX_EF_SEARCH = 1000  # the most pgvector takes

COLUMNS = (
    "id, agent, kind, content, importance, created_at, last_accessed_at, access_count, metadata"
)
SELECT = COLUMNS.replace("id,", "id::text AS id,", 1)

# The floor of hnsw.ef_search. bench/memory_search.py, recall@10 by similarity alone at
# ef_search 40/64/100/200: ~0.96/0.98/1.0/1.0 on 100,000 clustered memories,
# ~0.90/0.91/0.93/0.96-0.98 on 10,000 sparser ones (less structure is harder for HNSW). 200
# is the only one that clears 0.95 on both, and costs ~5 ms more (p50 ~9 ms at 100,000,
# against ~4 ms at 40, on the 2026-12-06 run).
DEFAULT_EF_SEARCH = 200

# Candidates fetched from the index per result wanted, and never fewer than this floor:
# the final order is by combined score, so the k best by score must be among them.
OVERSAMPLE = 4
MIN_CANDIDATES = 40

# A search's hits count as accesses. An UPDATE by `id = ANY(...)` alone locks rows in the
# order of its plan (uuid order by the primary key for a few ids, physical order by a bitmap
# for more), so two searches of one user with different k deadlocked. The rows are locked
# first, in id order, skipping those another transaction holds: a search never waits for
# another, and a count skipped under contention only lags (it is a recency hint).
TOUCH = """
UPDATE memories m SET access_count = m.access_count + 1, last_accessed_at = $4
  FROM (SELECT id FROM memories
         WHERE tenant = $1 AND user_id = $2 AND id = ANY($3::uuid[])
         ORDER BY id FOR NO KEY UPDATE SKIP LOCKED) locked
 WHERE m.id = locked.id
RETURNING m.id::text, m.access_count, m.last_accessed_at
"""


def real(value: float) -> float:
    """``value`` as Postgres keeps a `real` (importance): the shortest float32 repr gives back
    what the caller wrote."""
    return float(str(np.float32(value)))


async def exact_pass(
    conn: asyncpg.Connection,
    tenant: str,
    user_id: str,
    scored: list[tuple[float, MemoryRecord, float]],
    query: tuple[str, list[Any]],
    now: datetime,
    k: int,
    weights: SearchWeights,
    widen_to: int = 0,
) -> list[MemoryHit]:
    """The k best by score among every matching row, given the index's candidates.

    Rows beyond the candidates are less similar, but recency and importance can add up
    to w_r + w_i: one of them still beats the k-th hit if its similarity reaches
    (score_k - w_r - w_i) / w_s, and any row can when w_s is 0. The index's next
    ``widen_to`` candidates are looked at first (one more index scan); only when they do not
    reach that far either are all such rows scored. Either way only what the score needs is
    read, and only the winners are then read whole.
    """
    where, args = query
    hits = rank(scored, k)
    exact = [*args[:3], None, *args[4:]]  # LIMIT NULL: every row in reach
    light = (
        "SELECT id::text AS id, kind, importance, created_at, embedding <=> $3 AS distance"
        f" FROM memories WHERE {where}"
    )
    if weights.similarity > 0:
        reach = (hits[-1].score - weights.recency - weights.importance) / weights.similarity
        if reach >= min(similarity for _, _, similarity in scored):
            return hits  # every row in reach is a candidate already
        if widen_to > len(scored):
            wider = [*args[:3], widen_to, *args[4:]]
            rows = await conn.fetch(f"{light} ORDER BY embedding <=> $3 LIMIT $4", *wider)
            if len(rows) == widen_to and reach >= 1.0 - max(r["distance"] for r in rows):
                return await _with_beyond(
                    conn, tenant, user_id, scored, rows, query, now, k, weights
                )
        exact.append(1.0 - reach)
        light += f" AND (embedding <=> $3) <= ${len(exact)}"
    rows = await conn.fetch(f"{light} LIMIT $4", *exact)
    return await _with_beyond(conn, tenant, user_id, scored, rows, query, now, k, weights)


async def _with_beyond(
    conn: asyncpg.Connection,
    tenant: str,
    user_id: str,
    scored: list[tuple[float, MemoryRecord, float]],
    beyond: list[asyncpg.Record],
    query: tuple[str, list[Any]],
    now: datetime,
    k: int,
    weights: SearchWeights,
) -> list[MemoryHit]:
    """The k best of the candidates and the ``beyond`` rows (read light), the winners among
    those read whole."""
    where, args = query
    seen = {record.id for _, record, _ in scored}
    best = [(score, record.id) for score, record, _ in scored]
    for row in beyond:
        if row["id"] not in seen:
            similarity = min(max(1.0 - float(row["distance"]), -1.0), 1.0)
            importance = real(row["importance"])
            score = combined_score(
                similarity, importance, row["kind"], row["created_at"], now, weights
            )
            best.append((score, row["id"]))
    best.sort(key=lambda pair: (-pair[0], pair[1]))
    winners = [uuid.UUID(id_) for _, id_ in best[:k] if id_ not in seen]
    if not winners:
        return rank(scored, k)
    whole = [*args[:3], None, *args[4:], winners]
    rows = await conn.fetch(
        f"SELECT {SELECT}, embedding <=> $3 AS distance FROM memories WHERE {where}"
        f" AND id = ANY(${len(whole)}::uuid[]) LIMIT $4",
        *whole,
    )
    return rank(scored + score_rows(tenant, user_id, rows, now, weights), k)


def score_rows(
    tenant: str,
    user_id: str,
    rows: list[asyncpg.Record],
    now: datetime,
    weights: SearchWeights,
) -> list[tuple[float, MemoryRecord, float]]:
    """(score, record, similarity) of each row read with its ``distance``."""
    scored = []
    for row in rows:
        similarity = min(max(1.0 - float(row["distance"]), -1.0), 1.0)
        record = record_of(tenant, user_id, row)
        score = combined_score(
            similarity, record.importance, record.kind, record.created_at, now, weights
        )
        scored.append((score, record, similarity))
    return scored


def record_of(tenant: str, user_id: str, row: asyncpg.Record) -> MemoryRecord:
    """The record of a row read with ``SELECT``'s columns."""
    fields = {name: row[name] for name in COLUMNS.split(", ")}
    fields.update(importance=real(row["importance"]), metadata=json.loads(row["metadata"]))
    return MemoryRecord(tenant=tenant, user_id=user_id, **fields)
