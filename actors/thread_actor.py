"""The Ray actor that hosts one ``Thread``. Created only by ``actors.directory``.

It registers with its node's live set before it counts as alive (passivating the least
recently used threads if the node is over ``max_live_threads``), opens the thread (new epoch,
checkpoint restored, a pending turn resolved), and passivates itself after
``idle_timeout_s`` without messages.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import ray

from actors.agent_client import ServeAgentCaller
from actors.key import ThreadKey
from actors.liveness import Incarnation, LiveThreads
from actors.redis_store import RedisThreadStore, connect_redis
from actors.thread import Thread
from stickyray.config import TeamConfig
from stickyray.metrics import TurnReporter
from stickyray.turns import InboundMessage, TurnResult

__all__ = ["ThreadActor"]

log = logging.getLogger(__name__)

# How long a passivated actor waits for its caller to kill it (that takes milliseconds).
_KILL_GRACE_S = 10.0


class ThreadActor:
    """One conversation thread as a Ray actor."""

    async def __init__(  # type: ignore[misc]
        self,
        key: ThreadKey,
        team: TeamConfig,
        redis_url: str,
        agent_handles: dict[str, Any],
        app: str,
    ) -> None:
        from actors.directory import passivate_actor  # the directory owns name -> actor

        threads = team.threads
        self._key = key
        self._redis = connect_redis(redis_url)
        context = ray.get_runtime_context()
        actor_id = context.get_actor_id()
        if actor_id is None:  # only Ray creates this class, as an actor
            raise RuntimeError("ThreadActor runs only as a Ray actor")
        self._me = Incarnation(key.actor_name, actor_id)
        self._live = LiveThreads(
            self._redis,
            context.get_node_id(),
            threads.max_live_threads,
            idle_timeout_s=threads.idle_timeout_s,
        )
        # An entry left by an earlier incarnation of this very thread (one that crashed) names
        # this actor now: asking it to passivate would wait on this constructor for ever.
        victims = [v for v in await self._live.activate(self._me) if v.name != self._me.name]
        if victims:
            log.info("passivating %d least recently used threads for %s", len(victims), key)
            await asyncio.gather(*(passivate_actor(v.name, v.actor_id) for v in victims))
        store = RedisThreadStore(
            self._redis, ttl_s=threads.checkpoint_ttl_s, message_id_ttl_s=threads.message_id_ttl_s
        )
        self._thread = await Thread.open(
            key,
            team,
            store,
            ServeAgentCaller(agent_handles),
            observe=TurnReporter(app, team.supervisor.name),
        )
        self._idle_timeout_s = threads.idle_timeout_s
        self._passivating = False
        self._idle_watch = asyncio.get_running_loop().create_task(self._watch_idle())

    async def handle(self, message: InboundMessage) -> TurnResult:
        """Run one message through the thread."""
        result = await self._thread.handle(message)
        try:
            await self._live.touch(self._me)
        except Exception:  # LRU order is best effort; the turn is already stored
            log.debug("could not refresh live set", exc_info=True)
        return result

    async def epoch(self) -> int:
        """The incarnation's fencing token."""
        return self._thread.epoch

    async def passivate(self, actor_id: str | None = None) -> bool:
        """Finish the turn in progress and leave the live set; the caller then kills the actor.

        With ``actor_id``, only if this is that incarnation: False (and nothing done) means
        the name now belongs to a later one, which must be left alone.
        Messages that arrive meanwhile get ThreadPassivated; the directory re-sends them to
        the next incarnation. (``exit_actor`` is not used: with Serve handles open, a graceful
        worker exit can take a minute before Ray releases the actor's name.)
        """
        if actor_id is not None and actor_id != self._me.actor_id:
            return False
        self._passivating = True
        await self._thread.close()
        try:
            await self._live.remove(self._me)
        except Exception:
            log.debug("could not leave live set", exc_info=True)
        self._idle_watch.cancel()
        # The caller kills this actor next. Should it never (it failed or was cancelled in
        # between), the closed actor would keep the thread's name and bounce every message
        # until the client gave up: it stops itself a while later.
        self._idle_watch = asyncio.get_running_loop().create_task(self._stop_unless_killed())
        return True

    async def _stop_unless_killed(self) -> None:
        await asyncio.sleep(_KILL_GRACE_S)
        log.warning("thread %s passivated but still running: stopping itself", self._key)
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    async def _watch_idle(self) -> None:
        # A timer, not a wait for a condition: it wakes a few times per timeout to compare.
        interval = min(max(self._idle_timeout_s / 4, 0.05), 30.0)
        while True:
            await asyncio.sleep(interval)
            idle = time.time() - self._thread.last_active
            if idle >= self._idle_timeout_s and not self._thread.busy and not self._passivating:
                log.info("thread %s idle for %.0f s: passivating", self._key, idle)
                self._passivating = True
                try:
                    await self._thread.close()
                    await self._live.remove(self._me)
                except Exception:  # the live set is best effort; a closed actor must go
                    log.debug("could not leave live set", exc_info=True)
                finally:
                    # Closed, it only answers ThreadPassivated: alive, it would keep the
                    # thread's name, and every message would bounce until the client gave up.
                    ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
                return
