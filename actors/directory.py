"""The thread directory: the one place that maps a thread key to the actor serving it.

Actors are named from the key and created with ``get_if_exists``, so any number of concurrent
first messages, from any number of ingress replicas, end on one actor. Handles are cached per
process to skip the named-actor lookup on hot turns. When the actor behind a handle is gone
(killed, crashed, passivated, fenced) the message is re-sent to the next incarnation with the
same message id, which the thread deduplicates, so a retry never runs a turn twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

from actors.key import ThreadKey
from actors.thread_actor import ThreadActor
from stickyray.config import TeamConfig
from stickyray.errors import ThreadFenced, ThreadPassivated
from stickyray.turns import InboundMessage, TurnResult

__all__ = ["NAMESPACE", "ThreadDirectory", "passivate_actor", "root_cause"]

log = logging.getLogger(__name__)

NAMESPACE = "stickyray"

# Thread actors wait on I/O, so they claim no CPU; detached so that they outlive the ingress
# replica that created them (any replica may route to any thread). Ray does not restart them:
# the next message recreates the actor, which restores itself from Redis.
_ACTOR_OPTIONS: dict[str, Any] = {
    "namespace": NAMESPACE,
    "get_if_exists": True,
    "lifetime": "detached",
    "num_cpus": 0,
    "max_restarts": 0,
    "max_concurrency": 1000,
}

_RemoteThreadActor = ray.remote(ThreadActor)

_GONE = (ActorDiedError, ActorUnavailableError, ThreadPassivated, ThreadFenced)
_MAX_DELIVERIES = 10


def root_cause(exc: BaseException) -> BaseException:
    """Unwrap Ray's task-error wrapping (possibly nested) down to the error raised."""
    while isinstance(exc, RayTaskError) and exc.cause is not None:
        exc = exc.cause
    return exc


def _lookup(name: str) -> Any | None:
    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return None


async def passivate_actor(name: str, timeout_s: float = 60.0) -> None:
    """Ask the thread actor called ``name`` to passivate; return once Ray has released the name.

    Waiting for the name (not only the reply) is what keeps a node's live count at its cap:
    the actor that asked becomes alive only after its victims are gone.
    """
    handle = await asyncio.to_thread(_lookup, name)
    if handle is None:
        return
    try:
        await handle.passivate.remote()
    except RayActorError:
        pass  # already gone
    ray.kill(handle, no_restart=True)  # its state is stored; waiting buys nothing
    deadline = time.monotonic() + timeout_s
    delay = 0.01
    while await asyncio.to_thread(_lookup, name) is not None:
        if time.monotonic() > deadline:
            log.warning(
                "thread actor %s still registered %.0f s after passivation", name, timeout_s
            )
            return
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.2)


class ThreadDirectory:
    """Finds or creates the thread actor for a key and delivers messages to it."""

    def __init__(
        self,
        team: TeamConfig,
        redis_url: str,
        agent_handles: dict[str, Any],
        cache_size: int = 10_000,
    ) -> None:
        self._team = team
        self._redis_url = redis_url
        self._agent_handles = agent_handles
        self._cache: OrderedDict[ThreadKey, Any] = OrderedDict()
        self._cache_size = cache_size
        self._creating: dict[ThreadKey, asyncio.Future[Any]] = {}

    def _get_or_create(self, key: ThreadKey) -> Any:
        return _RemoteThreadActor.options(name=key.actor_name, **_ACTOR_OPTIONS).remote(
            key, self._team, self._redis_url, self._agent_handles
        )

    async def actor(self, key: ThreadKey) -> Any:
        """The actor for ``key``, created (and restored from its checkpoint) if needed."""
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

    def forget(self, key: ThreadKey, handle: Any) -> None:
        """Drop a cached handle, unless it was already replaced by a newer one."""
        if self._cache.get(key) is handle:
            del self._cache[key]

    async def send(self, key: ThreadKey, message: InboundMessage) -> TurnResult:
        """Deliver ``message`` to the thread's current incarnation; return the turn's result."""
        delay = 0.02
        for delivery in range(1, _MAX_DELIVERIES + 1):
            actor = await self.actor(key)
            try:
                result: TurnResult = await actor.handle.remote(message)
                return result
            except Exception as exc:
                cause = root_cause(exc)
                if not isinstance(cause, _GONE):
                    raise
                self.forget(key, actor)
                if isinstance(cause, ThreadFenced):
                    # A superseded incarnation must not keep the name; its state is safe.
                    ray.kill(actor, no_restart=True)
                if _creation_failed(cause) or delivery == _MAX_DELIVERIES:
                    raise
                log.info("thread %s: %s; delivering again", key, type(cause).__name__)
                await asyncio.sleep(delay)  # back off while Ray releases the old name
                delay = min(delay * 2, 1.0)
        raise AssertionError("unreachable")


def _creation_failed(exc: BaseException) -> bool:
    """Whether the actor died in its constructor (e.g. Redis down): retrying will not help."""
    return isinstance(exc, ActorDiedError) and "creation task" in str(exc).lower()
