"""Queued runs: the Redis run queue, and runs delivered in order, on a real redis-server,
without Ray (the worker's recovery and outages are in ``test_run_dispatcher``).

Runs are delivered to real ``Thread`` objects over the Redis thread store, with in-process
agents, so redelivery and deduplication are the real ones; the e2e tests add Ray and Serve.
"""

from __future__ import annotations

import asyncio
import time
import types
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from actors.key import ThreadKey
from actors.redis_store import RedisThreadStore, connect_redis
from actors.run_queue import RunQueue
from actors.run_records import RunRecord
from actors.thread import Thread
from serve_app.runs import RunDispatcher
from stickyray.config import RunsConfig, TeamConfig, load_config
from stickyray.errors import MessageIdReused, RunQueueFull
from stickyray.turns import AgentRequest, AgentResult, InboundMessage, TurnResult
from tests.unit.test_thread import Agents, booking_agents


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[Any]:
    redis = connect_redis(redis_url)
    yield redis
    await redis.aclose()


def queue_of(client: Any, **config: Any) -> RunQueue:
    """A run queue of an app of its own, so tests never see each other's runs."""
    return RunQueue(client, f"app-{uuid.uuid4().hex[:8]}", RunsConfig(**config))


def dispatcher(queue: RunQueue, deliver: Any, **options: Any) -> RunDispatcher:
    return RunDispatcher(queue, deliver, **{"max_in_flight": 4, **options})


def fresh() -> ThreadKey:
    return ThreadKey.of(f"run-{uuid.uuid4().hex[:12]}")


def msg(text: str, mid: str | None = None) -> InboundMessage:
    return InboundMessage(text=text, message_id=mid or uuid.uuid4().hex)


async def until(condition: Callable[[], Any], seconds: float = 10.0) -> None:
    """Poll an async or plain condition until it holds."""
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.01)


class Threads:
    """Delivers messages to real Threads over the Redis thread store, one per key."""

    def __init__(self, client: Any, team: TeamConfig, agents: Agents) -> None:
        self.store = RedisThreadStore(client, ttl_s=3600)
        self.team = team
        self.agents = agents
        self.threads: dict[ThreadKey, Thread] = {}
        self.delivered: list[tuple[ThreadKey, str]] = []

    async def __call__(self, key: ThreadKey, message: InboundMessage) -> TurnResult:
        self.delivered.append((key, message.text))
        if key not in self.threads:
            self.threads[key] = await Thread.open(key, self.team, self.store, self.agents)
        return await self.threads[key].handle(message)


