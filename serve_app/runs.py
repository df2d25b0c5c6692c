"""The run dispatcher: it drains the app's run queue into the threads.

The run worker (``serve_app.run_worker``) runs it. It reads the queue and sends each run to
its thread through the thread directory, as the ingress sends a posted message; the thread
deduplicates by message id.

- A thread's runs are delivered one after another, in the order they were queued; runs of
  different threads go at once, up to ``runs.max_in_flight``.
- An outage (Redis, Ray, a thread moving) is retried with backoff, holding that thread's
  later runs back, until it ends or ``runs.give_up_after_s`` has passed since the run's
  first outage; any other error fails the run.
- Only the worker that holds the queue's lease reads it, so while a deploy replaces the
  worker, the old and new ones never split a thread's runs between them.
- A run still unfinished when its worker stopped is delivered again by the next one, and
  answered from the thread's stored turn if it had run.
- A run from a channel (Telegram, WhatsApp) has its reply put in the queue's outbox as it
  finishes; the worker sends the outbox's replies through the channel, in order per chat,
  retrying the channel's outages for up to ``runs.reply_give_up_after_s``. A run queued
  with a webhook URL has its outcome POSTed there the same way, in order per thread
  (``serve_app.run_outbox``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ray.exceptions import ActorDiedError, RayError, RayTaskError

from actors.directory import root_cause
from actors.key import ThreadKey
from actors.run_queue import LeaseLost, RunQueue
from actors.run_records import QueuedRun
from serve_app.run_outbox import BATCH, Outbox, SendReply, SendWebhook, Stopping
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

__all__ = [
    "Deliver",
    "RunDispatcher",
    "SendReply",
    "SendWebhook",
    "cancel_until_done",
    "transient",
]

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


async def cancel_until_done(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait for them; cancel again any that swallowed a cancel."""
    pending = [t for t in tasks if not t.done()]
    while pending:
        for task in pending:
            task.cancel()
        _, still = await asyncio.wait(pending, timeout=0.1)
        pending = list(still)


def transient(exc: BaseException) -> bool:
    """Whether delivering a run failed for now (an outage) rather than for good."""
    from ray.serve.exceptions import RayServeException  # an app being deployed or deleted

    cause = root_cause(exc)
    if isinstance(cause, RayTaskError):  # an error that could not cross processes: a bug
        return False
    if isinstance(cause, ActorDiedError) and "creation task" in str(cause).lower():
        return False  # a thread actor whose constructor fails: delivering again fails too
    return isinstance(cause, (*_TRANSIENT, RayServeException))


