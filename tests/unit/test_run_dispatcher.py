"""The run dispatcher on a real redis-server, without Ray: room per thread, a worker that
stopped or lost its lease, reads lost, outages retried until they last too long, stopping.
"""

from __future__ import annotations

import asyncio
import functools
import json
import threading
import time
import types
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from actors.key import ThreadKey
from actors.run_queue import LeaseLost, RunQueue
from serve_app.runs import RunDispatcher, transient
from stickyray.config import RunsConfig, load_config
from stickyray.errors import RunQueueFull, StoreUnavailable
from stickyray.turns import InboundMessage, TurnResult
from tests.unit.test_runs import (
    Gate,
    GatedAgents,
    Threads,
    client,  # noqa: F401 - the fixture
    dispatcher,
    fresh,
    msg,
    queue_of,
    running,
    status_is,
    stop,
    until,
)
from tests.unit.test_thread import booking_agents


async def test_a_thread_with_many_runs_takes_no_room_from_others(client: Any) -> None:  # noqa: F811
    gate = Gate()
    threads = Threads(client, load_config(None), GatedAgents(gate))
    queue = queue_of(client)
    busy, other = fresh(), fresh()
    for i in range(12):  # more than the read-ahead and in-flight slots of one worker
        await queue.submit(busy, msg(f"slow {i}", f"b{i}"))
    await queue.submit(other, msg("a table for 4", "o1"))
    worker = await running(dispatcher(queue, threads, max_in_flight=2))
    try:
        await until(lambda: status_is(queue, other, "o1", "completed"))
        assert gate.waiting == 1  # the busy thread's first run still holds its turn
        gate.open.set()
        await until(lambda: status_is(queue, busy, "b11", "completed"))
    finally:
        await stop(worker)
    assert [t.message_id for t in await threads.store.turns(busy)] == [f"b{i}" for i in range(12)]


async def test_a_run_left_by_a_stopped_worker_finishes_once(client: Any) -> None:  # noqa: F811
    team = load_config(None)
    queue, key = queue_of(client), fresh()
    await queue.submit(key, msg("a table for 2", "m1"))
    await queue.submit(key, msg("at 8 pm", "m2"))
    threads = Threads(client, team, booking_agents())
    stored = asyncio.Event()

    async def stops_after_the_turn(k: ThreadKey, message: InboundMessage) -> TurnResult:
        result = await threads(k, message)  # the turn is stored in the thread...
        stored.set()
        await asyncio.Event().wait()  # ...and the worker stops before finishing the run
        return result

    first = await running(dispatcher(queue, stops_after_the_turn))
    await asyncio.wait_for(stored.wait(), 10)
    await stop(first)
    assert await status_is(queue, key, "m1", "running")

    # The next worker reads the run again; the thread answers it from its stored turn.
    again = Threads(client, team, booking_agents())
    second = await running(dispatcher(queue, again))
    try:
        await until(lambda: status_is(queue, key, "m2", "completed"))
    finally:
        await stop(second)
    one, two = await queue.get(key, "m1"), await queue.get(key, "m2")
    assert one is not None and one.result is not None
    assert (one.status, one.result.turn, one.attempts) == ("completed", 1, 2)
    assert two is not None and two.result is not None and two.result.turn == 2
    history = await threads.store.turns(key)
    assert [t.message_id for t in history] == ["m1", "m2"]  # no turn ran twice
    assert [t for _, t in again.delivered] == ["a table for 2", "at 8 pm"]
    assert await queue.depth() == 0


