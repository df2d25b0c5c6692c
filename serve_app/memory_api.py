"""HTTP routes of long-term memory: the memories and core blocks of a user, or of a thread."""

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator
from ray.exceptions import RayError

from actors.key import DEFAULT_TENANT, ID_PATTERN, ThreadKey
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
from stickyray.agent_config import AGENT_NAME_PATTERN
from stickyray.errors import CoreBlocksFull, ProviderError, StoreUnavailable
from stickyray.turns import anonymous_owner

__all__ = ["thread_router", "user_router"]

TENANT = DEFAULT_TENANT


@dataclass(frozen=True)
class Owner:
    """Whose memories a route reads: ``id`` in the store, ``name`` in its messages."""

    id: str
    name: str


def _user(
    user_id: Annotated[str, Path(pattern=ID_PATTERN, description="Whose memories.")],
) -> Owner:
    return Owner(user_id, f"user {user_id!r}")


def _thread(
    thread_id: Annotated[
        str, Path(pattern=ID_PATTERN, description="A thread whose messages carry no user_id.")
    ],
) -> Owner:
    return Owner(anonymous_owner(str(ThreadKey.of(thread_id, TENANT))), f"thread {thread_id!r}")


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
    """Result of a memory search: ``user_id`` is the memories' owner in the store."""

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


Label = Annotated[str, Path(pattern=CORE_LABEL_PATTERN, description="e.g. user_profile")]


def _routes(prefix: str, whose: Callable[..., Owner]) -> APIRouter:
    """The memory routes of one kind of owner (a user, or a thread without users)."""
    router = APIRouter(prefix=prefix, tags=["memory"])
    # The routes are closures, which Serve pickles by value with only the names their code
    # uses: their annotations are objects, not names (no `from __future__ import annotations`).
    who = Depends(whose)

    @router.get("/memories", response_model=MemorySearch)
    async def search_memories(
        request: Request,
        query: Annotated[str, Query(min_length=1, description="What to look for.")],
        k: Annotated[int, Query(ge=1, le=100)] = 10,
        # Empty is absent, as HTML forms and query builders send an unset field.
        kind: Annotated[Literal["episodic", "semantic", ""] | None, Query()] = None,
        owner: Owner = who,
    ) -> MemorySearch:
        """The user's memories that best match ``query`` (similarity, recency, importance)."""
        memory, _ = _memory(request)
        try:
            hits = await memory.recall(TENANT, owner.id, query, k, kinds=[kind] if kind else None)
        except _OUTAGE as exc:
            raise _unavailable(exc) from None
        return MemorySearch(user_id=owner.id, memories=hits)

    @router.post("/memories", response_model=MemoryRecord, status_code=201)
    async def add_memory(request: Request, body: MemoryIn, owner: Owner = who) -> MemoryRecord:
        """Store a memory for the owner."""
        memory, _ = _memory(request)
        try:
            return await memory.remember(TENANT, owner.id, NewMemory(**body.model_dump()))
        except _OUTAGE as exc:
            raise _unavailable(exc) from None

    @router.delete("/memories/{memory_id}", status_code=204)
    async def delete_memory(request: Request, memory_id: str, owner: Owner = who) -> Response:
        """Delete one of the owner's memories."""
        memory, _ = _memory(request)
        try:
            canonical = str(uuid.UUID(memory_id))
        except ValueError:
            canonical = None
        # Any case of the UUID's canonical form; not the braced or unhyphenated ones UUID() takes.
        valid = canonical is not None and canonical == memory_id.lower()
        try:
            deleted = valid and await memory.forget(TENANT, owner.id, canonical or memory_id)
        except _OUTAGE as exc:
            raise _unavailable(exc) from None
        if not deleted:
            raise HTTPException(404, f"{owner.name} has no memory {memory_id!r}")
        return Response(status_code=204)

    @router.get("/core/{label}", response_model=CoreBlock)
    async def get_core(request: Request, label: Label, owner: Owner = who) -> CoreBlock:
        """One of the owner's core blocks."""
        memory, _ = _memory(request)
        try:
            blocks = await memory.core(TENANT, owner.id)
        except _OUTAGE as exc:
            raise _unavailable(exc) from None
        for block in blocks:
            if block.label == label:
                return block
        raise HTTPException(404, f"{owner.name} has no core block {label!r}")

    @router.delete("/core/{label}", status_code=204)
    async def delete_core(request: Request, label: Label, owner: Owner = who) -> Response:
        """Delete one of the owner's core blocks (it leaves every prompt from the next turn)."""
        memory, _ = _memory(request)
        try:
            deleted = await memory.delete_core(TENANT, owner.id, label)
        except _OUTAGE as exc:
            raise _unavailable(exc) from None
        if not deleted:
            raise HTTPException(404, f"{owner.name} has no core block {label!r}")
        return Response(status_code=204)

    @router.put("/core/{label}", response_model=CoreBlock)
    async def put_core(
        request: Request, label: Label, body: CoreIn, owner: Owner = who
    ) -> CoreBlock:
        """Create or replace a core block (its size is limited by the agents' core_block_limit)."""
        memory, limit = _memory(request)
        if len(body.value) > limit:
            raise HTTPException(
                422,
                f"body.value: {len(body.value)} characters is over the core block limit {limit}",
            )
        try:
            return await memory.set_core(TENANT, owner.id, label, body.value, limit)
        except CoreBlocksFull as exc:
            raise HTTPException(409, f"path.label: {exc}") from None
        except _OUTAGE as exc:
            raise _unavailable(exc) from None

    return router


user_router = _routes("/v1/users/{user_id}", _user)
# An anonymous thread's memories (its messages carry no user_id) are the thread's own.
thread_router = _routes("/v1/threads/{thread_id}", _thread)
