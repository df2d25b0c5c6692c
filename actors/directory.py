"""The thread directory: the one place that maps a thread key to the actor serving it.

Two hosting strategies (``threads.hosting``): ``actor`` names one actor per thread from its
key; ``pooled`` names ``pool_size`` host actors per app and puts a thread in the host its key
hashes to (``actors.thread_host``). Either way actors are created with ``get_if_exists``, so
any number of concurrent first messages, from any number of ingress replicas, end in one
place. Handles are cached per process to skip the named-actor lookup on hot turns. When the
thread behind a handle is gone (actor killed, crashed, passivated, fenced) the message is
re-sent to the next incarnation with the same message id, which the thread deduplicates, so a
retry never runs a turn twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import zlib
from collections import OrderedDict
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

from actors.key import NAMESPACE, ThreadKey
from actors.thread_actor import ThreadActor
from actors.thread_host import ThreadHost
from stickyray.config import TeamConfig
from stickyray.errors import StoreUnavailable, ThreadFenced, ThreadPassivated
from stickyray.turns import InboundMessage, TurnResult

__all__ = [
    "NAMESPACE",
    "ThreadDirectory",
    "host_name",
    "passivate_actor",
    "passivate_thread",
    "pool_scope",
    "release_pool",
    "root_cause",
]

log = logging.getLogger(__name__)

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
_RemoteThreadHost = ray.remote(ThreadHost)

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


def _actor_id(handle: Any) -> str | None:
    """The id of the actor behind ``handle`` (hex), as the runtime context gives it."""
    actor_id = getattr(handle, "_actor_id", None)
    return actor_id.hex() if actor_id is not None else None


async def passivate_actor(name: str, actor_id: str | None = None, timeout_s: float = 60.0) -> None:
    """Ask the thread actor called ``name`` to passivate; return once Ray has released the name.

    With ``actor_id``, only that incarnation: a later one that took the name is left alone.
    Waiting for the name (not only the reply) is what keeps a node's live count at its cap:
    the actor that asked becomes alive only after its victims are gone.
    """
    handle = await asyncio.to_thread(_lookup, name)
    if handle is None:
        return
    if actor_id is not None and _actor_id(handle) not in (None, actor_id):
        # The name is a later incarnation's, maybe one still in its constructor (the caller
        # itself, or one waiting on its own victims): a call would wait for it to be up.
        log.info("thread actor %s is a later incarnation than %s: left alone", name, actor_id)
        return
    try:
        # Without an id, called as the previous release's actors expect (no argument, None
        # back): after a deploy they keep serving until they idle out.
        if actor_id is None:
            await handle.passivate.remote()
        elif await handle.passivate.remote(actor_id) is False:
            log.info("thread actor %s is a later incarnation than %s: left alone", name, actor_id)
            return
    except RayActorError:
        # Already dead, so no longer live on its node. Its name may by now be a later
        # incarnation's, which waiting for the name to be released would wait on.
        return
    ray.kill(handle, no_restart=True)  # its state is stored; waiting buys nothing
    killed = _actor_id(handle)
    deadline = time.monotonic() + timeout_s
    delay = 0.01
    while (holder := await asyncio.to_thread(_lookup, name)) is not None:
        if killed is not None and _actor_id(holder) != killed:
            # Released, and taken again by the next incarnation (the killed one's messages,
            # re-sent at once): waiting for the name to be free would wait out the timeout.
            return
        if time.monotonic() > deadline:
            log.warning(
                "thread actor %s still registered %.0f s after passivation", name, timeout_s
            )
            return
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.2)


def pool_scope(app_name: str, team: TeamConfig) -> str:
    """The part of host names that belongs to one app and one version of its config.

    A deploy that changes the config gets new hosts; threads move to them on their next
    message (the new incarnation's epoch fences the old one) and the old hosts idle out.
    """
    fingerprint = hashlib.sha1(team.model_dump_json().encode()).hexdigest()[:10]
    return f"{app_name}/{fingerprint}"


def _host_name(scope: str, index: int) -> str:
    return f"threadhost/{scope}/{index}"


def host_name(scope: str, key: ThreadKey, pool_size: int) -> str:
    """The name of the host actor that carries ``key`` (a stable hash, same in every process)."""
    return _host_name(scope, zlib.crc32(str(key).encode()) % pool_size)


async def passivate_thread(key: ThreadKey, team: TeamConfig, scope: str) -> None:
    """Close the thread ``key`` now rather than at its idle timeout, whatever the hosting."""
    if team.threads.hosting == "actor":
        await passivate_actor(key.actor_name)
        return
    host = await asyncio.to_thread(_lookup, host_name(scope, key, team.threads.pool_size))
    if host is not None:
        try:
            await host.passivate.remote(key)
        except RayActorError:
            pass  # the host is gone, and the thread with it; its state is stored


async def release_pool(team: TeamConfig, scope: str) -> None:
    """Stop the pool's hosts once the app that used them is gone; their threads are stored."""
    if team.threads.hosting != "pooled":
        return
    for index in range(team.threads.pool_size):
        host = await asyncio.to_thread(_lookup, _host_name(scope, index))
        if host is not None:
            ray.kill(host, no_restart=True)


class ThreadDirectory:
    """Finds or creates the thread actor for a key and delivers messages to it."""

    def __init__(
        self,
        team: TeamConfig,
        redis_url: str,
        agent_handles: dict[str, Any],
        scope: str = "default",
        cache_size: int = 10_000,
        *,
        app: str,
    ) -> None:
        self._team = team
        self._app = app  # the Serve application the threads' metrics are labelled with
        self._redis_url = redis_url
        self._agent_handles = agent_handles
        self._scope = scope
        self._pooled = team.threads.hosting == "pooled"
        # Actor name -> handle: thread actors, or the few hosts of the pool.
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._cache_size = cache_size
        self._creating: dict[str, asyncio.Future[Any]] = {}

    def _name(self, key: ThreadKey) -> str:
        if self._pooled:
            return host_name(self._scope, key, self._team.threads.pool_size)
        return key.actor_name

    def _get_or_create(self, key: ThreadKey, name: str) -> Any:
        if self._pooled:
            return _RemoteThreadHost.options(name=name, **_ACTOR_OPTIONS).remote(
                self._team, self._redis_url, self._agent_handles, self._app, name
            )
        return _RemoteThreadActor.options(name=name, **_ACTOR_OPTIONS).remote(
            key, self._team, self._redis_url, self._agent_handles, self._app
        )

    async def actor(self, key: ThreadKey) -> Any:
        """The actor serving ``key`` (its own, or its host), created if needed."""
        name = self._name(key)
        handle = self._cache.get(name)
        if handle is not None:
            self._cache.move_to_end(name)
            return handle
        pending = self._creating.get(name)
        if pending is None:
            # One lookup per name per process, however many messages arrive at once; the
            # lookup blocks on the GCS, so it runs off the event loop.
            pending = asyncio.ensure_future(asyncio.to_thread(self._get_or_create, key, name))
            self._creating[name] = pending
            pending.add_done_callback(lambda _: self._creating.pop(name, None))
        # Shielded: one waiter cancelled (its client gone) must not cancel the others' lookup.
        handle = await asyncio.shield(pending)
        self._cache[name] = handle
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return handle

    def forget(self, key: ThreadKey, handle: Any) -> None:
        """Drop a cached handle, unless it was already replaced by a newer one."""
        name = self._name(key)
        if self._cache.get(name) is handle:
            del self._cache[name]

    def _deliver(self, actor: Any, key: ThreadKey, message: InboundMessage) -> Any:
        if self._pooled:
            return actor.handle.remote(key, message)
        return actor.handle.remote(message)

    async def send(self, key: ThreadKey, message: InboundMessage) -> TurnResult:
        """Deliver ``message`` to the thread's current incarnation; return the turn's result."""
        delay = 0.02
        for delivery in range(1, _MAX_DELIVERIES + 1):
            actor = await self.actor(key)
            try:
                result: TurnResult = await self._deliver(actor, key, message)
                return result
            except Exception as exc:
                cause = root_cause(exc)
                if not isinstance(cause, _GONE):
                    raise
                if self._pooled:
                    # A host drops a fenced or passivated thread itself and stays.
                    if not isinstance(cause, ThreadFenced | ThreadPassivated):
                        self.forget(key, actor)
                else:
                    self.forget(key, actor)
                    if isinstance(cause, ThreadFenced):
                        # A superseded incarnation must not keep the name; its state is safe.
                        ray.kill(actor, no_restart=True)
                if isinstance(cause, ActorDiedError) and _creation_failed(cause):
                    # Redis down as the actor opened the thread is an outage like any other
                    # (a 503, a queued run retried), not an actor that can never start.
                    outage = _creation_error(cause)
                    if isinstance(outage, StoreUnavailable):
                        raise outage from exc
                    raise
                if delivery == _MAX_DELIVERIES:
                    raise
                log.info("thread %s: %s; delivering again", key, type(cause).__name__)
                await asyncio.sleep(delay)  # back off while Ray releases the old name
                delay = min(delay * 2, 1.0)
        raise AssertionError("unreachable")


def _creation_failed(exc: BaseException) -> bool:
    """Whether the actor died in its constructor: delivering again at once will not help."""
    return isinstance(exc, ActorDiedError) and "creation task" in str(exc).lower()


def _creation_error(exc: ActorDiedError) -> BaseException | None:
    """The error an actor's constructor raised, when Ray kept it.

    Ray builds the caller's ActorDiedError from the constructor's RayTaskError, which it
    keeps only as the error's argument (the message has its text, not its class).
    """
    wrapped = exc.args[0] if exc.args else None
    if isinstance(wrapped, RayTaskError):
        return root_cause(wrapped)
    return None
