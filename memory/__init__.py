"""Short- and long-term memory of conversations."""

from memory.buffer import BufferEntry, ShortTermBuffer

__all__ = ["BufferEntry", "ShortTermBuffer"]
