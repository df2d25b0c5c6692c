"""Writes sent twice and state that expired, on a real redis-server: epochs never repeat, and a
command Redis ran whose answer was lost (the client sends it again) changes nothing twice."""

from __future__ import annotations

import types
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from actors._thread_scripts import PARTS
from actors.key import ThreadKey
from actors.redis_store import RedisThreadStore, connect_redis
from actors.store import Checkpoint, InMemoryThreadStore
from actors.thread import Thread
from actors.thread_host import ThreadHost
from stickyray.config import load_config
from stickyray.errors import StoreUnavailable, ThreadFenced
from stickyray.turns import AgentRequest, AgentResult, CompressResult, InboundMessage, TurnResult


def fresh(prefix: str) -> ThreadKey:
    return ThreadKey.of(f"{prefix}-{uuid.uuid4().hex[:12]}")


def msg(mid: str, text: str = "book a table") -> InboundMessage:
    return InboundMessage(text=text, message_id=mid)


def done(key: ThreadKey, mid: str, turn: int) -> TurnResult:
    return TurnResult(thread_id=key.thread_id, message_id=mid, turn=turn, agent="a", reply="ok")


def resend_once(client: aioredis.Redis, matches: Callable[[tuple[Any, ...]], bool]) -> list[int]:
    """Make ``client`` run the next command ``matches`` picks twice, answering the second run:
    what redis-py's Retry does when the first answer is late. Returns the count of resends."""
    real = client.execute_command
    resent: list[int] = []

    async def execute_command(*args: Any, **options: Any) -> Any:
        if not resent and matches(args):
            resent.append(1)
            await real(*args, **options)  # Redis runs it; its answer never arrives
        return await real(*args, **options)

    client.execute_command = execute_command  # type: ignore[method-assign]
    return resent


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = connect_redis(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


async def test_an_epoch_is_never_handed_out_again_after_the_state_expired(
    client: aioredis.Redis,
) -> None:
    """The epoch restarted at 1 once a thread's keys expired, which an incarnation still open
    from before (an old pooled host) held: its writes passed the fence."""
    store = RedisThreadStore(client, ttl_s=3600)
    key = fresh("expired")
    # A state that began an hour ago (the shortest retention), opened a thousand times since.
    seconds, _ = await client.time()
    await client.set(key.redis_key("epoch"), (seconds - 3600) * 1_000_000 + 1000)
    old = (await store.open(key)).epoch
    assert old % 1_000_000 == 1001
    assert await store.accept(key, old, msg("m1")) == 1
    await store.commit(key, old, Checkpoint(turn=1, version=1), done(key, "m1", 1))
    await client.delete(*(key.redis_key(part) for part in PARTS))  # as their expiry does

    new = (await store.open(key)).epoch
    assert old < new < 2**53  # exact as a Lua number, so the fence compares it right
    assert new % 1_000_000 == 1  # the first open of the state that begins now
    assert await store.accept(key, new, msg("m2")) == 1
    with pytest.raises(ThreadFenced):
        await store.accept(key, old, msg("m3"))
    with pytest.raises(ThreadFenced):
        await store.commit(key, old, Checkpoint(turn=1, version=1), done(key, "m3", 1))
    await store.commit(key, new, Checkpoint(turn=1, version=1), done(key, "m2", 1))
    assert [t.message_id for t in await store.turns(key)] == ["m2"]


async def test_an_open_sent_again_takes_one_epoch_and_counts_one_attempt(
    client: aioredis.Redis,
) -> None:
    """The open script's answer was late; the client sent it again and Redis ran it twice:
    the pending turn counted two attempts, and was abandoned without being run again."""
    store = RedisThreadStore(client, ttl_s=3600)
    key = fresh("reopen")
    first = (await store.open(key)).epoch
    await store.accept(key, first, msg("m1"))  # then its incarnation dies mid-turn
    resent = resend_once(client, lambda args: args[:2] == ("EVALSHA", store._open.sha))
    again = await store.open(key)
    assert resent == [1]
    assert again.epoch == first + 1
    assert again.pending is not None and again.pending.attempts == 2
    assert int(await client.get(key.redis_key("epoch")) or 0) == again.epoch


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_an_open_with_the_last_opens_token_is_that_open_again(
    redis_url: str, kind: str
) -> None:
    """Part of the store contract: one token, one epoch and one attempt, while that epoch is
    current; after another open took a newer one, the token opens anew."""
    key = fresh("token")
    async with RedisThreadStore.from_url(redis_url, ttl_s=3600) as redis_store:
        store = InMemoryThreadStore() if kind == "memory" else redis_store
        epoch = (await store.open(key)).epoch
        await store.accept(key, epoch, msg("m1"))
        once = await store.open(key, token="t1")
        twice = await store.open(key, token="t1")
        assert once == twice and once.pending is not None and once.pending.attempts == 2
        other = await store.open(key, token="t2")
        assert other.epoch == once.epoch + 1
        late = await store.open(key, token="t1")  # not the last open: a new one
        assert late.epoch == other.epoch + 1 and late.pending is not None
        assert late.pending.attempts == 4


class Agents:
    """The triage agent answers every message."""

    def __init__(self) -> None:
        self.turns: list[int] = []

    async def __call__(self, agent: str, request: AgentRequest) -> AgentResult:
        self.turns.append(request.turn)
        return AgentResult(agent=agent, reply=f"re: {request.text}")

    async def compress(self, agent: str, request: Any) -> CompressResult:
        return CompressResult(memory_id="m")


class Outages(InMemoryThreadStore):
    """Commits fail while ``down``; ``open_lost`` opens are applied but answered with an error."""

    down = False
    open_lost = 0

    async def commit(self, *args: Any, **kwargs: Any) -> Any:
        if self.down:
            raise StoreUnavailable("redis", "down")
        return await super().commit(*args, **kwargs)

    async def open(self, *args: Any, **kwargs: Any) -> Any:
        incarnation = await super().open(*args, **kwargs)
        if self.open_lost:
            self.open_lost -= 1
            raise StoreUnavailable("redis", "Timeout reading from socket")
        return incarnation


async def test_redis_outages_during_a_turn_do_not_abandon_it() -> None:
    """Two outages as the turn's outcome was written counted as two interruptions: the turn
    was recorded as failed, 'interrupted ... (its actor stopped ...)'."""
    team, store, agents = load_config(None), Outages(), Agents()
    key = fresh("outage")
    thread = await Thread.open(key, team, store, agents)
    store.down = True
    for _ in range(3):  # the ingress (or the run queue) delivers the message again
        with pytest.raises(StoreUnavailable):
            await thread.handle(msg("m1"))
    store.down = False
    result = await thread.handle(msg("m1"))
    assert (result.turn, result.status, result.error) == (1, "completed", None)
    assert agents.turns == [1, 1, 1, 1]  # run again each time, never given up


async def test_a_reopen_whose_answer_was_lost_is_not_counted_twice() -> None:
    """The reopen after a cancelled turn ran in Redis but answered with an error; the next
    reopen, a new open, counted the turn's attempt a second time and abandoned it."""
    team, store, agents = load_config(None), Outages(), Agents()
    key = fresh("lost-open")
    thread = await Thread.open(key, team, store, agents)
    await store.accept(key, thread.epoch, msg("m1"))  # accepted, then its request cancelled
    thread._stale = thread._interrupted = True
    store.open_lost = 1
    with pytest.raises(StoreUnavailable):
        await thread.handle(msg("m2", "for two"))
    await thread.handle(msg("m2", "for two"))
    assert [(t.turn, t.status) for t in await store.turns(key)] == [
        (1, "completed"),
        (2, "completed"),
    ]


async def test_a_hosts_opening_whose_answer_was_lost_is_not_counted_twice(
    redis_url: str,
) -> None:
    """A turn left pending by a crashed incarnation: the host's opening counted its attempt,
    but its answer was lost; the next delivery's opening counted it again and abandoned the
    turn, which never ran."""
    team = load_config(None)
    threads = team.threads.model_copy(update={"hosting": "pooled"})
    host = ThreadHost.__new__(ThreadHost)  # Ray awaits the async __init__; here we do
    await host.__init__(team.model_copy(update={"threads": threads}), redis_url, {}, "t", None)  # type: ignore[misc]
    store, agents = Outages(), Agents()
    host._store, host._agents = store, agents  # type: ignore[assignment]
    key = fresh("host-open")
    crashed = await store.open(key)
    await store.accept(key, crashed.epoch, msg("m1"))  # its actor died before the commit
    store.open_lost = 1
    try:
        with pytest.raises(StoreUnavailable):
            await host.handle(key, msg("m1"))
        result = await host.handle(key, msg("m1"))  # delivered again
    finally:
        host._idle_watch.cancel()
        await host._redis.aclose()
    assert (result.turn, result.status, result.error) == (1, "completed", None)
    assert agents.turns == [1]


class OldHost:
    """The host holding the thread before, as another host reaches it through Ray."""

    def __init__(self) -> None:
        self.asked: list[ThreadKey] = []

        async def passivate(key: ThreadKey) -> None:
            self.asked.append(key)

        self.passivate = types.SimpleNamespace(remote=passivate)


async def test_a_holder_record_sent_again_still_names_the_host_it_replaced(
    redis_url: str, client: aioredis.Redis
) -> None:
    """The record's answer was late and the client sent it again: the second run answered
    with the new host's own name, so the old host, still running the thread's turn, was never
    asked to close it."""
    team = load_config(None)
    threads = team.threads.model_copy(update={"hosting": "pooled"})
    host = ThreadHost.__new__(ThreadHost)  # Ray awaits the async __init__; here we do
    name = f"threadhost/app/v2/{uuid.uuid4().hex}"
    await host.__init__(team.model_copy(update={"threads": threads}), redis_url, {}, "t", name)  # type: ignore[misc]
    old, old_name = OldHost(), f"threadhost/app/v1/{uuid.uuid4().hex}"
    host._lookup = lambda held_by: old if held_by == old_name else None  # type: ignore[assignment,method-assign]
    key = fresh("holder")
    await client.set(key.redis_key("host"), old_name, ex=3600)
    resent = resend_once(host._redis, lambda args: key.redis_key("host") in args)
    try:
        await host._take_over(key)
    finally:
        host._idle_watch.cancel()
        await host._redis.aclose()
    assert resent == [1]
    assert old.asked == [key]
    assert await client.get(key.redis_key("host")) == name.encode()
    assert 3000 < await client.ttl(key.redis_key("host")) <= threads.checkpoint_ttl_s
