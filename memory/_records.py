"""What both memory stores share: the clock, checks of names and embeddings, new records,
ranking."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from decimal import Decimal

import numpy as np

from memory.long_term import CoreBlock, MemoryHit, MemoryRecord, NewMemory, storable_text
from stickyray.errors import CoreBlocksFull

__all__ = [
    "MAX_CORE_LIMIT",
    "check_names",
    "check_new",
    "check_room",
    "core_block",
    "new_records",
    "now_utc",
    "rank",
    "unit_rows",
]


# The largest limit of a core block: Postgres keeps it as an integer.
MAX_CORE_LIMIT = 2**31 - 1


def now_utc() -> datetime:
    """The current time, timezone-aware in UTC: the default clock of every memory store."""
    return datetime.now(UTC)


def unit_rows(embeddings: np.ndarray, dimension: int) -> np.ndarray:
    """``embeddings`` as an (n, dimension) float32 array of L2-normalised rows.

    A single vector becomes one row. Embedders promise unit rows, but a store's cosine maths
    is only right if they are, so every store normalises again rather than trust it.
    """
    rows = np.asarray(embeddings, dtype=np.float64)
    if rows.ndim == 1:
        rows = rows[np.newaxis, :]
    if rows.ndim != 2 or rows.shape[1] != dimension:
        raise ValueError(
            f"store holds {dimension}-dimensional embeddings, "
            f"got an array of shape {tuple(np.shape(embeddings))}"
        )
    if not np.isfinite(rows).all():
        raise ValueError("embeddings must be finite")
    # Scaled by its largest element first, a row's squares can neither overflow (a norm of
    # inf would turn the row into zeros) nor vanish, whatever its magnitude.
    largest = np.abs(rows).max(axis=1, keepdims=True)
    if (largest == 0).any():
        raise ValueError("embeddings must not be zero vectors (cosine is undefined)")
    rows = rows / largest
    return np.ascontiguousarray(rows / np.linalg.norm(rows, axis=1, keepdims=True), np.float32)


def check_names(**names: str | None) -> None:
    """ValueError naming the first of ``names`` (tenant, user id, agent...) that Postgres
    cannot store as text, so that both stores refuse it alike."""
    for field, value in names.items():
        if value is not None:
            try:
                storable_text(value)
            except ValueError as exc:
                raise ValueError(f"{field} {exc}") from None


def core_block(label: str, value: str, limit: int, now: datetime) -> CoreBlock:
    """A validated core block; ValueError naming the label and limit if ``value`` is too long."""
    if not 1 <= limit <= MAX_CORE_LIMIT:
        raise ValueError(
            f"core block {label!r}: limit must be from 1 to {MAX_CORE_LIMIT}, got {limit}"
        )
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
    check_names(tenant=tenant, user_id=user_id)
    for memory in memories:
        check_names(agent=memory.agent)
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
            metadata=json.loads(json.dumps(memory.metadata), parse_float=_jsonb_number),
        )
        for memory in memories
    ]


def _jsonb_number(literal: str) -> float | int:
    """A JSON number with a fraction or exponent as Postgres's jsonb gives it back.

    jsonb keeps numbers as decimals, and writes them out without an exponent: one that has
    no digits after the point then (``1e+16``, ``1.5e+300``) reads back as an integer, the
    exact decimal, and there is no negative zero. Both stores keep numbers as jsonb does.
    """
    number = Decimal(literal)
    exponent = number.as_tuple().exponent
    assert isinstance(exponent, int), "a JSON number is finite"
    if exponent >= 0:
        return int(number)
    return float(number) or 0.0


def rank(scored: list[tuple[float, MemoryRecord, float]], k: int) -> list[MemoryHit]:
    """The k best of (score, record, similarity) triples, best first; ties broken by id."""
    scored.sort(key=lambda t: (-t[0], t[1].id))
    return [MemoryHit(memory=rec, similarity=sim, score=score) for score, rec, sim in scored[:k]]
