"""The Ray actor that hosts one ``Thread``. Created only by ``actors.directory``."""

from __future__ import annotations

from typing import Any

from actors.agent_client import ServeAgentCaller
from actors.checkpoint import RedisCheckpointStore, connect_redis
from actors.key import ThreadKey
from actors.thread import Thread
from stickyray.config import TeamConfig
from stickyray.turns import InboundMessage, ThreadSnapshot, TurnResult

__all__ = ["ThreadActor"]


class ThreadActor:
    """One conversation thread as a Ray actor; restores from its checkpoint on construction."""

    async def __init__(  # type: ignore[misc]
        self,
        key: ThreadKey,
        team: TeamConfig,
        redis_url: str,
        agent_handles: dict[str, Any],
        checkpoint_ttl_s: int,
    ) -> None:
        self._redis = connect_redis(redis_url)
        store = RedisCheckpointStore(self._redis, ttl_s=checkpoint_ttl_s)
        self._thread = await Thread.restore(key, team, store, ServeAgentCaller(agent_handles))

    async def handle(self, message: InboundMessage) -> TurnResult:
        """Run one message through the thread."""
        return await self._thread.handle(message)

    async def snapshot(self) -> ThreadSnapshot:
        """The thread's in-memory state."""
        return self._thread.snapshot()
