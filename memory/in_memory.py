"""The in-memory MemoryStore: exact cosine search over numpy, for tests and single processes."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

from memory._records import (
    check_names,
    check_new,
    check_room,
    core_block,
    new_records,
    now_utc,
    rank,
    unit_rows,
)
from memory.long_term import (
    CoreBlock,
    MemoryHit,
    MemoryKind,
    MemoryRecord,
    NewMemory,
    SearchWeights,
    combined_score,
)

__all__ = ["InMemoryMemoryStore"]


@dataclass
class _Scope:
    """The memories of one (tenant, user): records[i] has the embedding vectors[i]."""

    dimension: int
    records: list[MemoryRecord] = field(default_factory=list)
    vectors: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.vectors = np.empty((0, self.dimension), dtype=np.float32)


class InMemoryMemoryStore:
    """MemoryStore in a dict: exact search, so it is also the reference the others are held to."""

    def __init__(self, dimension: int = 384, clock: Callable[[], datetime] = now_utc) -> None:
        if dimension < 1:
            raise ValueError(f"dimension must be at least 1, got {dimension}")
        self._dimension = dimension
        self._clock = clock
        self._scopes: dict[tuple[str, str], _Scope] = {}
        self._core: dict[tuple[str, str], dict[str, CoreBlock]] = {}

    @property
    def dimension(self) -> int:
        """Length of the embeddings this store holds."""
        return self._dimension

    async def add(
        self, tenant: str, user_id: str, memories: list[NewMemory], embeddings: np.ndarray
    ) -> list[MemoryRecord]:
        """Store memories with their (n, dimension) embeddings; returns the stored records."""
        rows = check_new(memories, embeddings, self._dimension)
        records = new_records(tenant, user_id, memories, self._clock())
        known: dict[str, MemoryRecord] = {}  # id -> its stored record
        for memory in memories:
            found = self._find(memory.id) if memory.id is not None else None
            if found is not None:
                if (found.tenant, found.user_id) != (tenant, user_id):
                    raise ValueError(f"memory id {found.id} is taken by another tenant or user")
                known[found.id] = found
        scope = self._scopes.setdefault((tenant, user_id), _Scope(self._dimension))
        result, added = [], []
        for record, row in zip(records, rows, strict=True):
            if record.id not in known:
                known[record.id] = record
                scope.records.append(record)
                added.append(row)
            result.append(known[record.id])
        if added:
            scope.vectors = np.vstack([scope.vectors, *added])
        return result

    def _find(self, memory_id: str) -> MemoryRecord | None:
        for scope in self._scopes.values():
            for record in scope.records:
                if record.id == memory_id:
                    return record
        return None

    async def search(
        self,
        tenant: str,
        user_id: str,
        embedding: np.ndarray,
        k: int,
        kinds: list[MemoryKind] | None = None,
        agent: str | None = None,
        weights: SearchWeights | None = None,
    ) -> list[MemoryHit]:
        """The k best memories of (tenant, user) by combined score, best first."""
        check_names(tenant=tenant, user_id=user_id, agent=agent)
        query = unit_rows(embedding, self._dimension)[0]
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        scope = self._scopes.get((tenant, user_id))
        if scope is None or k == 0:
            return []
        weights = weights or SearchWeights()
        now = self._clock()
        similarities = np.clip(scope.vectors @ query, -1.0, 1.0)
        scored: list[tuple[float, MemoryRecord, float]] = []
        for record, similarity in zip(scope.records, similarities.tolist(), strict=True):
            if kinds is not None and record.kind not in kinds:
                continue
            if agent is not None and record.agent not in (None, agent):
                continue
            score = combined_score(
                similarity, record.importance, record.kind, record.created_at, now, weights
            )
            scored.append((score, record, similarity))
        hits = rank(scored, k)
        touched = {hit.memory.id for hit in hits}
        for i, record in enumerate(scope.records):
            if record.id in touched:
                scope.records[i] = record.model_copy(
                    update={"access_count": record.access_count + 1, "last_accessed_at": now}
                )
        by_id = {record.id: record for record in scope.records if record.id in touched}
        return [hit.model_copy(update={"memory": by_id[hit.memory.id]}) for hit in hits]

    async def delete(self, tenant: str, user_id: str, memory_id: str) -> bool:
        """Delete one memory; False if (tenant, user) has no memory with that id."""
        check_names(tenant=tenant, user_id=user_id)
        try:
            key = str(uuid.UUID(memory_id))  # any form of it, upper-case too, as Postgres reads it
        except ValueError:
            return False  # no memory has an id that is not a UUID
        scope = self._scopes.get((tenant, user_id))
        if scope is None:
            return False
        for i, record in enumerate(scope.records):
            if record.id == key:
                del scope.records[i]
                scope.vectors = np.delete(scope.vectors, i, axis=0)
                return True
        return False

    async def get_core(self, tenant: str, user_id: str) -> list[CoreBlock]:
        """Every core block of (tenant, user), by label."""
        check_names(tenant=tenant, user_id=user_id)
        blocks = self._core.get((tenant, user_id), {})
        return [blocks[label] for label in sorted(blocks)]

    async def put_core(
        self,
        tenant: str,
        user_id: str,
        label: str,
        value: str,
        limit: int,
        max_blocks: int | None = None,
    ) -> CoreBlock:
        """Create or replace a core block (see MemoryStore.put_core)."""
        check_names(tenant=tenant, user_id=user_id)
        block = core_block(label, value, limit, self._clock())
        blocks = self._core.setdefault((tenant, user_id), {})
        check_room(block.label, list(blocks), max_blocks)
        blocks[block.label] = block
        return block

    async def delete_core(self, tenant: str, user_id: str, label: str) -> bool:
        """Delete one core block; False if (tenant, user) has none with that label."""
        check_names(tenant=tenant, user_id=user_id, label=label)
        return self._core.get((tenant, user_id), {}).pop(label, None) is not None
