"""Conversation-thread actors: identity, turn logic, stores and the thread directory."""

from actors.key import ThreadKey
from actors.redis_store import RedisThreadStore
from actors.store import Checkpoint, InMemoryThreadStore, ThreadStore, ThreadView
from actors.thread import Thread
from actors.turn_agents import AgentCaller

__all__ = [
    "AgentCaller",
    "Checkpoint",
    "InMemoryThreadStore",
    "RedisThreadStore",
    "Thread",
    "ThreadKey",
    "ThreadStore",
    "ThreadView",
]
