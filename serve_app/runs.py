"""Run workers: they drain the run queue through the ingress, one worker per partition.

A worker is a detached Ray actor (``runs/<app>/<partition>``), restarted by Ray if it dies.
It reads its partition's runs and delivers each one to the app's ingress deployment, which
sends it to the thread like a message posted to the API; the thread deduplicates by message
id. A thread's runs are delivered one after another, in the order they were queued; runs of
different threads go at once, up to ``runs.max_in_flight``. An outage (Redis, Ray, a thread
moving) is retried with backoff until it ends, holding the thread's later runs back, so
nothing is lost or reordered. A run still unfinished when its worker dies is delivered again
by the next incarnation, and answered from the thread's stored turn if it had run.

Workers are started by the ingress: for a partition when a run is queued in it, and at
start-up for every partition that holds runs (after a restart of the whole cluster). A
worker stops itself once its application has been deleted; runs left in Redis wait for the
app to be deployed again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import ray
from ray.exceptions import RayError

from actors.directory import NAMESPACE, root_cause
from actors.key import ThreadKey
from actors.redis_store import connect_redis
from actors.run_queue import QueuedRun, RunQueue
from stickyray.config import RunsConfig
from stickyray.errors import (
    CheckpointConflict,
    ProviderError,
    StoreUnavailable,
    ThreadFenced,
    ThreadPassivated,
    TurnPending,
)
from stickyray.metrics import record_run
from stickyray.turns import InboundMessage, TurnResult

__all__ = ["Deliver", "RunDispatcher", "RunWorker", "RunWorkers", "transient", "worker_name"]

log = logging.getLogger(__name__)

T = TypeVar("T")

Deliver = Callable[[ThreadKey, InboundMessage], Awaitable[TurnResult]]

# Errors that pass: delivering again later succeeds (the thread deduplicates the message).
_TRANSIENT = (
    StoreUnavailable,
    CheckpointConflict,
    TurnPending,
    ThreadFenced,
    ThreadPassivated,
    ProviderError,
    RayError,
    ConnectionError,
    TimeoutError,
)

# How often a worker checks that its application still exists.
_APP_CHECK_S = 10.0


def transient(exc: BaseException) -> bool:
    """Whether delivering a run failed for now (an outage) rather than for good."""
    from ray.serve.exceptions import RayServeException  # an app being deployed or deleted

    return isinstance(root_cause(exc), (*_TRANSIENT, RayServeException))


def worker_name(app: str, partition: int) -> str:
    """The Ray actor name of a partition's run worker."""
    return f"runs/{app}/{partition}"


def _queued_at(entry: str) -> float:
    """When a stream entry was added: its id starts with Redis's clock in milliseconds."""
    return int(entry.split("-", 1)[0]) / 1000.0