async def test_one_worker_reads_at_a_time(client: Any) -> None:  # noqa: F811
    team = load_config(None)
    queue, key = queue_of(client), fresh()
    one, two = Threads(client, team, booking_agents()), Threads(client, team, booking_agents())
    first = await running(dispatcher(queue, one, lease_s=0.6))
    await queue.submit(key, msg("a table for 2", "m1"))
    await until(lambda: status_is(queue, key, "m1", "completed"))
    second = await running(dispatcher(queue, two, lease_s=0.6))
    try:
        # For three lease periods, the first worker keeps renewing its lease.
        deadline = asyncio.get_running_loop().time() + 1.8
        sent = 1
        while asyncio.get_running_loop().time() < deadline:
            sent += 1
            await queue.submit(key, msg(f"message {sent}", f"m{sent}"))
            await until(functools.partial(status_is, queue, key, f"m{sent}", "completed"))
        assert two.delivered == [] and len(one.delivered) == sent
        await stop(first)  # it gives the lease up: the second takes over
        await queue.submit(key, msg("at 8 pm", "last"))
        await until(lambda: status_is(queue, key, "last", "completed"))
        assert [t for _, t in two.delivered] == ["at 8 pm"]
    finally:
        await stop(second)


async def test_outages_are_retried_and_other_errors_fail_the_run(client: Any) -> None:  # noqa: F811
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
    worker = await running(dispatcher(queue, flaky, retry_cap_s=0.05))
    try:
        await until(lambda: status_is(queue, key, "m3", "completed"))
    finally:
        await stop(worker)
    one, broken, three = [await queue.get(key, m) for m in ("m1", "m2", "m3")]
    assert one is not None and one.status == "completed" and one.attempts == 3
    assert broken is not None and broken.status == "failed" and broken.result is None
    assert broken.error == "ValueError: no such thing"
    assert three is not None and three.result is not None and three.result.turn == 2
    assert await queue.depth() == 0


async def test_an_unreadable_entry_fails_its_run_and_the_rest_go_on(client: Any) -> None:  # noqa: F811
    team = load_config(None)
    queue, key = queue_of(client), fresh()
    threads = Threads(client, team, booking_agents())
    await queue.submit(key, msg("a table for 2", "m1"))

    async def rewritten(fields: dict[str, Any]) -> None:
        """The queue's last entry, as ``fields`` in place of its message."""
        entries = await client.xrange(queue.keys.queue)
        await client.xadd(queue.keys.queue, {"thread": str(key), "message": json.dumps(fields)})
        await client.xdel(queue.keys.queue, entries[-1][0])

    # An entry a later release might write, with a field this one does not know: still run.
    await queue.submit(key, msg("at 8 pm", "m2"))
    await rewritten(msg("at 8 pm", "m2").model_dump() | {"priority": 1})
    # One that cannot be a message (no text): failed.
    await queue.submit(key, msg("by the window", "m3"))
    await rewritten({"message_id": "m3", "channel": "api"})
    await client.xadd(queue.keys.queue, {"garbage": "1"})
    await queue.submit(key, msg("yes please", "m4"))
    worker = await running(dispatcher(queue, threads))
    try:
        await until(lambda: status_is(queue, key, "m4", "completed"))
    finally:
        await stop(worker)
    broken = await queue.get(key, "m3")
    assert broken is not None and broken.status == "failed" and broken.result is None
    assert broken.error is not None and "unreadable run" in broken.error
    assert [t.message_id for t in await threads.store.turns(key)] == ["m1", "m2", "m4"]
    assert await queue.depth() == 0


async def test_a_worker_that_lost_its_lease_acts_on_nothing(client: Any) -> None:  # noqa: F811
    queue, key = queue_of(client), fresh()
    await queue.join()
    await queue.submit(key, msg("a table for 2", "m1"))
    assert await queue.acquire("a", 0.2)
    assert not await queue.acquire("b", 5)
    (run,), _, _ = await queue.read("a", 10)
    assert await queue.start("a", run)
    # "a" stalls past its lease; "b" takes over and finds the run "a" had read.
    await until(lambda: queue.acquire("b", 5))
    with pytest.raises(LeaseLost):
        await queue.start("a", run)
    with pytest.raises(LeaseLost):
        await queue.read("a", 10)
    (again,), _, delivered = await queue.read("b", 10, after="0")
    assert again == run and delivered == run.entry
    result = TurnResult(
        thread_id=key.thread_id, message_id="m1", turn=1, agent="bookings", reply="booked"
    )
    assert await queue.start("b", again)
    assert await queue.finish("b", again, result=result)
    with pytest.raises(LeaseLost):
        await queue.finish("a", run, result=result)
    # Finished once: neither started nor finished again, and its record keeps its expiry.
    assert not await queue.start("b", again)
    assert not await queue.finish("b", again, error="late")
    record = await queue.get(key, "m1")
    assert record is not None and record.status == "completed" and record.attempts == 2
    assert record.error is None and await client.ttl(queue.keys.record(key, "m1")) > 0


