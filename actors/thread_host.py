"""The pooled hosting strategy: one Ray actor carrying many ``Thread`` objects.

Created only by ``actors.directory`` when ``threads.hosting`` is ``pooled``. A thread lives in
the host its key hashes to, so every ingress replica finds it in the same place. The turn
logic is the same ``Thread`` as in a per-thread actor: it opens with a new epoch, restores its
checkpoint, resolves a pending turn and is fenced by the epoch, so a host crash or a second
host holding the same thread loses nothing. A host of another config version still holding the
thread (during a deploy) is asked to close it first, after its turn in progress, so that turn
is not run a second time here; for the same reason a host does not reopen a thread it is
still closing before that turn is done, and a host asked to close a thread it is still opening
closes it once it is open. Threads idle past ``idle_timeout_s`` are closed, at
most ``max_live_threads`` stay open (the least recently used close first), and a host left
with no threads for ``idle_timeout_s`` exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict
from typing import Any

import ray

from actors.agent_client import ServeAgentCaller
from actors.key import NAMESPACE, ThreadKey
from actors.redis_store import RedisThreadStore, connect_redis
from actors.thread import Thread
from stickyray.config import TeamConfig
from stickyray.errors import ThreadFenced, ThreadPassivated
from stickyray.metrics import TurnReporter
from stickyray.turns import InboundMessage, TurnResult

__all__ = ["HANDOVER_TIMEOUT_S", "ThreadHost"]

log = logging.getLogger(__name__)

# How long a host waits for another to finish a thread's turn and close it. Longer than any
# turn should take; past it the thread opens here anyway, fencing the other's turn.
HANDOVER_TIMEOUT_S = 600.0
_HOLDER = "host"  # the Redis key part naming the host that holds a thread
# The key part remembering the last record's nonce and the holder it replaced, for as long as
# the client may send that record again.
_RECORDED = "host:recorded"
_RECORDED_S = 600

# KEYS[1]: the holder record, KEYS[2]: what the last record replaced. ARGV: this host's name,
# the record's ttl, the call's nonce, how long to remember it. Returns the previous holder. The
# client sends a script again when its answer is late, though Redis may have run it: the
# second run must not answer with this host's own name, or the host it replaced is never
# asked to close the thread. The record itself stays a plain name (hosts of the release
# before read it).
_RECORD_HOLDER = """
local last = redis.call('HMGET', KEYS[2], 'nonce', 'previous')
if last[1] == ARGV[3] then
  return last[2]