class RunDispatcher:
    """Delivers the queue's runs: in order per thread, concurrently across threads.

    A plain class, run by ``serve_app.run_worker.RunWorker`` and tested without Ray. Every
    run read waits as a task, behind the previous run of its thread; at most
    ``max_in_flight`` are delivering at a time, so a thread with many runs waiting takes no
    room from the others. What is read is bounded by the queue's own bound,
    ``runs.max_queued``.

    Every read, start and finish checks the lease in the same Redis script, so a worker
    that stalled past its lease acts on nothing once another has taken over. Every read
    passes the newest entry id the worker got; when the queue has delivered past it, a
    read's reply was lost (Redis ran it, the worker never got it), and the read returns
    those runs first, in order. They are newer than every run in hand, so order holds.

    ``stop`` ends ``run`` (cancelling a task can be lost on Python 3.11 when it lands as
    redis-py sends a command, so deliveries are cancelled until they are done).
    """

    def __init__(
        self,
        queue: RunQueue,
        deliver: Deliver,
        *,
        max_in_flight: int,
        app: str = "",
        lease_s: float = 15.0,
        retry_cap_s: float = 30.0,
        give_up_after_s: float = 3600.0,
        idle_wait_ms: int = 1000,
        send_reply: SendReply | None = None,
        send_webhook: SendWebhook | None = None,
        reply_give_up_after_s: float = 600.0,
    ) -> None:
        self._queue = queue
        self._deliver = deliver
        self._app = app
        self._token = uuid.uuid4().hex
        self._lease_s = lease_s
        self._retry_cap_s = retry_cap_s
        self._give_up_after_s = give_up_after_s
        self._idle_wait_ms = idle_wait_ms
        self._delivering = asyncio.Semaphore(max_in_flight)
        self._outbox = Outbox(
            queue.replies,
            self,
            max_in_flight=max_in_flight,
            app=app,
            send_reply=send_reply,
            send_webhook=send_webhook,
            reply_give_up_after_s=reply_give_up_after_s,
            retry_cap_s=retry_cap_s,
            idle_wait_ms=idle_wait_ms,
        )
        self._lost = asyncio.Event()
        self._stopping = asyncio.Event()
        self._closing = False  # deliveries are being stopped: none may start
        # The last run of each thread in hand: the next one waits for it.
        self._tails: dict[ThreadKey, asyncio.Task[None]] = {}
        self._tasks: dict[asyncio.Task[None], str] = {}  # task -> its entry id

    @property
    def token(self) -> str:
        return self._token

    @property
    def closing(self) -> bool:
        return self._closing

    def lose(self) -> None:
        self._lost.set()

    async def run(self) -> None:
        """Deliver runs until ``stop``, while holding the queue's lease.

        Without the lease it waits for it (another worker is reading); losing it (this one
        stalled past ``lease_s``) stops the deliveries in hand and waits again. Stopped, the
        deliveries in hand stop too: their runs stay queued, for the next reader.
        """
        try:
            while await self._acquire():
                self._lost.clear()
                if self._outbox.sends(webhooks=True):
                    await self.retrying(self._queue.mark_webhooks)
                loop = asyncio.get_running_loop()
                loops = [loop.create_task(self._drain())]
                for webhooks in (False, True):
                    if self._outbox.sends(webhooks=webhooks):
                        loops.append(loop.create_task(self._outbox.drain(webhooks=webhooks)))
                try:
                    await self._hold(loops)
                finally:
                    await self._stop_deliveries(loops)
        except Stopping:
            pass
        finally:
            with contextlib.suppress(StoreUnavailable, Stopping):
                await self._queue.release(self._token)  # else it expires by itself

    async def _stop_deliveries(self, loops: list[asyncio.Task[None]]) -> None:
        """Stop the readers, then every delivery in hand, and start no new one meanwhile.

        A cancel can be lost in a Redis call: a reader that outlives one would dispatch the
        runs it just read, behind deliveries being cancelled, so a thread's later run could
        start before its earlier ones (and next to the next worker's deliveries).
        """
        self._closing = True
        try:
            await cancel_until_done(loops)
            # Only the readers dispatch, so what is in hand now is all there will be.
            await cancel_until_done([*self._tasks, *self._outbox.in_hand()])
        finally:
            self._closing = False

    def stop(self) -> None:
        """Make ``run`` stop its deliveries, give the lease up and return."""
        self._stopping.set()

    async def pause(self, seconds: float) -> None:
        """Sleep, unless asked to stop (``Stopping``)."""
        stopping = asyncio.get_running_loop().create_task(self._stopping.wait())
        try:
            await asyncio.wait([stopping], timeout=seconds)
        finally:
            stopping.cancel()
        if self._stopping.is_set():
            raise Stopping

    async def _acquire(self) -> bool:
        # Polls, since Redis cannot notify: at most one second after the lease is free.
        while not self._stopping.is_set():
            if await self.retrying(self._queue.acquire, self._token, self._lease_s):
                return True
            await self.pause(min(1.0, self._lease_s / 3))
        return False

    async def _hold(self, loops: list[asyncio.Task[None]]) -> None:
        """Renew the lease until one of ``loops`` ends (re-raising its error), the lease is
        lost or the dispatcher is stopped."""
        loop = asyncio.get_running_loop()
        lost = loop.create_task(self._lost.wait())
        stopping = loop.create_task(self._stopping.wait())
        try:
            while True:
                done, _ = await asyncio.wait(
                    [*loops, lost, stopping],
                    timeout=self._lease_s / 3,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                for task in loops:
                    if task in done:
                        task.result()
                        return
                if stopping in done:
                    return
                if lost in done or not await self.retrying(
                    self._queue.renew, self._token, self._lease_s
                ):
                    log.warning("run queue lease lost; stopping deliveries until it is back")
                    return
        finally:
            lost.cancel()
            stopping.cancel()

    async def _drain(self) -> None:
        try:
            await self.retrying(self._queue.join)
            await self._read_unfinished()  # the runs the previous reader left
            seen = await self.retrying(self._queue.last_read)
            while True:
                runs, last, delivered = await self.retrying(
                    self._queue.read, self._token, BATCH, seen=seen
                )
                in_hand = set(self._tasks.values()) if runs else set()
                for run in runs:
                    if run.entry not in in_hand:  # (after a failover, Redis may repeat one)
                        self._dispatch(run)
                seen = last or delivered
                if last is None:
                    await self.retrying(self._queue.wait, seen, self._idle_wait_ms)
        except LeaseLost:
            self._lost.set()

    async def _read_unfinished(self) -> None:
        """Dispatch the runs read before and not in hand (all of them, after taking over)."""
        in_hand = set(self._tasks.values())
        after: str | None = "0"
        while after is not None:
            runs, after, _ = await self.retrying(self._queue.read, self._token, BATCH, after=after)
            for run in runs:
                if run.entry not in in_hand:
                    self._dispatch(run)

    def _dispatch(self, run: QueuedRun) -> None:
        if self._closing:
            return  # it stays queued, for whoever reads next
        before = self._tails.get(run.key)
        task = asyncio.get_running_loop().create_task(self._process(run, before))
        self._tails[run.key] = task
        self._tasks[task] = run.entry
        task.add_done_callback(lambda done: self._done(run.key, done))

    def _done(self, key: ThreadKey, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)
        if self._tails.get(key) is task:
            del self._tails[key]

    async def _process(self, run: QueuedRun, before: asyncio.Task[None] | None) -> None:
        if before is not None:
            await asyncio.wait([before])  # order is what matters; its outcome is its own
        try:
            result, error = await self._deliver_until_done(run)
            if result is None and error is None:
                return  # finished already, by a worker that took over
            await self.retrying(self._queue.finish, self._token, run, result=result, error=error)
            record_run(self._app, status=result.status if result is not None else "failed")
        except LeaseLost:
            self._lost.set()  # the run stays queued, for the worker that holds the lease
        except Stopping:
            pass  # the run stays queued, for the next worker
        except Exception as exc:  # a bug, not an outage (those are retried)
            log.exception("run %s of %s failed in the run worker", run.message.message_id, run.key)
            try:
                await self._queue.finish(self._token, run, error=f"{type(exc).__name__}: {exc}")
            except LeaseLost:
                self._lost.set()
            except Exception:  # left unfinished: the next worker to take over delivers it
                log.error("run %s stays unfinished", run.message.message_id, exc_info=True)

    async def _deliver_until_done(self, run: QueuedRun) -> tuple[TurnResult | None, str | None]:
        """The run's turn, or why it failed; (None, None) if it was finished elsewhere."""
        delay = 0.05
        deadline: float | None = None  # counted from the first outage, not the queueing
        while True:
            async with self._delivering:  # not held while backing off
                if not await self.retrying(self._queue.start, self._token, run):
                    return None, None  # or cancelled before it started
                if deadline is None:  # the first delivery: how long the run waited for it
                    record_run(self._app, waited=time.time() - run.queued_at)
                try:
                    return await self._deliver(run.key, run.message), None
                except Exception as exc:
                    cause = root_cause(exc)
                    reason = f"{type(cause).__name__}: {cause}"
                    if not transient(exc):
                        log.warning(
                            "run %s of %s failed: %s", run.message.message_id, run.key, reason
                        )
                        return None, reason
            if deadline is None:
                deadline = time.monotonic() + self._give_up_after_s
            now = time.monotonic()
            if now >= deadline:
                log.warning(
                    "run %s of %s: giving up after %.0f s of outages: %s",
                    run.message.message_id,
                    run.key,
                    self._give_up_after_s,
                    reason,
                )
                return None, f"gave up after {self._give_up_after_s:g} s of outages; last: {reason}"
            wait = min(delay, deadline - now)  # the last try is at the deadline
            log.info(
                "run %s of %s: %s; delivering again in %.2f s",
                run.message.message_id,
                run.key,
                reason,
                wait,
            )
            await self.pause(wait)
            delay = min(delay * 2, self._retry_cap_s)

    async def still_leased(self) -> None:
        """Raise LeaseLost unless this worker still holds the lease, extending it if so.

        Checked before each message to a channel, which no script can guard: a worker that
        stalled past its lease, or lost it during a Redis outage, sends nothing more.
        """
        if self._lost.is_set() or not await self.retrying(
            self._queue.renew, self._token, self._lease_s
        ):
            raise LeaseLost(self._token)

    async def retrying(self, call: Callable[..., Awaitable[T]], *args: Any, **kw: Any) -> T:
        """``call(*args, **kw)``, again with backoff while Redis is unavailable."""
        delay = 0.05
        while True:
            try:
                return await call(*args, **kw)
            except StoreUnavailable as exc:
                log.warning("run queue: %s; trying again in %.2f s", exc, delay)
            await self.pause(delay)
            delay = min(delay * 2, 5.0)
