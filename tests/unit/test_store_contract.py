"""One contract for every thread store: in-memory and Redis (a real redis-server)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.exceptions import MasterDownError, ResponseError

from actors.key import ThreadKey
from actors.redis_store import RedisThreadStore, connect_redis
from actors.store import Checkpoint, InMemoryThreadStore
from memory.buffer import BufferEntry
from stickyray.errors import (
    CheckpointConflict,
    MessageIdReused,
    StoreUnavailable,
    ThreadFenced,
    TurnPending,
)
from stickyray.turns import InboundMessage, TurnResult

Store = InMemoryThreadStore | RedisThreadStore


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    if request.param == "memory":
        yield InMemoryThreadStore()
        return
    url = request.getfixturevalue("redis_url")
    async with RedisThreadStore.from_url(url, ttl_s=3600) as redis_store:
        await redis_store.setup()
        yield redis_store


def fresh() -> ThreadKey:
    return ThreadKey.of(f"contract-{uuid.uuid4().hex[:12]}")


def msg(mid: str, text: str = "hi") -> InboundMessage:
    return InboundMessage(text=text, message_id=mid)


def done(key: ThreadKey, mid: str, turn: int, reply: str = "ok") -> TurnResult:
    return TurnResult(
        thread_id=key.thread_id, message_id=mid, turn=turn, agent="bookings", reply=reply
    )


def ckpt(turn: int, version: int, active: str | None = "bookings") -> Checkpoint:
    return Checkpoint(
        active_agent=active,
        buffer=[BufferEntry(role="user", text=f"m{turn}", turn=turn)],
        turn=turn,
        version=version,
    )


async def test_open_new_thread(store: Store) -> None:
    key = fresh()
    first = await store.open(key)
    assert (first.checkpoint, first.pending) == (Checkpoint(), None) and first.epoch >= 1
    assert (await store.open(key)).epoch == first.epoch + 1
    assert await store.load(key) is None
    assert await store.turns(key) == []


async def test_accept_commit_and_history(store: Store) -> None:
    key = fresh()
    epoch = (await store.open(key)).epoch
    assert await store.accept(key, epoch, msg("a")) == 1
    await store.commit(key, epoch, ckpt(1, 1), done(key, "a", 1))
    assert await store.accept(key, epoch, msg("b")) == 2
    await store.commit(key, epoch, ckpt(2, 2), done(key, "b", 2, reply="second"))
    loaded = await store.load(key)
    assert loaded is not None and (loaded.turn, loaded.version) == (2, 2)
    history = await store.turns(key)
    assert [(t.turn, t.message_id, t.reply) for t in history] == [
        (1, "a", "ok"),
        (2, "b", "second"),
    ]
    assert [t.turn for t in await store.turns(key, after=1, limit=5)] == [2]
    assert [t.turn for t in await store.turns(key, after=0, limit=1)] == [1]


async def test_a_seen_message_id_returns_the_stored_result(store: Store) -> None:
    key = fresh()
    epoch = (await store.open(key)).epoch
    assert await store.accept(key, epoch, msg("a", text="a table for two")) == 1
    await store.commit(key, epoch, ckpt(1, 1), done(key, "a", 1, reply="first reply"))
    # The same message again (how its reply is read does not matter): the first answer.
    retried = InboundMessage(text="a table for two", message_id="a", channel="x", stream=True)
    again = await store.accept(key, epoch, retried)
    assert isinstance(again, TurnResult) and again.reply == "first reply" and again.turn == 1
    assert (await store.load(key)).turn == 1  # type: ignore[union-attr]


async def test_a_message_id_sent_with_another_message_is_refused(store: Store) -> None:
    """Not answered with the first message's reply, not run, nothing written."""
    key = fresh()
    epoch = (await store.open(key)).epoch
    assert await store.accept(key, epoch, msg("a", text="a table for two")) == 1
    other_user = InboundMessage(text="a table for two", message_id="a", user_id="u2")
    for reused in (msg("a", text="a table for three"), other_user):
        with pytest.raises(MessageIdReused, match="'a' was already used") as refused:
            await store.accept(key, epoch, reused)  # still pending: refused all the same
        assert refused.value.message_id == "a"
    await store.commit(key, epoch, ckpt(1, 1), done(key, "a", 1))
    with pytest.raises(MessageIdReused):
        await store.accept(key, epoch, msg("a", text="a table for three"))
    assert [t.message_id for t in await store.turns(key)] == ["a"]
    assert await store.accept(key, epoch, msg("b", text="a table for three")) == 2
    # A command's id is its message's too, either way round.
    supervisor = command(key, "c", 1, "supervisor")
    fingerprint = msg("c", "/supervisor").fingerprint
    await store.commit(key, epoch, ckpt(2, 2), done(key, "b", 2))
    assert await store.commit(key, epoch, ckpt(2, 3), supervisor, fingerprint) is None
    with pytest.raises(MessageIdReused):
        await store.accept(key, epoch, msg("c", "hello"))
    assert await store.commit(key, epoch, ckpt(2, 4), supervisor, fingerprint) == supervisor
    with pytest.raises(MessageIdReused):
        await store.commit(key, epoch, ckpt(2, 4), supervisor, msg("c", "/reset").fingerprint)
    with pytest.raises(MessageIdReused):
        await store.reset(key, epoch, Checkpoint(version=4), command(key, "b", 0, "reset"), "x")
    assert (await store.load(key)).version == 3  # type: ignore[union-attr]


