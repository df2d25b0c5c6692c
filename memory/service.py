"""Long-term memory as agents and the API use it: a store plus an embedder."""

from __future__ import annotations

from datetime import UTC, datetime

from memory.buffer import BufferEntry
from memory.embedders import Embedder
from memory.long_term import (
    MAX_CONTENT_CHARS,
    CoreBlock,
    MemoryHit,
    MemoryKind,
    MemoryRecord,
    MemoryStore,
    NewMemory,
    SearchWeights,
    storable_text,
)

__all__ = ["DEFAULT_MAX_CORE_BLOCKS", "LongTermMemory", "extractive_summary"]

DEFAULT_MAX_CORE_BLOCKS = 20


class LongTermMemory:
    """Embeds text on the way in and out of a MemoryStore.

    A user has at most ``max_core_blocks`` core blocks: every one is in every prompt, so
    without a bound a model told to keep notes could fill the context window.
    """

    def __init__(
        self,
        store: MemoryStore,
        embedder: Embedder,
        weights: SearchWeights | None = None,
        max_core_blocks: int = DEFAULT_MAX_CORE_BLOCKS,
    ) -> None:
        if store.dimension != embedder.dimension:
            raise ValueError(
                f"the memory store holds {store.dimension}-dimensional embeddings but the "
                f"embedder gives {embedder.dimension}; use the embedder the store was built "
                "with, or a new database"
            )
        self.store = store
        self._embedder = embedder
        self._weights = weights or SearchWeights()
        self.max_core_blocks = max_core_blocks

    async def remember(self, tenant: str, user_id: str, memory: NewMemory) -> MemoryRecord:
        """Store one memory."""
        vectors = await self._embedder.embed([memory.content])
        (record,) = await self.store.add(tenant, user_id, [memory], vectors)
        return record

    async def recall(
        self,
        tenant: str,
        user_id: str,
        query: str,
        k: int,
        kinds: list[MemoryKind] | None = None,
        agent: str | None = None,
        half_life_days: float | None = None,
    ) -> list[MemoryHit]:
        """The k memories that best match ``query`` (similarity, recency, importance)."""
        if k <= 0:
            return []
        weights = self._weights
        if half_life_days is not None:
            weights = weights.model_copy(update={"half_life_days": half_life_days})
        (vector,) = await self._embedder.embed([query])
        return await self.store.search(tenant, user_id, vector, k, kinds, agent, weights)

    async def forget(self, tenant: str, user_id: str, memory_id: str) -> bool:
        """Delete one memory."""
        return await self.store.delete(tenant, user_id, memory_id)

    async def core(self, tenant: str, user_id: str) -> list[CoreBlock]:
        """The user's core blocks."""
        return await self.store.get_core(tenant, user_id)

    async def set_core(
        self, tenant: str, user_id: str, label: str, value: str, limit: int
    ) -> CoreBlock:
        """Create or replace a core block.

        ValueError when over ``limit`` or not storable; CoreBlocksFull for a new label when
        the user has ``max_core_blocks`` already.
        """
        return await self.store.put_core(
            tenant, user_id, label, storable_text(value), limit, self.max_core_blocks
        )

    async def delete_core(self, tenant: str, user_id: str, label: str) -> bool:
        """Delete one core block; False if the user has none with that label."""
        return await self.store.delete_core(tenant, user_id, label)


def extractive_summary(entries: list[BufferEntry], max_chars: int = MAX_CONTENT_CHARS) -> str:
    """A summary with no model: the messages themselves, dated, in at most ``max_chars``.

    What users tell an assistant (names, ids, preferences) is in their own messages, so
    those are kept whole and replies are cut short (to 200 characters). When that is still
    too long, replies are left out, oldest first; the rest stays in time order. When the
    user's messages alone are too long, their start is left out: the latest words stay, as
    the likeliest to still be true.
    """
    if not entries:
        return ""
    turns = sorted({e.turn for e in entries})
    stamp = datetime.now(UTC).strftime("%Y-%m-%d")
    head = f"Conversation excerpt ({stamp}, turns {turns[0]}-{turns[-1]}):"
    lines = []
    for entry in entries:
        if entry.role == "user":
            lines.append(f"user: {entry.text}")
        else:
            reply = entry.text if len(entry.text) <= 200 else entry.text[:197] + "..."
            lines.append(f"{entry.agent or 'assistant'}: {reply}")
    size = len(head) + sum(len(line) + 1 for line in lines)
    left_out = set()
    for i, entry in enumerate(entries):
        if size <= max_chars:
            break
        if entry.role != "user":
            left_out.add(i)
            size -= len(lines[i]) + 1
    body = "\n".join(line for i, line in enumerate(lines) if i not in left_out)
    if size > max_chars:
        room = max(max_chars - len(head) - len("\n..."), 0)
        body = "..." + body[len(body) - room :]
    return f"{head}\n{body}"