end
local previous = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('HSET', KEYS[2], 'nonce', ARGV[3], 'previous', previous or '')
redis.call('EXPIRE', KEYS[2], ARGV[4])
return previous
"""


class ThreadHost:
    """Many conversation threads in one Ray actor."""

    async def __init__(  # type: ignore[misc]
        self,
        team: TeamConfig,
        redis_url: str,
        agent_handles: dict[str, Any],
        app: str,
        name: str | None = None,
    ) -> None:
        threads = team.threads
        self._name = name  # this host's actor name, recorded as the holder of its threads
        self._team = team
        self._redis = connect_redis(redis_url)
        self._record_holder = self._redis.register_script(_RECORD_HOLDER)
        self._store = RedisThreadStore(
            self._redis, ttl_s=threads.checkpoint_ttl_s, message_id_ttl_s=threads.message_id_ttl_s
        )
        self._agents = ServeAgentCaller(agent_handles)
        self._observe = TurnReporter(app, team.supervisor.name)
        self._threads: OrderedDict[ThreadKey, Thread] = OrderedDict()
        self._opening: dict[ThreadKey, asyncio.Future[Thread]] = {}
        # Threads forgotten but still finishing their turn in progress, by key.
        self._closing: dict[ThreadKey, asyncio.Task[None]] = {}
        # Threads whose open waits for the host that held them to close them.
        self._handing_over: set[ThreadKey] = set()
        # Of each thread whose opening failed: its token, sent again by the next opening.
        self._open_tokens: dict[ThreadKey, str] = {}
        # When this host last recorded itself as each open thread's holder (monotonic).
        self._held_at: dict[ThreadKey, float] = {}
        self._cap = threads.max_live_threads
        self._idle_timeout_s = threads.idle_timeout_s
        self._empty_since = time.time()
        self._idle_watch = asyncio.get_running_loop().create_task(self._watch_idle())

    async def handle(self, key: ThreadKey, message: InboundMessage) -> TurnResult:
        """Run one message through the thread ``key``, opening it here if needed."""
        thread = await self._thread(key)
        await self._still_holding(key)
        try:
            return await thread.handle(message)
        except (ThreadFenced, ThreadPassivated):
            # This incarnation is over; the directory delivers again and the next one opens.
            self._forget(key, thread)
            raise

    async def passivate(self, key: ThreadKey) -> None:
        """Close the thread ``key`` after its turn in progress (its state is stored).

        A thread still opening here is closed once open (after the turn its open let in,
        if any). One whose open waits for another host to close it is not waited for: the
        two hosts would wait for each other; that open looks again at who holds the thread
        once its wait is over, and does not open it if another host took it meanwhile.
        """
        pending = self._opening.get(key)
        if pending is not None and key not in self._handing_over:
            with contextlib.suppress(Exception):  # an open that failed left nothing to close
                await asyncio.shield(pending)
        thread = self._threads.get(key)
        if thread is not None:
            self._close_later(key, thread)
        closing = self._closing.get(key)
        if closing is not None:
            # Shielded: a caller giving up on the wait does not stop the close.
            await asyncio.shield(closing)

    async def open_threads(self) -> list[ThreadKey]:
        """The threads open in this host, least recently used first."""
        return list(self._threads)

    async def _thread(self, key: ThreadKey) -> Thread:
        thread = self._threads.get(key)
        if thread is not None:
            self._threads.move_to_end(key)
            return thread
        pending = self._opening.get(key)
        if pending is None:
            # One open per key, however many of its messages arrive at once.
            pending = asyncio.ensure_future(self._open(key))
            self._opening[key] = pending
            pending.add_done_callback(lambda _: self._opening.pop(key, None))
        # Shielded: one waiter cancelled (its request gone) must not cancel the others' open.
        return await asyncio.shield(pending)

    async def _open(self, key: ThreadKey) -> Thread:
        closing = self._closing.get(key)
        if closing is not None:
            # Its last incarnation here is still finishing a turn: a new one would take an
            # epoch, fence that turn mid-way and run it again as a pending turn.
            await asyncio.wait({closing})
        self._handing_over.add(key)
        try:
            held_at = await self._take_over(key)
        finally:
            self._handing_over.discard(key)
        # The token of this thread's last opening that failed, sent again: if Redis ran it
        # and its answer was lost, it counts once.
        token = self._open_tokens.setdefault(key, uuid.uuid4().hex)
        thread = await Thread.open(
            key, self._team, self._store, self._agents, observe=self._observe, token=token
        )
        del self._open_tokens[key]
        # Registered here, not by its waiters: an open they all gave up on still took an
        # epoch, and unregistered, the next message would open the thread again.
        self._threads[key] = thread
        if held_at is not None:
            self._held_at[key] = held_at
        self._evict_over_cap(opening=key)
        return thread

    async def _take_over(self, key: ThreadKey) -> float | None:
        """Record this host as the holder of ``key``; if another host held it, wait for that
        one to close it after its turn in progress. When it was recorded (monotonic; None if
        it was not).

        After a config deploy, a thread's next message comes to a host of the new version
        while the old one may still be running the thread's turn: opening at once would take
        a new epoch, fence that turn mid-way, and run it again here. Crashes are unaffected:
        a dead holder is not waited for. ThreadPassivated (the directory delivers again) if
        yet another host recorded itself as the holder during the wait.
        """
        if self._name is None:
            return None
        recorded = time.monotonic()
        ttl, nonce = self._team.threads.checkpoint_ttl_s, uuid.uuid4().hex
        try:
            previous = await self._record_holder(
                keys=[key.redis_key(_HOLDER), key.redis_key(_RECORDED)],
                args=[self._name, ttl, nonce, _RECORDED_S],
            )
        except Exception as exc:  # opening the thread reports Redis being down
            log.info("thread %s: holder not recorded: %s", key, exc)
            return None
        if isinstance(previous, bytes):
            previous = previous.decode()
        if not isinstance(previous, str) or previous in ("", self._name):
            return recorded
        holder = await asyncio.to_thread(self._lookup, previous)
        if holder is None:
            return recorded
        await self._wait_closed(key, previous, holder)
        current = None
        with contextlib.suppress(Exception):  # Redis down: opening the thread reports it
            current = await self._redis.get(key.redis_key(_HOLDER))
        if isinstance(current, bytes) and current.decode() != self._name:
            # Both hosts asked each other at once; the later one to record itself opens it.
            raise ThreadPassivated(str(key))
        return recorded

    async def _wait_closed(self, key: ThreadKey, previous: str, holder: Any) -> None:
        try:
            await asyncio.wait_for(holder.passivate.remote(key), HANDOVER_TIMEOUT_S)
        except TimeoutError:
            log.warning(
                "thread %s: %s did not close it within %.0f s: opening it here anyway",
                key,
                previous,
                HANDOVER_TIMEOUT_S,
            )
        except Exception as exc:  # gone meanwhile: its turns are stored or pending
            log.info("thread %s: %s could not close it (%s)", key, previous, exc)

    @staticmethod
    def _lookup(name: str) -> Any | None:
        try:
            return ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            return None

    async def _still_holding(self, key: ThreadKey) -> None:
        """Renew this host's record as the holder of ``key`` halfway through its expiry: a
        thread kept open (busy) for longer would otherwise lose it, and a host taking it
        over after a deploy would not wait for its turn in progress."""
        held_at = self._held_at.get(key)
        ttl = self._team.threads.checkpoint_ttl_s
        if self._name is None or held_at is None or time.monotonic() - held_at < ttl / 2:
            return
        try:
            await self._redis.expire(key.redis_key(_HOLDER), ttl)
            self._held_at[key] = time.monotonic()
        except Exception as exc:  # the turn reports Redis being down
            log.info("thread %s: holder record not renewed: %s", key, exc)

    def _forget(self, key: ThreadKey, thread: Thread) -> None:
        if self._threads.get(key) is thread:
            del self._threads[key]
            self._held_at.pop(key, None)
            if not self._threads:
                self._empty_since = time.time()

    def _evict_over_cap(self, opening: ThreadKey) -> None:
        over = len(self._threads) - self._cap
        if over <= 0:
            return
        # Least recently used first. Never a thread with a turn in progress, nor the one just
        # opened for a message: closed before its turn starts, it would be opened again by the
        # redelivery, and that incarnation would run the same turn a second time. With every
        # other thread busy, the host runs over its cap until one finishes.
        victims = [(k, t) for k, t in self._threads.items() if not t.busy and k != opening][:over]
        for key, thread in victims:
            self._close_later(key, thread)

    def _close_later(self, key: ThreadKey, thread: Thread) -> None:
        self._forget(key, thread)
        task = asyncio.get_running_loop().create_task(thread.close())
        self._closing[key] = task
        task.add_done_callback(lambda done: self._closed(key, done))

    def _closed(self, key: ThreadKey, task: asyncio.Task[None]) -> None:
        if self._closing.get(key) is task:
            del self._closing[key]

    async def _watch_idle(self) -> None:
        # A timer, not a wait for a condition: it wakes a few times per timeout to compare.
        interval = min(max(self._idle_timeout_s / 4, 0.05), 30.0)
        while True:
            await asyncio.sleep(interval)
            now = time.time()
            for key, thread in list(self._threads.items()):
                if now - thread.last_active >= self._idle_timeout_s and not thread.busy:
                    self._close_later(key, thread)
            # Not while a thread still finishes its turn: exiting would interrupt it.
            idle = not self._threads and not self._opening and not self._closing
            if idle and now - self._empty_since >= self._idle_timeout_s:
                log.info("thread host idle for %.0f s: exiting", now - self._empty_since)
                ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
                return
