"""The thread directory: the one place that maps a thread key to the actor serving it.

Actors are named from the key and created with ``get_if_exists``, so any number of concurrent
first messages, from any number of ingress replicas, end on one actor. Handles are cached per
process to skip the named-actor lookup on hot turns.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError

from actors.checkpoint import DEFAULT_TTL_S
from actors.key import ThreadKey
from actors.thread_actor import ThreadActor
from stickyray.config import TeamConfig
from stickyray.turns import InboundMessage, TurnResult

__all__ = ["NAMESPACE", "ThreadDirectory"]

log = logging.getLogger(__name__)

NAMESPACE = "stickyray"

# Thread actors wait on I/O, so they claim no CPU; detached so that they outlive the ingress
# replica that created them (any replica may route to any thread).
_ACTOR_OPTIONS: dict[str, Any] = {
    "namespace": NAMESPACE,
    "get_if_exists": True,
    "lifetime": "detached",
    "num_cpus": 0,
    "max_restarts": 0,
    "max_concurrency": 1000,
}

_RemoteThreadActor = ray.remote(ThreadActor)


class ThreadDirectory:
    """Finds or creates the thread actor for a key and sends it messages."""

    def __init__(
        self,
        team: TeamConfig,
        redis_url: str,
        agent_handles: dict[str, Any],
        checkpoint_ttl_s: int = DEFAULT_TTL_S,
        cache_size: int = 10_000,
    ) -> None:
        self._team = team
        self._redis_url = redis_url
        self._agent_handles = agent_handles
        self._ttl_s = checkpoint_ttl_s
        self._cache: OrderedDict[ThreadKey, Any] = OrderedDict()
        self._cache_size = cache_size
        self._creating: dict[ThreadKey, asyncio.Future[Any]] = {}

    def _get_or_create(self, key: ThreadKey) -> Any:
        return _RemoteThreadActor.options(name=key.actor_name, **_ACTOR_OPTIONS).remote(
            key, self._team, self._redis_url, self._agent_handles, self._ttl_s
        )

    async def actor(self, key: ThreadKey) -> Any:
        """The live actor for ``key``, created (and restored from its checkpoint) if needed."""
        handle = self._cache.get(key)
        if handle is not None:
            self._cache.move_to_end(key)
            return handle
        pending = self._creating.get(key)
        if pending is None:
            # One lookup per key per process, however many messages arrive at once; the
            # lookup blocks on the GCS, so it runs off the event loop.
            pending = asyncio.ensure_future(asyncio.to_thread(self._get_or_create, key))
            self._creating[key] = pending
            pending.add_done_callback(lambda _: self._creating.pop(key, None))
        handle = await pending
        self._cache[key] = handle
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return handle

    def forget(self, key: ThreadKey) -> None:
        """Drop a cached handle (its actor died)."""
        self._cache.pop(key, None)

    async def send(self, key: ThreadKey, message: InboundMessage) -> TurnResult:
        """Deliver ``message`` to the thread's actor and return the turn's result.

        A cached handle can point at an actor that has since died; the message is then
        delivered once to a fresh actor, which restores the thread from its checkpoint.
        """
        for attempt in (1, 2):
            actor = await self.actor(key)
            try:
                result: TurnResult = await actor.handle.remote(message)
                return result
            except (ActorDiedError, ActorUnavailableError):
                self.forget(key)
                if attempt == 2:
                    raise
                log.warning("thread actor %s is gone; recreating it", key)
        raise AssertionError("unreachable")
