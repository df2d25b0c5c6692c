"""The pooled host's own bookkeeping, on a real Redis: placement, the LRU cap, passivation."""

from __future__ import annotations

import asyncio
import collections
import time
import types
import uuid
import zlib
from collections.abc import Callable
from typing import Any

import pytest

from actors.directory import host_name
from actors.key import ThreadKey
from actors.redis_store import connect_redis
from actors.store import Incarnation, InMemoryThreadStore
from actors.thread import Thread
from actors.thread_host import ThreadHost
from stickyray.config import load_config
from stickyray.errors import ThreadPassivated
from stickyray.turns import AgentRequest, AgentResult, CompressResult, InboundMessage


def test_a_key_always_lands_on_the_same_host_and_keys_spread() -> None:
    keys = [ThreadKey.of(f"chat-{i}") for i in range(2000)]
    names = [host_name("app/abc", k, 4) for k in keys]
    assert names == [host_name("app/abc", k, 4) for k in keys], "deterministic"
    # The hash is crc32, not Python's per-process salted hash(): every replica agrees.
    assert names[0] == f"threadhost/app/abc/{zlib.crc32(b'default/chat-0') % 4}"
    counts = collections.Counter(names)
    assert len(counts) == 4 and min(counts.values()) > 400


async def open_host(redis_url: str, cap: int, name: str | None = None) -> ThreadHost:
    team = load_config(None)
    threads = team.threads.model_copy(update={"hosting": "pooled", "max_live_threads": cap})
    host = ThreadHost.__new__(ThreadHost)  # Ray awaits the async __init__; here we do
    await host.__init__(team.model_copy(update={"threads": threads}), redis_url, {}, "test", name)  # type: ignore[misc]
    return host


async def status(host: ThreadHost, thread: str) -> str:
    result = await host.handle(
        ThreadKey.of(thread), InboundMessage(text="/status", message_id=uuid.uuid4().hex)
    )
    return result.reply


async def test_the_least_recently_used_thread_closes_over_the_cap(redis_url: str) -> None:
    host = await open_host(redis_url, cap=2)
    a, b, c = (f"lru-{i}-{id(host)}" for i in range(3))
    for thread in (a, b, a, c):
        await status(host, thread)
    await asyncio.gather(*host._closing.values())
    assert await host.open_threads() == [ThreadKey.of(a), ThreadKey.of(c)]
    # The closed one reopens on its next message, as a new incarnation.
    await status(host, b)
    assert ThreadKey.of(b) in await host.open_threads()
    assert len(await host.open_threads()) == 2


async def test_passivate_closes_one_thread_and_a_retry_reopens_it(redis_url: str) -> None:
    host = await open_host(redis_url, cap=10)
    thread = f"pas-{id(host)}"
    await status(host, thread)
    await host.passivate(ThreadKey.of(thread))
    assert await host.open_threads() == []
    assert "active" in (await status(host, thread)).lower()
    assert await host.open_threads() == [ThreadKey.of(thread)]


async def test_the_thread_just_opened_is_never_the_one_evicted(redis_url: str) -> None:
    host = await open_host(redis_url, cap=1)
    busy, new = f"busy-{id(host)}", f"new-{id(host)}"
    await status(host, busy)
    async with host._threads[ThreadKey.of(busy)]._lock:  # a turn in progress there
        # Over the cap with the other thread busy: closing this one before its message ran
        # would make the redelivery open a second incarnation and run the turn again.
        assert "Turns so far: 0" in await status(host, new)
        assert set(await host.open_threads()) == {ThreadKey.of(busy), ThreadKey.of(new)}


async def test_an_idle_actor_goes_even_when_leaving_the_live_set_fails(
    redis_url: str, monkeypatch
) -> None:
    import actors.thread_actor as thread_actor

    killed: list[object] = []

    class Context:
        current_actor = "this actor"

        def get_node_id(self) -> str:
            return f"node-{uuid.uuid4().hex[:6]}"

        def get_actor_id(self) -> str:
            return uuid.uuid4().hex

    monkeypatch.setattr(thread_actor.ray, "get_runtime_context", Context)
    monkeypatch.setattr(thread_actor.ray, "kill", lambda actor, no_restart: killed.append(actor))
    team = load_config(None)
    quick = team.threads.model_copy(update={"idle_timeout_s": 0.05})
    actor = thread_actor.ThreadActor.__new__(thread_actor.ThreadActor)
    key = ThreadKey.of(f"idle-{uuid.uuid4().hex[:6]}")
    await actor.__init__(key, team.model_copy(update={"threads": quick}), redis_url, {}, "test")  # type: ignore[misc]

    async def redis_blip(me: object) -> None:
        raise ConnectionError("redis went away")

    monkeypatch.setattr(actor._live, "remove", redis_blip)
    await asyncio.wait_for(actor._idle_watch, timeout=10)
    # Closed but alive, it would keep the thread's name and bounce every message.
    assert killed == ["this actor"]