async def test_pending_turn_survives_a_new_incarnation(store: Store) -> None:
    key = fresh()
    epoch = (await store.open(key)).epoch
    assert await store.accept(key, epoch, msg("a", "lost?")) == 1
    reopened = await store.open(key)
    assert reopened.pending is not None
    assert (reopened.pending.seq, reopened.pending.message.text) == (1, "lost?")
    assert reopened.pending.attempts == 2
    assert (await store.open(key)).pending.attempts == 3  # type: ignore[union-attr]
    # Reopened to read back a write whose answer was lost: the turn has not run since.
    same = await store.open(key, count_attempt=False)
    assert same.pending is not None and same.pending.attempts == 3
    assert same.epoch == reopened.epoch + 2


async def test_stale_epoch_is_fenced_everywhere(store: Store) -> None:
    key = fresh()
    old = (await store.open(key)).epoch
    new = (await store.open(key)).epoch
    with pytest.raises(ThreadFenced):
        await store.accept(key, old, msg("a"))
    assert await store.accept(key, new, msg("a")) == 1
    with pytest.raises(ThreadFenced):
        await store.commit(key, old, ckpt(1, 1), done(key, "a", 1))
    with pytest.raises(ThreadFenced):
        await store.reset(key, old, Checkpoint(version=1))
    await store.commit(key, new, ckpt(1, 1), done(key, "a", 1))
    assert (await store.load(key)).version == 1  # type: ignore[union-attr]


async def test_version_is_compare_and_set(store: Store) -> None:
    key = fresh()
    epoch = (await store.open(key)).epoch
    await store.commit(key, epoch, ckpt(0, 1), None)
    with pytest.raises(CheckpointConflict) as err:
        await store.commit(key, epoch, ckpt(0, 1), None)
    assert err.value.found_version == 1
    with pytest.raises(CheckpointConflict):
        await store.commit(key, epoch, ckpt(0, 3), None)


async def test_reset_deletes_history_and_message_ids(store: Store) -> None:
    key = fresh()
    epoch = (await store.open(key)).epoch
    await store.accept(key, epoch, msg("a"))
    await store.commit(key, epoch, ckpt(1, 1), done(key, "a", 1))
    await store.reset(key, epoch, Checkpoint(version=2))
    assert await store.turns(key) == []
    loaded = await store.load(key)
    assert loaded is not None and (loaded.turn, loaded.buffer, loaded.version) == (0, [], 2)
    assert await store.accept(key, epoch, msg("a", "new")) == 1  # the id is forgotten too


async def test_message_ids_expire() -> None:
    now = [1000.0]
    store = InMemoryThreadStore(message_id_ttl_s=60, clock=lambda: now[0])
    key = fresh()
    epoch = (await store.open(key)).epoch
    await store.accept(key, epoch, msg("a"))
    await store.commit(key, epoch, ckpt(1, 1), done(key, "a", 1))
    now[0] += 61
    assert await store.accept(key, epoch, msg("a", "a new message")) == 2


