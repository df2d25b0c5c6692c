"""HTTP routes of long-term memory: a user's memories and core blocks."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Path, Query, Request, Response
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator
from ray.exceptions import RayError

from actors.key import DEFAULT_TENANT, ID_PATTERN
from memory.long_term import (
    CORE_LABEL_PATTERN,
    MAX_CONTENT_CHARS,
    CoreBlock,
    MemoryHit,
    MemoryRecord,
    NewMemory,
    StorableText,
    storable_json,
)
from memory.service import LongTermMemory
from stickyray.config import AGENT_NAME_PATTERN
from stickyray.errors import CoreBlocksFull, ProviderError, StoreUnavailable

__all__ = ["router"]

TENANT = DEFAULT_TENANT

router = APIRouter(prefix="/v1/users/{user_id}", tags=["memory"])

UserId = Annotated[str, Path(pattern=ID_PATTERN, description="Whose memories.")]


class MemoryIn(BaseModel):
    """A memory to store for a user."""

    model_config = ConfigDict(extra="forbid")

    content: StorableText = Field(min_length=1, max_length=MAX_CONTENT_CHARS)
    kind: Literal["episodic", "semantic"] = "semantic"
    # Strict: JSON's true is no number, nor is "0.5" (an integer is).
    importance: float = Field(default=0.5, ge=0.0, le=1.0, strict=True)
    agent: str | None = Field(default=None, pattern=AGENT_NAME_PATTERN)
    metadata: Annotated[dict[str, Any], AfterValidator(storable_json)] = Field(default_factory=dict)

    @field_validator("content")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("content must not be blank")
        return value


class CoreIn(BaseModel):
    """New text of a core block."""

    model_config = ConfigDict(extra="forbid")

    value: StorableText


class MemorySearch(BaseModel):
    """Result of a memory search."""

    user_id: str
    memories: list[MemoryHit]


def _memory(request: Request) -> tuple[LongTermMemory, int]:
    memory: LongTermMemory | None = getattr(request.app.state, "memory", None)
    if memory is None:
        raise HTTPException(
            404, "long-term memory is not enabled: give an agent a `memory` section in agents.yaml"
        )
    limit: int = request.app.state.core_block_limit
    return memory, limit


# What a retry may get past: the store down, or the embedding model (a Serve deployment, or
# OpenAI's API) failing.
_OUTAGE = (StoreUnavailable, ProviderError, RayError)


def _unavailable(exc: Exception) -> HTTPException:
    what = exc.store if isinstance(exc, StoreUnavailable) else "the embedding model"
    return HTTPException(503, f"{what} is unavailable; nothing was changed")


@router.get("/memories", response_model=MemorySearch)
async def search_memories(
    request: Request,
    user_id: UserId,
    query: Annotated[str, Query(min_length=1, description="What to look for.")],
    k: Annotated[int, Query(ge=1, le=100)] = 10,
    # Empty is absent, as HTML forms and query builders send an unset field.
    kind: Annotated[Literal["episodic", "semantic", ""] | None, Query()] = None,
) -> MemorySearch:
    """The user's memories that best match ``query`` (similarity, recency, importance)."""
    memory, _ = _memory(request)
    try:
        hits = await memory.recall(TENANT, user_id, query, k, kinds=[kind] if kind else None)
    except _OUTAGE as exc:
        raise _unavailable(exc) from None
    return MemorySearch(user_id=user_id, memories=hits)


@router.post("/memories", response_model=MemoryRecord, status_code=201)
async def add_memory(request: Request, user_id: UserId, body: MemoryIn) -> MemoryRecord:
    """Store a memory for the user."""
    memory, _ = _memory(request)
    try:
        return await memory.remember(TENANT, user_id, NewMemory(**body.model_dump()))
    except _OUTAGE as exc:
        raise _unavailable(exc) from None


@router.delete("/memories/{memory_id}", status_code=204)
async def delete_memory(request: Request, user_id: UserId, memory_id: str) -> Response:
    """Delete one of the user's memories."""
    memory, _ = _memory(request)
    try:
        canonical = str(uuid.UUID(memory_id))
    except ValueError:
        canonical = None
    # Any case of the UUID's canonical form; not the braced or unhyphenated ones UUID() takes.
    valid = canonical is not None and canonical == memory_id.lower()
    try:
        deleted = valid and await memory.forget(TENANT, user_id, canonical or memory_id)
    except _OUTAGE as exc:
        raise _unavailable(exc) from None
    if not deleted:
        raise HTTPException(404, f"user {user_id!r} has no memory {memory_id!r}")
    return Response(status_code=204)


Label = Annotated[str, Path(pattern=CORE_LABEL_PATTERN, description="e.g. user_profile")]


@router.get("/core/{label}", response_model=CoreBlock)
async def get_core(request: Request, user_id: UserId, label: Label) -> CoreBlock:
    """One of the user's core blocks."""
    memory, _ = _memory(request)
    try:
        blocks = await memory.core(TENANT, user_id)
    except _OUTAGE as exc:
        raise _unavailable(exc) from None
    for block in blocks:
        if block.label == label:
            return block
    raise HTTPException(404, f"user {user_id!r} has no core block {label!r}")


@router.delete("/core/{label}", status_code=204)
async def delete_core(request: Request, user_id: UserId, label: Label) -> Response:
    """Delete one of the user's core blocks (it leaves every prompt from the next turn)."""
    memory, _ = _memory(request)
    try:
        deleted = await memory.delete_core(TENANT, user_id, label)
    except _OUTAGE as exc:
        raise _unavailable(exc) from None
    if not deleted:
        raise HTTPException(404, f"user {user_id!r} has no core block {label!r}")
    return Response(status_code=204)


@router.put("/core/{label}", response_model=CoreBlock)
async def put_core(request: Request, user_id: UserId, label: Label, body: CoreIn) -> CoreBlock:
    """Create or replace a core block (its size is limited by the agents' core_block_limit)."""
    memory, limit = _memory(request)
    if len(body.value) > limit:
        raise HTTPException(
            422, f"body.value: {len(body.value)} characters is over the core block limit {limit}"
        )
    try:
        return await memory.set_core(TENANT, user_id, label, body.value, limit)
    except CoreBlocksFull as exc:
        raise HTTPException(409, f"path.label: {exc}") from None
    except _OUTAGE as exc:
        raise _unavailable(exc) from None