class Handle:
    """A host as another host reaches it through Ray: ``handle.passivate.remote(key)``."""

    def __init__(self, host: ThreadHost) -> None:
        self.passivate = types.SimpleNamespace(remote=host.passivate)


async def test_a_thread_moves_to_a_new_version_host_after_its_turn_in_progress(
    redis_url: str,
) -> None:
    """A config deploy names new hosts: the thread's next message comes to one while the old
    host is still running the thread's turn. Opening at once fenced that turn mid-way and ran
    it a second time in the new host."""
    old = await open_host(redis_url, cap=10, name=f"threadhost/app/v1/{uuid.uuid4().hex}")
    new = await open_host(redis_url, cap=10, name=f"threadhost/app/v2/{uuid.uuid4().hex}")
    hosts = {old._name: old, new._name: new}
    looked_up: list[str] = []

    def lookup(name: str) -> Handle | None:
        looked_up.append(name)
        return Handle(hosts[name]) if name in hosts else None

    old._lookup = new._lookup = lookup  # type: ignore[method-assign]
    key = ThreadKey.of(f"move-{uuid.uuid4().hex}")
    await status(old, key.thread_id)
    epoch = old._threads[key].epoch
    redis = connect_redis(redis_url)
    try:
        async with old._threads[key]._lock:  # a turn in progress in the old host
            moving = asyncio.create_task(status(new, key.thread_id))
            deadline = time.monotonic() + 10
            while key in await old.open_threads():  # asked to close it
                assert time.monotonic() < deadline, "the old host was never asked"
                await asyncio.sleep(0.01)
            assert not moving.done()
            # The turn in progress keeps its epoch: nothing fenced it.
            assert int(await redis.get(key.redis_key("epoch")) or 0) == epoch
        assert "Turns so far: 0" in await asyncio.wait_for(moving, 10)
        assert await new.open_threads() == [key] and await old.open_threads() == []
        assert int(await redis.get(key.redis_key("epoch")) or 0) == epoch + 1
        # Back in the old host (an old replica's message): the new one lets go the same way.
        await status(old, key.thread_id)
        assert await new.open_threads() == [] and await old.open_threads() == [key]
        # A holder that is gone (crashed) is not waited for; neither is the host itself.
        await redis.set(key.redis_key("host"), "threadhost/app/v0/gone")
        await old.passivate(key)
        looked_up.clear()
        await status(new, key.thread_id)
        await new.passivate(key)
        await status(new, key.thread_id)
        assert looked_up == ["threadhost/app/v0/gone"]
    finally:
        await redis.aclose()


class GatedAgents:
    """Agents whose every call waits for the test to let it answer; records the turns."""

    def __init__(self) -> None:
        self.turns: list[int] = []
        self.go = asyncio.Event()

    async def __call__(self, agent: str, request: AgentRequest) -> AgentResult:
        self.turns.append(request.turn)
        await self.go.wait()
        return AgentResult(agent=agent, reply=f"{agent}: {request.text}")

    async def compress(self, agent: str, request: object) -> CompressResult:
        return CompressResult()


async def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.005)


