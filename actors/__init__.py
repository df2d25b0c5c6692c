"""Conversation-thread actors: identity, turn logic, checkpoints and the thread directory."""

from actors.checkpoint import (
    Checkpoint,
    CheckpointStore,
    InMemoryCheckpointStore,
    RedisCheckpointStore,
)
from actors.key import ThreadKey
from actors.thread import AgentCaller, Thread

__all__ = [
    "AgentCaller",
    "Checkpoint",
    "CheckpointStore",
    "InMemoryCheckpointStore",
    "RedisCheckpointStore",
    "Thread",
    "ThreadKey",
]