class LosesOneRead(RunQueue):
    """A queue whose first reply with runs in it is lost: Redis read them, the worker did
    not get them, and the read is sent again (as redis-py retries a dropped connection)."""

    lost: list[str] = []
    reads = 0
    before_retry: Callable[[], Any] | None = None

    async def read(
        self, token: str, count: int, *, after: str | None = None, seen: str = "0-0"
    ) -> Any:
        self.reads += 1
        got = await super().read(token, count, after=after, seen=seen)
        if after is None and got[0] and not self.lost:
            self.lost.extend(r.message.message_id for r in got[0])
            if self.before_retry is not None:
                await self.before_retry()
            return await super().read(token, count, after=after, seen=seen)
        return got


async def test_runs_read_and_lost_are_read_again_in_order(client: Any) -> None:  # noqa: F811
    team = load_config(None)
    queue = LosesOneRead(client, f"app-{uuid.uuid4().hex[:8]}", RunsConfig())
    queue.lost = []
    key, threads = fresh(), Threads(client, team, booking_agents())
    await queue.submit(key, msg("a table for 2", "m1"))
    worker = await running(dispatcher(queue, threads, idle_wait_ms=50))
    try:
        await until(lambda: queue.lost)
        await queue.submit(key, msg("at 8 pm", "m2"))
        await until(lambda: status_is(queue, key, "m2", "completed"))
    finally:
        await stop(worker)
    assert queue.lost == ["m1"]
    assert [t.message_id for t in await threads.store.turns(key)] == ["m1", "m2"]
    assert await queue.depth() == 0


async def test_a_run_that_meets_outages_for_too_long_fails(client: Any) -> None:  # noqa: F811
    team = load_config(None)
    queue, key = queue_of(client), fresh()
    threads = Threads(client, team, booking_agents())

    async def redis_down_for_m1(k: ThreadKey, message: InboundMessage) -> TurnResult:
        if message.message_id == "m1":
            raise StoreUnavailable("redis", "connection refused")
        return await threads(k, message)

    await queue.submit(key, msg("a table for 2", "m1"))
    await queue.submit(key, msg("at 8 pm", "m2"))
    worker = await running(
        dispatcher(queue, redis_down_for_m1, retry_cap_s=0.05, give_up_after_s=0.3)
    )
    try:
        await until(lambda: status_is(queue, key, "m2", "completed"))
    finally:
        await stop(worker)
    failed = await queue.get(key, "m1")
    assert failed is not None and failed.status == "failed" and failed.attempts > 1
    assert failed.error is not None and failed.error.startswith("gave up after 0.3 s")
    assert "StoreUnavailable" in failed.error