async def test_a_thread_still_closing_is_not_opened_again_under_its_turn(
    redis_url: str,
) -> None:
    """Asked to close a thread with a turn in progress (another host takes it over), the
    host forgot it at once; a message arriving meanwhile opened a second incarnation, which
    ran the pending turn again and fenced the first run: two runs, then a failed turn."""
    host = await open_host(redis_url, cap=10)
    store = host._store = InMemoryThreadStore()  # type: ignore[assignment]
    agents = host._agents = GatedAgents()  # type: ignore[assignment]
    key = ThreadKey.of(f"closing-{uuid.uuid4().hex}")
    first = asyncio.create_task(host.handle(key, InboundMessage(text="book", message_id="m1")))
    await wait_for(lambda: agents.turns == [1], "turn 1 never started")
    closing = asyncio.create_task(host.passivate(key))
    await wait_for(lambda: key not in host._threads, "never asked to close")
    status = InboundMessage(text="/status", message_id="m2")
    second = asyncio.create_task(host.handle(key, status))
    await wait_for(lambda: key in host._opening, "the message never reached the host")
    # Nothing on this path waits for I/O (in-memory store, no holder to ask): a few passes
    # of the loop take an open that does not wait for the close as far as the agent.
    for _ in range(20):
        await asyncio.sleep(0)
    assert agents.turns == [1], "turn 1 ran again under its first run"
    agents.go.set()
    assert (await asyncio.wait_for(first, 10)).status == "completed"
    await asyncio.wait_for(closing, 10)
    # Opened once the turn was stored: the message sees it, and it ran once.
    assert "Turns so far: 1" in (await asyncio.wait_for(second, 10)).reply
    assert agents.turns == [1]
    assert [t.status for t in await store.turns(key)] == ["completed"]


async def test_a_message_given_up_on_does_not_cancel_the_open_others_wait_for(
    redis_url: str,
) -> None:
    """Two messages of a thread share its one open; the first one's request cancelled (its
    client went away) cancelled the open for the second too."""
    host = await open_host(redis_url, cap=10)
    store = InMemoryThreadStore()
    reading, read = asyncio.Event(), asyncio.Event()

    class SlowStore(InMemoryThreadStore):
        async def open(
            self, key: ThreadKey, count_attempt: bool = True, token: str | None = None
        ) -> Incarnation:
            reading.set()
            await read.wait()  # Redis slow to answer
            return await store.open(key, count_attempt, token)

    host._store = SlowStore()  # type: ignore[assignment]
    key = ThreadKey.of(f"shared-{uuid.uuid4().hex}")
    gone = asyncio.create_task(host.handle(key, InboundMessage(text="/status", message_id="a")))
    waiting = asyncio.create_task(host.handle(key, InboundMessage(text="/status", message_id="b")))
    await asyncio.wait_for(reading.wait(), 10)
    gone.cancel()
    await asyncio.wait({gone})
    read.set()
    assert "Turns so far: 0" in (await asyncio.wait_for(waiting, 10)).reply
    assert await host.open_threads() == [key]