class Gate:
    """Bookings replies, but a message containing "slow" waits until the gate opens."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.waiting = 0

    async def bookings(self, request: AgentRequest) -> AgentResult:
        if "slow" in request.text:
            self.waiting += 1
            await self.open.wait()
        return AgentResult(agent="bookings", reply=f"bookings: {request.text}")


class GatedAgents(Agents):
    def __init__(self, gate: Gate) -> None:
        super().__init__({"triage": booking_agents().behaviours["triage"]})
        self.gate = gate

    async def __call__(self, agent: str, request: AgentRequest) -> AgentResult:
        self.calls.append((agent, request.turn))
        if agent == "bookings":
            return await self.gate.bookings(request)
        return self.behaviours[agent](request)


class Running:
    """A dispatcher running in a task."""

    def __init__(self, dispatcher: RunDispatcher) -> None:
        self.dispatcher = dispatcher
        self.task = asyncio.get_running_loop().create_task(dispatcher.run())

    async def stop(self) -> None:
        self.dispatcher.stop()
        await asyncio.wait_for(self.task, 10)  # it returns, having stopped its deliveries


async def running(dispatcher: RunDispatcher) -> Running:
    return Running(dispatcher)


async def stop(worker: Running) -> None:
    await worker.stop()


async def status_is(queue: RunQueue, key: ThreadKey, mid: str, status: str) -> bool:
    record = await queue.get(key, mid)
    return record is not None and record.status == status


async def test_submit_records_and_queues_once(client: Any) -> None:
    queue, key = queue_of(client), fresh()
    record, queued = await queue.submit(key, msg("book a table", "m1"))
    assert queued and record.status == "queued" and record.attempts == 0
    assert (record.thread_id, record.message_id, record.result) == (key.thread_id, "m1", None)
    again, queued_again = await queue.submit(key, msg("book a table", "m1"))
    assert not queued_again and again == record
    assert await queue.depth() == 1
    # The id of a run is its message's: another message with it is refused, not queued.
    with pytest.raises(MessageIdReused, match="'m1' was already used"):
        await queue.submit(key, msg("book a room", "m1"))
    assert await queue.depth() == 1 and await queue.get(key, "m1") == record
    assert await queue.get(key, "never-sent") is None
    assert await queue.get(fresh(), "m1") is None  # a message id is per thread
    # A waiting run's record does not expire, however long the queue takes.
    assert await client.ttl(queue.keys.record(key, "m1")) == -1


async def test_a_full_queue_refuses_and_keeps_what_it_holds(client: Any) -> None:
    queue, key = queue_of(client, max_queued=2), fresh()
    await queue.submit(key, msg("one", "m1"))
    await queue.submit(fresh(), msg("two", "m2"))
    with pytest.raises(RunQueueFull) as full:
        await queue.submit(key, msg("three", "m3"))
    assert (full.value.queued, full.value.cap) == (2, 2)
    assert "runs.max_queued" in str(full.value)
    assert await queue.get(key, "m3") is None
    # A retry of a run already queued is answered, full or not.
    assert (await queue.submit(key, msg("one", "m1")))[1] is False
    assert await queue.depth() == 2


async def test_runs_of_a_thread_run_in_order_and_threads_run_at_once(client: Any) -> None:
    gate = Gate()
    threads = Threads(client, load_config(None), GatedAgents(gate))
    queue = queue_of(client)
    first, second = fresh(), fresh()
    texts = ["slow: a table for 2", "at 8 pm", "yes please"]
    for text in texts:
        await queue.submit(first, msg(text, text))
    await queue.submit(second, msg("a table for 4", "other"))
    worker = await running(dispatcher(queue, threads))
    try:
        # The other thread's run finishes while the first thread's first run is held.
        await until(lambda: status_is(queue, second, "other", "completed"))
        assert gate.waiting == 1
        assert [t for k, t in threads.delivered if k == first] == texts[:1]
        assert await status_is(queue, first, "at 8 pm", "queued")
        gate.open.set()
        await until(lambda: status_is(queue, first, "yes please", "completed"))
    finally:
        await stop(worker)
    records = [await queue.get(first, mid) for mid in texts]
    assert [r.result.turn for r in records if r and r.result] == [1, 2, 3]
    record = records[1]
    assert record is not None and record.result is not None
    assert record.result.agent == "bookings" and record.attempts == 1
    assert record.started_at is not None and record.finished_at is not None
    assert record.created_at <= record.started_at <= record.finished_at
    assert await queue.depth() == 0
    ttl = await client.ttl(queue.keys.record(first, "at 8 pm"))
    assert 0 < ttl <= RunsConfig().result_ttl_s


async def open_runs(queue: RunQueue, key: ThreadKey, limit: int) -> list[RunRecord]:
    """The first page of the thread's open runs."""
    runs = await queue.open_runs(key, limit)
    assert runs is not None
    return runs


async def test_open_runs_are_listed_a_page_at_a_time(client: Any) -> None:
    queue, key = queue_of(client), fresh()
    for n in range(5):
        await queue.submit(key, msg(f"run {n}", f"m{n}"))

    async def page(after: str | None) -> list[str] | None:
        runs = await queue.open_runs(key, 2, after)
        return None if runs is None else [r.message_id for r in runs]

    assert await page(None) == ["m0", "m1"]
    assert await page("m1") == ["m2", "m3"]
    assert await page("m3") == ["m4"]
    assert await page("m4") == []
    # A run that finished (here, cancelled) still marks its place in the queue.
    assert (await queue.cancel(key, "m2"))[1]
    assert await page("m2") == ["m3", "m4"]
    assert await page("m1") == ["m3", "m4"]
    assert await page("nothing like it") is None
    # A run queued by a release that kept no position is placed by its entry, as it was.
    await client.hdel(queue.keys.record(key, "m0"), "position")
    assert await page("m0") == ["m1", "m3"]


async def test_open_runs_are_listed_and_a_queued_one_can_be_cancelled(client: Any) -> None:
    gate = Gate()
    threads = Threads(client, load_config(None), GatedAgents(gate))
    queue = queue_of(client)
    key = fresh()
    for text in ["slow: a table for 2", "at 8 pm", "yes please"]:
        await queue.submit(key, msg(text, text))
    assert await queue.cancel(key, "nothing like it") == (None, False)
    assert [r.message_id for r in await open_runs(queue, key, 2)] == [
        "slow: a table for 2",
        "at 8 pm",
    ]
    worker = await running(dispatcher(queue, threads))
    try:
        await until(lambda: gate.waiting == 1)  # the next runs are read and wait their turn
        record, cancelled = await queue.cancel(key, "at 8 pm")
        assert cancelled and record is not None and record.status == "cancelled"
        assert record.finished_at is not None and record.result is None
        assert [(r.message_id, r.status) for r in await open_runs(queue, key, 100)] == [
            ("slow: a table for 2", "running"),
            ("yes please", "queued"),
        ]
        # A run that started, or was cancelled before, stays as it is.
        running_now, cancelled = await queue.cancel(key, "slow: a table for 2")
        assert not cancelled and running_now is not None and running_now.status == "running"
        again, cancelled = await queue.cancel(key, "at 8 pm")
        assert not cancelled and again is not None and again.status == "cancelled"
        gate.open.set()
        await until(lambda: status_is(queue, key, "yes please", "completed"))
    finally:
        await stop(worker)
    # The worker held the cancelled run already, and left it.
    assert [t.message_id for t in await threads.store.turns(key)] == [
        "slow: a table for 2",
        "yes please",
    ]
    assert await status_is(queue, key, "at 8 pm", "cancelled")
    done, cancelled = await queue.cancel(key, "yes please")
    assert not cancelled and done is not None and done.status == "completed"
    assert await queue.depth() == 0
    # Finished or cancelled, no run is open, and the thread's open set is gone with the last.
    assert await queue.open_runs(key, 100) == []
    assert await client.exists(queue.keys.open(key)) == 0
    assert 0 < await client.ttl(queue.keys.record(key, "at 8 pm")) <= RunsConfig().result_ttl_s
    # Its message id stays taken while the record lasts: submitting it again queues nothing.
    record, queued = await queue.submit(key, msg("at 8 pm", "at 8 pm"))
    assert not queued and record.status == "cancelled"