class RunDispatcher:
    """Delivers one partition's runs: in order per thread, concurrently across threads.

    A plain class, run by ``RunWorker`` and tested without Ray. At most ``max_in_flight``
    runs are being delivered, and at most four times that many are read ahead.
    """

    def __init__(
        self,
        queue: RunQueue,
        partition: int,
        deliver: Deliver,
        *,
        max_in_flight: int,
        app: str = "",
        retry_cap_s: float = 30.0,
    ) -> None:
        self._queue = queue
        self._partition = partition
        self._deliver = deliver
        self._app = app
        self._retry_cap_s = retry_cap_s
        self._running = asyncio.Semaphore(max_in_flight)
        self._max_read_ahead = 4 * max_in_flight
        self._read_ahead = 0
        self._room = asyncio.Event()
        self._room.set()
        # The last run of each thread with runs in hand: the next one waits for it.
        self._tails: dict[ThreadKey, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Deliver runs until cancelled: first those an earlier incarnation left, then new ones.

        Cancelled, it stops the deliveries in hand too: their runs stay in Redis, and the
        next incarnation delivers them again.
        """
        try:
            await self._drain()
        finally:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _drain(self) -> None:
        await self._retrying(self._queue.join, self._partition)
        after: str | None = "0"
        while after is not None:
            runs, after = await self._retrying(
                self._queue.read, self._partition, self._max_read_ahead, after=after
            )
            for run in runs:
                self._dispatch(run)
        while True:
            await self._room.wait()
            room = self._max_read_ahead - self._read_ahead
            runs, _ = await self._retrying(self._queue.read, self._partition, room)
            for run in runs:
                self._dispatch(run)

    @property
    def in_hand(self) -> int:
        """Runs read and not finished."""
        return self._read_ahead

    def _dispatch(self, run: QueuedRun) -> None:
        before = self._tails.get(run.key)
        task = asyncio.get_running_loop().create_task(self._process(run, before))
        self._tails[run.key] = task
        self._tasks.add(task)
        self._read_ahead += 1
        if self._read_ahead >= self._max_read_ahead:
            self._room.clear()
        task.add_done_callback(lambda done: self._done(run.key, done))

    def _done(self, key: ThreadKey, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._tails.get(key) is task:
            del self._tails[key]
        self._read_ahead -= 1
        self._room.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("run of %s failed in its worker", key, exc_info=task.exception())

    async def _process(self, run: QueuedRun, before: asyncio.Task[None] | None) -> None:
        if before is not None:
            await asyncio.wait([before])  # order is what matters; its outcome is its own
        async with self._running:
            record_run(self._app, waited=time.time() - _queued_at(run.entry))
            result, error = await self._deliver_until_done(run)
            await self._retrying(self._queue.finish, run, result=result, error=error)
            record_run(self._app, status=result.status if result is not None else "failed")

    async def _deliver_until_done(self, run: QueuedRun) -> tuple[TurnResult | None, str | None]:
        delay = 0.05
        while True:
            await self._retrying(self._queue.start, run)
            try:
                return await self._deliver(run.key, run.message), None
            except Exception as exc:
                cause = root_cause(exc)
                if not transient(exc):
                    log.warning(
                        "run %s of %s could not be delivered: %s",
                        run.message.message_id,
                        run.key,
                        type(cause).__name__,
                    )
                    return None, f"{type(cause).__name__}: {cause}"
                log.info(
                    "run %s of %s: %s; delivering again in %.2f s",
                    run.message.message_id,
                    run.key,
                    type(cause).__name__,
                    delay,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._retry_cap_s)

    async def _retrying(self, call: Callable[..., Awaitable[T]], *args: Any, **kw: Any) -> T:
        """``call(*args, **kw)``, again with backoff while Redis is unavailable."""
        delay = 0.05
        while True:
            try:
                return await call(*args, **kw)
            except StoreUnavailable as exc:
                log.warning("run queue %d: %s; trying again in %.2f s", self._partition, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


class RunWorker:
    """The Ray actor that runs one partition's ``RunDispatcher``."""

    async def __init__(  # type: ignore[misc]
        self, app: str, partition: int, redis_url: str, config: RunsConfig, ingress: str
    ) -> None:
        self._app = app
        self._partition = partition
        self._ingress = ingress
        self._handle: Any = None
        self._redis = connect_redis(redis_url)
        queue = RunQueue(self._redis, app, config)
        self._dispatcher = RunDispatcher(
            queue, partition, self._deliver, max_in_flight=config.max_in_flight, app=app
        )
        loop = asyncio.get_running_loop()
        self._loop = loop.create_task(self._dispatcher.run())
        self._loop.add_done_callback(self._stopped)
        self._watch = loop.create_task(self._watch_app())

    async def in_hand(self) -> int:
        """Runs read and not finished (also: the worker is up)."""
        return self._dispatcher.in_hand

    async def _deliver(self, key: ThreadKey, message: InboundMessage) -> TurnResult:
        if self._handle is None:
            from ray import serve

            self._handle = await asyncio.to_thread(
                serve.get_deployment_handle, self._ingress, self._app
            )
        result: TurnResult = await self._handle.deliver.remote(key.tenant, key.thread_id, message)
        return result

    def _stopped(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        # A bug, not an outage (those are retried): start again from what Redis holds.
        log.error(
            "run worker %s/%d stopped; restarting",
            self._app,
            self._partition,
            exc_info=task.exception(),
        )
        os._exit(1)

    async def _watch_app(self) -> None:
        # A timer, not a wait for a condition: the Serve controller has nothing to wait on.
        missing = 0
        while missing < 2:
            await asyncio.sleep(_APP_CHECK_S)
            try:
                present = await asyncio.to_thread(_app_exists, self._app)
            except Exception:  # the controller is unreachable: not the same as deleted
                continue
            missing = 0 if present else missing + 1
        log.info("application %s is gone: run worker stopping", self._app)
        self._loop.cancel()
        await self._redis.aclose()
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)


def _app_exists(app: str) -> bool:
    from ray import serve

    return app in serve.status().applications


_RemoteRunWorker = ray.remote(RunWorker)

# Detached: it outlives the ingress replica that started it. Restarted by Ray if it dies;
# it claims no CPU, since it only waits on Redis and the ingress.
_WORKER_OPTIONS: dict[str, Any] = {
    "namespace": NAMESPACE,
    "get_if_exists": True,
    "lifetime": "detached",
    "num_cpus": 0,
    "max_restarts": -1,
    "max_concurrency": 100,
}


class RunWorkers:
    """Starts an app's run workers (idempotent, from any number of ingress replicas)."""

    # A worker looked up this long ago is looked up again: one that stopped (its app was
    # deleted, then deployed again under the same name) is then started anew.
    LOOKUP_TTL_S = 30.0

    def __init__(self, app: str, redis_url: str, config: RunsConfig, ingress: str) -> None:
        self._app = app
        self._redis_url = redis_url
        self._config = config
        self._ingress = ingress
        self._started: dict[int, tuple[float, Any]] = {}

    async def ensure(self, partition: int) -> Any:
        """The worker of ``partition``, started if it is not running."""
        found = self._started.get(partition)
        if found is not None and time.monotonic() - found[0] < self.LOOKUP_TTL_S:
            return found[1]
        handle = await asyncio.to_thread(self._get_or_create, partition)
        self._started[partition] = (time.monotonic(), handle)
        return handle

    def _get_or_create(self, partition: int) -> Any:
        name = worker_name(self._app, partition)
        return _RemoteRunWorker.options(name=name, **_WORKER_OPTIONS).remote(
            self._app, partition, self._redis_url, self._config, self._ingress
        )