async def test_an_open_every_waiter_gave_up_on_is_still_the_threads_open_one(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It took an epoch (and may have run a pending turn): the next message uses it."""
    host = await open_host(redis_url, cap=10)
    key = ThreadKey.of(f"orphan-{uuid.uuid4().hex[:6]}")
    opening = asyncio.Event()
    opened: list[int] = []
    real_open = Thread.open

    async def slow_open(*args: Any, **kwargs: Any) -> Thread:
        await opening.wait()  # until the only waiter is gone
        thread = await real_open(*args, **kwargs)
        opened.append(thread.epoch)
        return thread

    monkeypatch.setattr(Thread, "open", slow_open)
    waiter = asyncio.ensure_future(status(host, key.thread_id))
    for _ in range(500):  # until the open has started
        if key in host._opening:
            break
        await asyncio.sleep(0.01)
    waiter.cancel()
    opening.set()
    for _ in range(500):
        if opened:
            break
        await asyncio.sleep(0.01)
    for _ in range(500):
        if key not in host._opening:
            break
        await asyncio.sleep(0.01)
    assert await host.open_threads() == [key]
    await status(host, key.thread_id)
    assert len(opened) == 1  # not opened again, with a second epoch


async def two_version_hosts(redis_url: str) -> tuple[ThreadHost, ThreadHost, dict[str, Any]]:
    """An old and a new config version's host of one app, which reach each other as through
    Ray; the dict's ``gate``, when set, holds every such call until it opens."""
    old = await open_host(redis_url, cap=10, name=f"threadhost/app/v1/{uuid.uuid4().hex}")
    new = await open_host(redis_url, cap=10, name=f"threadhost/app/v2/{uuid.uuid4().hex}")
    hosts = {old._name: old, new._name: new}
    calls: dict[str, Any] = {"gate": None, "asked": []}

    def lookup(name: str) -> Any:
        if name not in hosts:
            return None
        host = hosts[name]

        async def passivate(key: ThreadKey) -> None:
            calls["asked"].append(name)
            if calls["gate"] is not None:
                await calls["gate"].wait()
            await host.passivate(key)

        return types.SimpleNamespace(passivate=types.SimpleNamespace(remote=passivate))

    old._lookup = new._lookup = lookup  # type: ignore[method-assign]
    return old, new, calls


async def test_a_thread_still_opening_when_another_host_takes_it_over_is_closed_once_open(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Asked to close a thread it had not finished opening, the old host said done at once;
    its open then took an epoch after the new host's and fenced the new host's turns."""
    old, new, _ = await two_version_hosts(redis_url)
    key = ThreadKey.of(f"opening-{uuid.uuid4().hex}")
    reading, read = asyncio.Event(), asyncio.Event()
    real_open = Thread.open

    async def slow_first_open(*args: Any, **kwargs: Any) -> Thread:
        if not reading.is_set():  # the old host's: Redis slow to answer it
            reading.set()
            await read.wait()
        return await real_open(*args, **kwargs)

    monkeypatch.setattr(Thread, "open", slow_first_open)
    first = asyncio.create_task(status(old, key.thread_id))
    await asyncio.wait_for(reading.wait(), 10)
    moving = asyncio.create_task(status(new, key.thread_id))
    for _ in range(20):  # the new host has asked the old one by now
        await asyncio.sleep(0.01)
    assert not moving.done(), "the new host opened the thread while the old one opened it"
    read.set()
    assert "Turns so far: 0" in await asyncio.wait_for(first, 10)
    assert "Turns so far: 0" in await asyncio.wait_for(moving, 10)
    assert await old.open_threads() == [] and await new.open_threads() == [key]
    # The new host's incarnation is the thread's latest: its next turn is not fenced.
    assert "Turns so far: 0" in await status(new, key.thread_id)


async def test_two_hosts_that_each_find_the_other_holding_a_thread_do_not_wait_for_each_other(
    redis_url: str,
) -> None:
    """Each asks the other to close the thread while both are opening it; waiting for an
    open that waits in turn would hold both for the handover timeout (10 minutes)."""
    old, new, calls = await two_version_hosts(redis_url)
    key = ThreadKey.of(f"both-{uuid.uuid4().hex}")
    redis = connect_redis(redis_url)
    try:
        await redis.set(key.redis_key("host"), str(old._name))  # the old host held it, then closed
        calls["gate"] = asyncio.Event()
        to_new = asyncio.create_task(status(new, key.thread_id))
        await wait_for(lambda: calls["asked"] == [old._name], "the new host never asked")
        to_old = asyncio.create_task(status(old, key.thread_id))
        await wait_for(lambda: len(calls["asked"]) == 2, "the old host never asked")
        calls["gate"].set()
        # The later one to record itself opens the thread; the other's message goes again.
        assert "Turns so far: 0" in await asyncio.wait_for(to_old, 10)
        with pytest.raises(ThreadPassivated):
            await asyncio.wait_for(to_new, 10)
        assert await old.open_threads() == [key] and await new.open_threads() == []
    finally:
        await redis.aclose()


async def test_a_host_renews_its_record_as_the_holder_of_a_thread_it_keeps_open(
    redis_url: str,
) -> None:
    """The record expires with the thread's checkpoints (30 days): a thread kept open longer
    lost it, and after a deploy the new host opened it under its turn in progress."""
    host = await open_host(redis_url, cap=10, name=f"threadhost/app/v1/{uuid.uuid4().hex}")
    key = ThreadKey.of(f"held-{uuid.uuid4().hex}")
    ttl = host._team.threads.checkpoint_ttl_s
    redis = connect_redis(redis_url)
    try:
        await status(host, key.thread_id)
        assert ttl - 60 < await redis.ttl(key.redis_key("host")) <= ttl
        await redis.expire(key.redis_key("host"), 100)
        await status(host, key.thread_id)  # recorded moments ago: not renewed yet
        assert await redis.ttl(key.redis_key("host")) <= 100
        host._held_at[key] -= ttl / 2  # half its expiry later
        await status(host, key.thread_id)
        assert ttl - 60 < await redis.ttl(key.redis_key("host")) <= ttl
        assert await redis.get(key.redis_key("host")) == host._name.encode()  # type: ignore[union-attr]
    finally:
        await redis.aclose()
