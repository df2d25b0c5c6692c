"""What both memory stores share: the clock, embedding checks, new records, ranking."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import numpy as np

from memory.long_term import CoreBlock, MemoryHit, MemoryRecord, NewMemory
from stickyray.errors import CoreBlocksFull

__all__ = [
    "check_new",
    "check_room",
    "core_block",
    "new_records",
    "now_utc",
    "rank",
    "unit_rows",
]


def now_utc() -> datetime:
    """The current time, timezone-aware in UTC: the default clock of every memory store."""
    return datetime.now(UTC)


def unit_rows(embeddings: np.ndarray, dimension: int) -> np.ndarray:
    """``embeddings`` as an (n, dimension) float32 array of L2-normalised rows.

    A single vector becomes one row. Embedders promise unit rows, but a store's cosine maths
    is only right if they are, so every store normalises again rather than trust it.
    """
    rows = np.asarray(embeddings, dtype=np.float32)
    if rows.ndim == 1:
        rows = rows[np.newaxis, :]
    if rows.ndim != 2 or rows.shape[1] != dimension:
        raise ValueError(
            f"store holds {dimension}-dimensional embeddings, "
            f"got an array of shape {tuple(np.shape(embeddings))}"
        )
    if not np.isfinite(rows).all():
        raise ValueError("embeddings must be finite")
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError("embeddings must not be zero vectors (cosine is undefined)")
    return np.ascontiguousarray(rows / norms, dtype=np.float32)


def core_block(label: str, value: str, limit: int, now: datetime) -> CoreBlock:
    """A validated core block; ValueError naming the label and limit if ``value`` is too long."""
    if limit < 1:
        raise ValueError(f"core block {label!r}: limit must be at least 1, got {limit}")
    if len(value) > limit:
        raise ValueError(
            f"core block {label!r} is {len(value)} characters, over its limit of {limit}"
        )
    return CoreBlock(label=label, value=value, limit=limit, updated_at=now)


def check_room(label: str, labels: list[str], max_blocks: int | None) -> None:
    """CoreBlocksFull if a block ``label`` would be one more than ``max_blocks``."""
    if max_blocks is not None and label not in labels and len(labels) >= max_blocks:
        raise CoreBlocksFull(
            f"the user has {len(labels)} core blocks, the most allowed "
            f"(memory.max_core_blocks); replace one of: {', '.join(sorted(labels))}"
        )


def check_new(memories: list[NewMemory], embeddings: np.ndarray, dimension: int) -> np.ndarray:
    """The unit rows of ``embeddings``, checked to be one per memory."""
    rows = unit_rows(embeddings, dimension)
    if rows.shape[0] != len(memories):
        raise ValueError(f"{len(memories)} memories but {rows.shape[0]} embeddings")
    return rows


def new_records(
    tenant: str, user_id: str, memories: list[NewMemory], now: datetime
) -> list[MemoryRecord]:
    """The records of freshly added memories, with no accesses yet (and new ids if none)."""
    return [
        MemoryRecord(
            id=memory.id or str(uuid.uuid4()),
            tenant=tenant,
            user_id=user_id,
            agent=memory.agent,
            kind=memory.kind,
            content=memory.content,
            importance=memory.importance,
            created_at=now,
            last_accessed_at=now,
            access_count=0,
            metadata=dict(memory.metadata),
        )
        for memory in memories
    ]


def rank(scored: list[tuple[float, MemoryRecord, float]], k: int) -> list[MemoryHit]:
    """The k best of (score, record, similarity) triples, best first; ties broken by id."""
    scored.sort(key=lambda t: (-t[0], t[1].id))
    return [MemoryHit(memory=rec, similarity=sim, score=score) for score, rec, sim in scored[:k]]