async def test_a_run_queued_without_its_entry_id_is_cancelled_too(client: Any) -> None:
    """A run queued by a release that did not record entry ids (a backlog across an
    upgrade): cancelled, it neither runs nor replies."""
    threads = Threads(client, load_config(None), booking_agents())
    queue = queue_of(client)
    key = fresh()
    await queue.submit(key, msg("a table for 2", "old"), reply_to={"chat": 1})
    await client.hdel(queue.keys.record(key, "old"), "entry")
    record, cancelled = await queue.cancel(key, "old")
    assert cancelled and record is not None and record.status == "cancelled"
    # Kept while its entry waits: expired first, the entry would run as a new run.
    assert await client.ttl(queue.keys.record(key, "old")) == -1
    await queue.submit(key, msg("a table for 4", "new"))
    worker = await running(dispatcher(queue, threads))
    try:
        await until(lambda: status_is(queue, key, "new", "completed"))
    finally:
        await stop(worker)
    assert threads.delivered == [(key, "a table for 4")]
    assert await status_is(queue, key, "old", "cancelled")
    assert await queue.depth() == 0 and await client.xlen(queue.keys.outbox) == 0
    assert 0 < await client.ttl(queue.keys.record(key, "old")) <= RunsConfig().result_ttl_s


async def test_open_runs_are_listed_in_queue_order_and_only_while_open(
    client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = queue_of(client)
    key = fresh()
    # Submitted through two ingress replicas whose clocks disagree by a minute.
    clocks = iter([2_000_000_060.0, 2_000_000_000.0, 2_000_000_030.0])
    # The queue's own view of the clock only: patching time.time itself let anything else
    # reading it meanwhile (a log record) take one of the three.
    submit_time = types.SimpleNamespace(time=lambda: next(clocks), monotonic=time.monotonic)
    monkeypatch.setattr("actors.run_queue.time", submit_time)
    for mid in ("first", "second", "third"):
        await queue.submit(key, msg(mid, mid))
    monkeypatch.undo()
    listed = await open_runs(queue, key, 10)
    assert [r.message_id for r in listed] == ["first", "second", "third"]
    # Finished by a worker that does not keep the index (an earlier release, mid-deploy),
    # and one whose record is gone: neither is open, and neither stays in the index.
    await client.hset(queue.keys.record(key, "first"), "status", "completed")
    await client.delete(queue.keys.record(key, "second"))
    assert [r.message_id for r in await open_runs(queue, key, 2)] == ["third"]
    assert await client.zrange(queue.keys.open(key), 0, -1) == [b"third"]


async def test_runs_queued_in_one_millisecond_past_its_1000th_are_listed_in_order(
    client: Any,
) -> None:
    """Redis numbers entries on in the last entry's millisecond when its clock is behind
    (after a failover to a replica whose clock lags): the 1000th and later are still
    listed in queue order, and a page at a time, none skipped."""
    queue, key = queue_of(client), fresh()
    await queue.submit(fresh(), msg("makes the stream", "s0"))
    ahead = int(time.time() * 1000) + 600_000  # a minute ahead of Redis's clock: it lags
    await client.execute_command("XSETID", queue.keys.queue, f"{ahead}-997")
    mids = ["z1", "a2", "m3", "b4"]  # entries ...-998, -999, -1000, -1001
    for mid in mids:
        await queue.submit(key, msg(mid, mid))
    assert [r.message_id for r in await open_runs(queue, key, 10)] == mids
    paged: list[str] = []
    after = None
    while (page := await queue.open_runs(key, 1, after)) and len(paged) < 10:
        paged.append(page[0].message_id)
        after = page[0].message_id
    assert paged == mids
