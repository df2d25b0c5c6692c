"""Long-term memory: the records, the search weights and the store Protocol.

Three kinds of memory, always scoped by (tenant, user):
- ``core`` blocks: labelled, size-limited text placed in the agent's prompt every turn
  (``user_profile``, ``persona``...). Stored apart from the searchable memories.
- ``episodic``: what happened, with time; its weight decays with a half-life.
- ``semantic``: facts.
"""

from __future__ import annotations

import math
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal, Protocol, runtime_checkable

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

__all__ = [
    "MAX_CONTENT_CHARS",
    "CoreBlock",
    "MemoryHit",
    "MemoryKind",
    "MemoryRecord",
    "MemoryStore",
    "NewMemory",
    "SearchWeights",
    "StorableText",
    "combined_score",
    "storable_json",
    "storable_text",
]

MemoryKind = Literal["episodic", "semantic"]
MAX_CONTENT_CHARS = 8000
"""The longest text one memory holds."""
CORE_LABEL_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"


def storable_text(value: str) -> str:
    """``value`` if Postgres can store it as text, else ValueError saying why not."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters (\\u0000)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (it holds an unpaired surrogate)") from None
    return value


# Objects and lists in metadata nest at most this deep: far beyond any real use, and far
# within what a response (and Python's recursion) can carry back.
MAX_METADATA_DEPTH = 32


def storable_json(value: Any, depth: int = 0) -> Any:
    """``value`` if Postgres can store it as jsonb and it can be read back: finite numbers,
    storable strings, at most ``MAX_METADATA_DEPTH`` levels of objects and lists."""
    if isinstance(value, str):
        return storable_text(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"numbers must be finite, got {value}")
    if isinstance(value, dict | list | tuple) and depth >= MAX_METADATA_DEPTH:
        raise ValueError(f"nests deeper than {MAX_METADATA_DEPTH} levels of objects and lists")
    if isinstance(value, dict):
        return {storable_text(str(k)): storable_json(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [storable_json(v, depth + 1) for v in value]
    return value


StorableText = Annotated[str, AfterValidator(storable_text)]
"""Text that Postgres accepts: no NUL characters, no unpaired surrogates."""


def _canonical_uuid(value: str) -> str:
    return str(uuid.UUID(value))  # as Postgres writes it back, so both stores agree


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NewMemory(_Model):
    """A memory to store; the embedding travels beside it.

    ``id`` (a UUID) makes storing it idempotent: a memory whose id is already stored is not
    stored again. Without one, the store makes one up.
    """

    id: Annotated[str, AfterValidator(_canonical_uuid)] | None = None
    kind: MemoryKind = "semantic"
    content: StorableText = Field(min_length=1, max_length=MAX_CONTENT_CHARS)
    agent: str | None = None
    importance: float = Field(default=0.5, ge=0.0, le=1.0)
    metadata: Annotated[dict[str, Any], AfterValidator(storable_json)] = Field(default_factory=dict)


class MemoryRecord(_Model):
    """A stored memory."""

    id: str
    tenant: str
    user_id: str
    agent: str | None
    kind: MemoryKind
    content: str
    importance: float
    created_at: datetime
    last_accessed_at: datetime
    access_count: int
    metadata: dict[str, Any]


class MemoryHit(_Model):
    """A search result: the memory, its cosine similarity and its combined score."""

    memory: MemoryRecord
    similarity: float
    score: float


class CoreBlock(_Model):
    """A labelled block of text always in the agent's prompt."""

    label: str = Field(pattern=CORE_LABEL_PATTERN)
    value: str
    limit: int
    updated_at: datetime


class SearchWeights(_Model):
    """How similarity, recency and importance combine into a score."""

    similarity: float = Field(default=1.0, ge=0.0)
    recency: float = Field(default=0.2, ge=0.0)
    importance: float = Field(default=0.1, ge=0.0)
    half_life_days: float = Field(default=30.0, gt=0.0)


def combined_score(
    similarity: float,
    importance: float,
    kind: str,
    created_at: datetime,
    now: datetime,
    weights: SearchWeights,
) -> float:
    """similarity*w_s + recency*w_r + importance*w_i; only episodic memories decay."""
    if kind == "episodic":
        age_days = max((now - created_at).total_seconds(), 0.0) / 86400.0
        recency = math.exp(-math.log(2) * age_days / weights.half_life_days)
    else:
        recency = 1.0
    return (
        weights.similarity * similarity
        + weights.recency * recency
        + weights.importance * importance
    )


@runtime_checkable
class MemoryStore(Protocol):
    """Where long-term memories live. Every call is scoped by tenant and user."""

    @property
    def dimension(self) -> int:
        """Length of the embeddings this store holds."""
        ...

    async def add(
        self, tenant: str, user_id: str, memories: list[NewMemory], embeddings: np.ndarray
    ) -> list[MemoryRecord]:
        """Store memories with their (n, dimension) embeddings; returns the stored records.

        A memory whose id (tenant, user) already has is skipped, and the stored record
        returned in its place; ValueError if another tenant or user has that id.
        """
        ...

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
        """The k best memories of (tenant, user) by combined score, best first.

        Exactly k results when at least k match the filters. Hits count as accesses.
        ``agent`` keeps memories of that agent plus those of no agent.
        """
        ...

    async def delete(self, tenant: str, user_id: str, memory_id: str) -> bool:
        """Delete one memory; False if (tenant, user) has no memory with that id.

        ``memory_id`` is a UUID in any form (upper-case, braces, no hyphens).
        """
        ...

    async def get_core(self, tenant: str, user_id: str) -> list[CoreBlock]:
        """Every core block of (tenant, user), by label."""
        ...

    async def put_core(
        self,
        tenant: str,
        user_id: str,
        label: str,
        value: str,
        limit: int,
        max_blocks: int | None = None,
    ) -> CoreBlock:
        """Create or replace a core block; ValueError if ``value`` is over ``limit`` chars.

        CoreBlocksFull if ``label`` is new and (tenant, user) has ``max_blocks`` blocks
        already: counted and written as one step, so concurrent writers cannot pass it.
        """
        ...

    async def delete_core(self, tenant: str, user_id: str, label: str) -> bool:
        """Delete one core block; False if (tenant, user) has none with that label."""
        ...