async def test_redis_message_ids_expire_and_keys_have_ttls(redis_url: str) -> None:
    key = fresh()
    async with RedisThreadStore.from_url(redis_url, ttl_s=120, message_id_ttl_s=1) as store:
        epoch = (await store.open(key)).epoch
        await store.accept(key, epoch, msg("a"))
        await store.commit(key, epoch, ckpt(1, 1), done(key, "a", 1))
        client = connect_redis(redis_url)
        try:
            for part in ("epoch", "checkpoint", "turns", "msgs"):
                assert 0 < await client.ttl(key.redis_key(part)) <= 120
            # Age the id's acceptance time instead of waiting for it.
            await client.zadd(key.redis_key("msgidx"), {"a": 0})
        finally:
            await client.aclose()
        assert await store.accept(key, epoch, msg("a", "a new message")) == 2


async def test_redis_ids_from_before_fingerprints_are_taken_as_the_same_message(
    redis_url: str,
) -> None:
    """A message id stored by a release without fingerprints (a rolling deploy) keeps its
    first answer for any message, as that release did."""
    key = fresh()
    async with RedisThreadStore.from_url(redis_url, ttl_s=120) as store:
        epoch = (await store.open(key)).epoch
        await store.accept(key, epoch, msg("a"))
        await store.commit(key, epoch, ckpt(1, 1), done(key, "a", 1, reply="first"))
        client = connect_redis(redis_url)
        try:
            assert await client.hkeys(key.redis_key("msgfp")) == [b"a"]
            await client.delete(key.redis_key("msgfp"))
        finally:
            await client.aclose()
        again = await store.accept(key, epoch, msg("a", "another"))
        assert isinstance(again, TurnResult) and again.reply == "first"


async def test_redis_fingerprints_a_release_before_them_outdated_do_not_count(
    redis_url: str,
) -> None:
    """That release resets (or expires) ids without their fingerprints, then accepts an id
    again at a new time: the fingerprint left from before is not that message's."""
    key = fresh()
    async with RedisThreadStore.from_url(redis_url, ttl_s=120) as store:
        epoch = (await store.open(key)).epoch
        await store.accept(key, epoch, msg("a", "A"))
        await store.commit(key, epoch, ckpt(1, 1), done(key, "a", 1, reply="to A"))
        with pytest.raises(MessageIdReused):
            await store.accept(key, epoch, msg("a", "B"))
        client = connect_redis(redis_url)
        try:
            # What that release's accept of "a" (now message B) leaves: a new time in msgidx.
            await client.zadd(key.redis_key("msgidx"), {"a": time.time() + 0.5})
        finally:
            await client.aclose()
        again = await store.accept(key, epoch, msg("a", "B"))
        assert isinstance(again, TurnResult) and again.reply == "to A"  # no false refusal


async def test_unreachable_redis_is_store_unavailable(tmp_path) -> None:
    async with RedisThreadStore.from_url(f"unix://{tmp_path}/no.sock") as store:
        with pytest.raises(StoreUnavailable):
            await store.ping()
        with pytest.raises(StoreUnavailable):
            await store.open(ThreadKey.of("x"))
        with pytest.raises(StoreUnavailable):
            await store.load(ThreadKey.of("x"))


async def test_a_burst_wider_than_the_pool_waits_for_connections(redis_url: str) -> None:
    # 200 commands that each hold a connection for 0.1 s: an unbounded burst must queue
    # on the pool, not fail (a failure would surface as a false "Redis unavailable" 503).
    client = connect_redis(redis_url)
    try:
        results = await asyncio.gather(
            *(client.blpop([f"burst-{i}"], timeout=0.1) for i in range(200))
        )
    finally:
        await client.aclose()
    assert results == [None] * 200


def command(key: ThreadKey, mid: str, turn: int, name: str) -> TurnResult:
    return TurnResult(
        thread_id=key.thread_id, message_id=mid, turn=turn, agent=None, reply=name, command=name
    )


async def test_a_command_is_remembered_by_id_but_is_not_a_turn(store: Store) -> None:
    key = fresh()
    epoch = (await store.open(key)).epoch
    await store.accept(key, epoch, msg("a"))
    await store.commit(key, epoch, ckpt(1, 1), done(key, "a", 1))
    first = command(key, "c", 1, "supervisor")
    assert await store.commit(key, epoch, ckpt(1, 2, active=None), first) is None
    assert [t.message_id for t in await store.turns(key)] == ["a"]
    # Answered before: nothing is written, not even a checkpoint of the right version.
    again = command(key, "c", 1, "a different answer")
    assert await store.commit(key, epoch, ckpt(1, 3, active="x"), again) == first
    loaded = await store.load(key)
    assert loaded is not None and (loaded.version, loaded.active_agent) == (2, None)
    # The id is taken: a turn sent with it gets the command's answer (the command's
    # fingerprint unknown, as from a store's caller before fingerprints).
    assert await store.accept(key, epoch, msg("c")) == first