async def test_a_run_is_tried_until_its_outages_last_give_up_after_s(
    client: Any,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """It gave up when its next backoff would pass the deadline: up to a whole backoff
    (30 s by default) early, while its error said the outages had lasted the full time."""
    queue, key = queue_of(client), fresh()
    clock = [1000.0]  # the worker's clock, moved only by its backoffs
    tries: list[float] = []

    async def down(k: ThreadKey, message: InboundMessage) -> TurnResult:
        tries.append(round(clock[0] - 1000.0, 3))
        raise StoreUnavailable("redis", "connection refused")

    async def backoff(seconds: float) -> None:
        clock[0] += seconds
        await asyncio.sleep(0)

    # The module's own view of the clock: asyncio's stays real.
    worker_time = types.SimpleNamespace(monotonic=lambda: clock[0], time=time.time)
    monkeypatch.setattr("serve_app.runs.time", worker_time)
    await queue.submit(key, msg("a table for 2", "m1"))
    worker_of = dispatcher(queue, down, retry_cap_s=0.4, give_up_after_s=0.5)
    monkeypatch.setattr(worker_of, "pause", backoff)
    worker = await running(worker_of)
    try:
        await until(lambda: status_is(queue, key, "m1", "failed"))
    finally:
        await stop(worker)
    # Backoffs of 0.05, 0.1, 0.2, then 0.4 cut to the deadline: the last try is at it.
    assert tries == [0.0, 0.05, 0.15, 0.35, 0.5]


async def test_a_lost_read_keeps_order_and_the_worker_does_not_spin(client: Any) -> None:  # noqa: F811
    gate = Gate()
    threads = Threads(client, load_config(None), GatedAgents(gate))
    queue = LosesOneRead(client, f"app-{uuid.uuid4().hex[:8]}", RunsConfig())
    queue.lost = []
    key = fresh()

    async def queue_the_next() -> None:  # queued before the read is sent again
        await queue.submit(key, msg("at 8 pm", "c2"))

    queue.before_retry = queue_the_next
    await queue.submit(key, msg("slow: a table for 2", "c1"))
    worker = await running(dispatcher(queue, threads, idle_wait_ms=200))
    try:
        await until(lambda: gate.waiting == 1)  # c1 came back and is being delivered
        # While it is held, the worker waits for new runs instead of reading in a loop.
        # (A window of time: a spinning loop reads thousands of times in it.)
        reads = queue.reads
        await asyncio.sleep(0.6)
        assert queue.reads - reads <= 10
        gate.open.set()
        await until(lambda: status_is(queue, key, "c2", "completed"))
    finally:
        await stop(worker)
    assert queue.lost == ["c1"]
    assert [t.message_id for t in await threads.store.turns(key)] == ["c1", "c2"]


async def test_the_give_up_clock_starts_at_the_first_outage(client: Any) -> None:  # noqa: F811
    gate = Gate()
    threads = Threads(client, load_config(None), GatedAgents(gate))
    queue, busy, other = queue_of(client), fresh(), fresh()
    failed_once: list[str] = []

    async def one_outage(k: ThreadKey, message: InboundMessage) -> TurnResult:
        if k == other and not failed_once:
            failed_once.append(message.message_id)
            raise StoreUnavailable("redis", "connection refused")
        return await threads(k, message)

    await queue.submit(busy, msg("slow: a table for 2", "b1"))
    await queue.submit(other, msg("a table for 4", "o1"))
    worker = await running(
        dispatcher(queue, one_outage, max_in_flight=1, give_up_after_s=0.3, retry_cap_s=0.05)
    )
    try:
        await until(lambda: gate.waiting == 1)
        started = asyncio.get_running_loop().time()
        # o1 waits for the only delivery slot for longer than give_up_after_s...
        await until(lambda: asyncio.get_running_loop().time() - started > 0.5)
        gate.open.set()
        await until(lambda: status_is(queue, other, "o1", "completed"))
    finally:
        await stop(worker)
    # ...and then meets one outage, which it outlives: waiting is not an outage.
    record = await queue.get(other, "o1")
    assert failed_once == ["o1"] and record is not None and record.attempts == 2


async def test_stop_ends_a_worker_that_is_retrying_an_outage(client: Any) -> None:  # noqa: F811
    queue, key = queue_of(client), fresh()

    async def redis_down(k: ThreadKey, message: InboundMessage) -> TurnResult:
        raise StoreUnavailable("redis", "connection refused")

    await queue.submit(key, msg("a table for 2", "m1"))
    worker = await running(dispatcher(queue, redis_down, retry_cap_s=30.0))
    await until(lambda: status_is(queue, key, "m1", "running"))
    await stop(worker)  # within its 10 s bound, though the next retry is up to 30 s away
    assert await status_is(queue, key, "m1", "running")  # still queued for the next worker
    assert await queue.acquire("next", 1)  # the lease was given up


def test_only_outages_count_as_transient() -> None:
    from ray.exceptions import ActorDiedError, RayTaskError
    from ray.serve.exceptions import RayServeException

    for outage in (
        StoreUnavailable("redis", "down"),
        ActorDiedError(),
        RayServeException("application is being deployed"),
        ConnectionError("refused"),
        TimeoutError(),
    ):
        assert transient(outage), outage
    assert not transient(ValueError("bad"))
    assert not transient(RunQueueFull(1, 1))
    # An error that could not cross processes, and a thread actor that cannot start.
    assert not transient(RayTaskError("handle", "traceback", None))
    creation = RayTaskError("ThreadActor.__init__", "Traceback: ...", ValueError("bad"))
    assert not transient(ActorDiedError(creation))


async def test_a_run_read_while_the_worker_stops_is_left_queued_behind_its_thread(
    client: Any,  # noqa: F811
) -> None:
    """Stopping (a deploy) lands while the reader fetches a thread's next run: delivering it
    would run it before the runs still queued ahead of it, beside the next worker."""
    queue = queue_of(client)
    key = fresh()
    delivered: list[str] = []
    hang = asyncio.Event()

    async def deliver(key: ThreadKey, message: InboundMessage) -> TurnResult:
        delivered.append(message.message_id)
        if message.message_id == "r1":
            await hang.wait()  # a turn that is still running when the worker stops
        return TurnResult(
            thread_id=key.thread_id, message_id=message.message_id, turn=1, agent=None, reply="ok"
        )

    worker = dispatcher(queue, deliver, idle_wait_ms=1000)
    armed: list[bool] = []
    read = queue.read

    async def read_while_stopping(*args: Any, **kwargs: Any) -> Any:
        if armed and not armed[0]:
            armed[0] = True
            worker.stop()  # while this read is in flight
        return await read(*args, **kwargs)

    queue.read = read_while_stopping  # type: ignore[method-assign]
    await queue.submit(key, msg("one", "r1"))
    await queue.submit(key, msg("two", "r2"))
    running = asyncio.create_task(worker.run())
    await until(lambda: delivered == ["r1"])
    armed.append(False)
    await queue.submit(key, msg("three", "r3"))
    await asyncio.wait_for(running, 10)
    assert armed == [True]
    assert not [task for task in worker._tasks if not task.done()]
    statuses = [(await queue.get(key, m)).status for m in ("r1", "r2", "r3")]  # type: ignore[union-attr]
    assert (delivered, statuses) == (["r1"], ["running", "queued", "queued"])


def test_stopping_does_not_spin_on_a_delivery_that_ended_but_is_still_listed() -> None:
    """A delivery can end while its removal from the in-hand map is still queued: stopping
    must wait for the ones running, not loop on that one without ever yielding."""
    never_read = types.SimpleNamespace(replies=None)  # the test reaches no queue
    worker = RunDispatcher(never_read, Any, max_in_flight=1)  # type: ignore[arg-type]
    stopped = threading.Event()

    async def stop_with_a_finished_task_listed() -> None:
        finished = asyncio.get_running_loop().create_task(asyncio.sleep(0))
        await finished
        worker._tasks[finished] = "0-1"  # its callback has not taken it out yet
        await worker._stop_deliveries([])
        stopped.set()

    runner = threading.Thread(
        target=asyncio.run, args=(stop_with_a_finished_task_listed(),), daemon=True
    )
    runner.start()
    runner.join(timeout=10)
    assert stopped.is_set(), "stopping spun on a finished delivery"
