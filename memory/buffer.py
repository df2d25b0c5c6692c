"""The short-term buffer: the last N messages of a thread, owned by its thread actor."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["BufferEntry", "ShortTermBuffer"]


class BufferEntry(BaseModel):
    """One message of the conversation as the thread remembers it.

    ``user_id`` is the user of the turn it belongs to (the sender of the message, or the one
    the reply answered): whose long-term memory it joins when it leaves the buffer.
    """

    # Stored in checkpoints: an instance on an older release must read what a newer one
    # wrote during a rolling deploy.
    model_config = ConfigDict(extra="ignore", frozen=True)

    role: Literal["user", "assistant"]
    text: str
    turn: int
    agent: str | None = None
    user_id: str | None = None
    # The tool calls its turn ran (``TurnResult.actions``), on the turn's last entry: what
    # was done stays known to later turns, also when the turn failed after doing it.
    actions: list[str] = Field(default_factory=list)


class ShortTermBuffer:
    """A bounded window of the most recent messages; the oldest fall out first."""

    def __init__(self, max_messages: int, entries: Iterable[BufferEntry] = ()) -> None:
        if max_messages < 1:
            raise ValueError("max_messages must be at least 1")
        self.max_messages = max_messages
        self._entries: deque[BufferEntry] = deque(entries, maxlen=max_messages)

    def append(self, entry: BufferEntry) -> None:
        """Add a message, dropping the oldest when the window is full."""
        self._entries.append(entry)

    def clear(self) -> None:
        """Forget every message."""
        self._entries.clear()

    def entries(self) -> list[BufferEntry]:
        """The messages, oldest first."""
        return list(self._entries)

    def __iter__(self) -> Iterator[BufferEntry]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