async def test_a_reset_remembers_its_own_id(store: Store) -> None:
    key = fresh()
    epoch = (await store.open(key)).epoch
    await store.accept(key, epoch, msg("a"))
    await store.commit(key, epoch, ckpt(1, 1), done(key, "a", 1))
    reset = command(key, "r", 0, "reset")
    assert await store.reset(key, epoch, Checkpoint(version=2), reset) is None
    assert await store.accept(key, epoch, msg("a")) == 1  # the ids before it are forgotten
    await store.commit(key, epoch, ckpt(1, 3), done(key, "a", 1))
    assert await store.reset(key, epoch, Checkpoint(version=4), reset) == reset
    assert [t.message_id for t in await store.turns(key)] == ["a"]
    assert (await store.load(key)).version == 3  # type: ignore[union-attr]
    # An id that belongs to a turn still pending is not a command's to reuse.
    await store.accept(key, epoch, msg("p"))
    with pytest.raises(TurnPending, match="still pending"):
        await store.reset(key, epoch, Checkpoint(version=4), command(key, "p", 0, "reset"))


async def test_a_reset_keeps_the_answers_it_is_asked_to_keep(store: Store) -> None:
    """The commands' (by fingerprint): a late retry of one must not run it again."""
    key = fresh()
    epoch = (await store.open(key)).epoch
    await store.accept(key, epoch, InboundMessage(text="/supervisor", message_id="a"))
    await store.commit(key, epoch, ckpt(1, 1), done(key, "a", 1))  # a turn of the same text
    left = command(key, "s", 1, "left")
    assert await store.commit(key, epoch, ckpt(1, 2, None), left, "a1") is None
    keep = ("b2", "a1")
    first = command(key, "r1", 0, "reset")
    assert await store.reset(key, epoch, Checkpoint(version=3), first, "b2", keep) is None
    await store.accept(key, epoch, msg("p"))  # pending: an id no reset keeps
    second = command(key, "r2", 0, "reset again")
    assert await store.reset(key, epoch, Checkpoint(version=4), second, "b2", keep) is None
    assert await store.reset(key, epoch, Checkpoint(version=5), first, "b2", keep) == first
    assert await store.commit(key, epoch, ckpt(0, 5, "x"), left, "a1") == left
    with pytest.raises(MessageIdReused):  # kept with its fingerprint
        await store.reset(key, epoch, Checkpoint(version=5), command(key, "r1", 0, "x"), "c3")
    assert (await store.load(key)).version == 4  # type: ignore[union-attr]
    assert await store.accept(key, epoch, msg("a")) == 1  # the turn's id is forgotten
    await store.commit(key, epoch, ckpt(1, 5), done(key, "a", 1))
    assert await store.accept(key, epoch, msg("p")) == 2  # and the pending one's
    # What is kept still expires with the other ids (in Redis: its TTLs are set again).
    assert await store.reset(key, epoch, Checkpoint(version=6), second, "b2", keep) == second


async def test_redis_refusing_writes_is_store_unavailable(redis_url: str) -> None:
    admin = connect_redis(redis_url)
    async with RedisThreadStore.from_url(redis_url, ttl_s=3600) as store:
        key = fresh()
        epoch = (await store.open(key)).epoch
        await admin.config_set("maxmemory", "1")  # as a full Redis answers: -OOM
        try:
            with pytest.raises(StoreUnavailable, match="OOM"):
                await store.accept(key, epoch, msg("a"))
        finally:
            await admin.config_set("maxmemory", "0")
            await admin.aclose()
        assert await store.accept(key, epoch, msg("a")) == 1


async def test_redis_refusing_reads_is_store_unavailable() -> None:
    """A failover (MASTERDOWN) or a restart still loading its data refuses reads too."""

    class Refusing:
        def register_script(self, script: str) -> None:
            return None

        async def hget(self, *args: object) -> None:
            raise MasterDownError("MASTERDOWN Link with MASTER is down")

        async def hmget(self, *args: object) -> None:
            raise ResponseError("LOADING Redis is loading the dataset in memory")

    store = RedisThreadStore(Refusing())  # type: ignore[arg-type]
    with pytest.raises(StoreUnavailable, match="MASTERDOWN"):
        await store.load(fresh())
    with pytest.raises(StoreUnavailable, match="LOADING"):
        await store.turns(fresh())
