"""Queued runs: the Redis run queue and the dispatcher, on a real redis-server, without Ray.

Runs are delivered to real ``Thread`` objects over the Redis thread store, with in-process
agents, so redelivery and deduplication are the real ones; the e2e tests add Ray and Serve.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from actors.key import ThreadKey
from actors.redis_store import RedisThreadStore, connect_redis
from actors.run_queue import RunQueue
from actors.thread import Thread
from serve_app.runs import RunDispatcher, transient
from stickyray.config import RunsConfig, TeamConfig, load_config
from stickyray.errors import RunQueueFull, StoreUnavailable
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


async def running(dispatcher: RunDispatcher) -> asyncio.Task[None]:
    return asyncio.get_running_loop().create_task(dispatcher.run())


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_submit_records_and_queues_once(client: Any) -> None:
    queue, key = queue_of(client), fresh()
    record, queued = await queue.submit(key, msg("book a table", "m1"))
    assert queued and record.status == "queued" and record.attempts == 0
    assert (record.thread_id, record.message_id, record.result) == (key.thread_id, "m1", None)
    again, queued_again = await queue.submit(key, msg("book a table", "m1"))
    assert not queued_again and again == record
    assert await queue.depth(queue.partition(key)) == 1
    assert await queue.get(key, "never-sent") is None
    assert await queue.get(fresh(), "m1") is None  # a message id is per thread


async def test_a_full_partition_refuses_and_keeps_what_it_holds(client: Any) -> None:
    queue, key = queue_of(client, max_queued=2), fresh()
    await queue.submit(key, msg("one", "m1"))
    await queue.submit(key, msg("two", "m2"))
    with pytest.raises(RunQueueFull) as full:
        await queue.submit(key, msg("three", "m3"))
    assert (full.value.queued, full.value.cap) == (2, 2)
    assert "runs.max_queued" in str(full.value)
    assert await queue.get(key, "m3") is None
    # A retry of a run already queued is answered, full or not.
    assert (await queue.submit(key, msg("one", "m1")))[1] is False
    kept = [await queue.get(key, "m1"), await queue.get(key, "m2")]
    assert [r.status if r else None for r in kept] == ["queued", "queued"]


async def test_partitions_split_the_cap_and_keep_a_thread_in_one(client: Any) -> None:
    assert RunsConfig(partitions=3, max_queued=10).partition_cap() == 4
    queue = queue_of(client, partitions=3)
    keys = [fresh() for _ in range(30)]
    assert {queue.partition(k) for k in keys} == {0, 1, 2}
    assert all(queue.partition(k) == queue.partition(ThreadKey.of(k.thread_id)) for k in keys)
    for key in keys:
        await queue.submit(key, msg("hello", "m1"))
        await queue.submit(key, msg("again", "m2"))
    depths = [await queue.depth(p) for p in range(3)]
    assert depths == [2 * sum(queue.partition(k) == p for k in keys) for p in range(3)]
    assert await queue.busy_partitions() == [0, 1, 2]
    # After runs.partitions is lowered, the runs queued in the partitions it dropped still
    # count, so the app starts their workers.
    fewer = RunQueue(client, queue._app, RunsConfig(partitions=1))
    assert await fewer.busy_partitions() == [0, 1, 2]


async def test_runs_of_a_thread_run_in_order_and_threads_run_at_once(client: Any) -> None:
    gate = Gate()
    threads = Threads(client, load_config(None), GatedAgents(gate))
    queue = queue_of(client)
    first, second = fresh(), fresh()
    for text in ("slow: a table for 2", "at 8 pm", "yes please"):
        await queue.submit(first, msg(text, text))
    await queue.submit(second, msg("a table for 4", "other"))
    worker = await running(RunDispatcher(queue, 0, threads, max_in_flight=4))
    try:
        # The other thread's run finishes while the first thread's first run is held.
        await until(lambda: _status(queue, second, "other", "completed"))
        assert gate.waiting == 1
        assert [t for k, t in threads.delivered if k == first] == ["slow: a table for 2"]
        assert (await queue.get(first, "at 8 pm")).status == "queued"  # type: ignore[union-attr]
        gate.open.set()
        await until(lambda: _status(queue, first, "yes please", "completed"))
    finally:
        await stop(worker)
    turns = [
        (await queue.get(first, mid)).result.turn  # type: ignore[union-attr]
        for mid in ("slow: a table for 2", "at 8 pm", "yes please")
    ]
    assert turns == [1, 2, 3]
    record = await queue.get(first, "at 8 pm")
    assert record is not None and record.result is not None
    assert record.result.agent == "bookings" and record.attempts == 1
    assert record.created_at <= record.started_at <= record.finished_at  # type: ignore[operator]
    assert await queue.depth(0) == 0
    ttl = await client.ttl(queue._record(first, "at 8 pm"))
    assert 0 < ttl <= RunsConfig().result_ttl_s


async def _status(queue: RunQueue, key: ThreadKey, mid: str, status: str) -> bool:
    record = await queue.get(key, mid)
    return record is not None and record.status == status


async def test_a_run_left_by_a_dead_worker_finishes_once(client: Any) -> None:
    team = load_config(None)
    queue, key = queue_of(client), fresh()
    await queue.submit(key, msg("a table for 2", "m1"))
    await queue.submit(key, msg("at 8 pm", "m2"))
    threads = Threads(client, team, booking_agents())
    stored = asyncio.Event()

    async def dies_after_the_turn(k: ThreadKey, message: InboundMessage) -> TurnResult:
        result = await threads(k, message)  # the turn is stored in the thread...
        stored.set()
        await asyncio.Event().wait()  # ...and the worker dies before finishing the run
        return result

    first = await running(RunDispatcher(queue, 0, dies_after_the_turn, max_in_flight=4))
    await asyncio.wait_for(stored.wait(), 10)
    await stop(first)
    assert (await queue.get(key, "m1")).status == "running"  # type: ignore[union-attr]

    # The next incarnation reads the run again; the thread answers it from its stored turn.
    again = Threads(client, team, booking_agents())
    second = await running(RunDispatcher(queue, 0, again, max_in_flight=4))
    try:
        await until(lambda: _status(queue, key, "m2", "completed"))
    finally:
        await stop(second)
    one = await queue.get(key, "m1")
    assert one is not None and one.result is not None
    assert (one.status, one.result.turn, one.attempts) == ("completed", 1, 2)
    assert (await queue.get(key, "m2")).result.turn == 2  # type: ignore[union-attr]
    history = await threads.store.turns(key)
    assert [t.message_id for t in history] == ["m1", "m2"]  # no turn ran twice
    assert [t for _, t in again.delivered] == ["a table for 2", "at 8 pm"]
    assert await queue.depth(0) == 0


async def test_outages_are_retried_and_other_errors_fail_the_run(client: Any) -> None:
    team = load_config(None)
    queue, key = queue_of(client), fresh()
    threads = Threads(client, team, booking_agents())
    outages = 2

    async def flaky(k: ThreadKey, message: InboundMessage) -> TurnResult:
        nonlocal outages
        if message.text == "broken":
            raise ValueError("no such thing")
        if outages:
            outages -= 1
            raise StoreUnavailable("redis", "connection refused")
        return await threads(k, message)

    for mid, text in (("m1", "a table for 2"), ("m2", "broken"), ("m3", "at 8 pm")):
        await queue.submit(key, msg(text, mid))
    worker = await running(RunDispatcher(queue, 0, flaky, max_in_flight=4, retry_cap_s=0.05))
    try:
        await until(lambda: _status(queue, key, "m3", "completed"))
    finally:
        await stop(worker)
    one, broken, three = [await queue.get(key, m) for m in ("m1", "m2", "m3")]
    assert one is not None and one.status == "completed" and one.attempts == 3
    assert broken is not None and broken.status == "failed" and broken.result is None
    assert broken.error == "ValueError: no such thing"
    assert three is not None and three.result is not None and three.result.turn == 2
    assert await queue.depth(0) == 0


def test_only_outages_count_as_transient() -> None:
    assert transient(StoreUnavailable("redis", "down"))
    assert not transient(ValueError("bad"))
    assert not transient(RunQueueFull(0, 1, 1))
