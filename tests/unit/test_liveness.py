"""A node's live set on a real redis-server: the cap, incarnations, and expiry."""

from __future__ import annotations

import uuid
from typing import Any, cast

import pytest
from redis.exceptions import ReadOnlyError

from actors import directory
from actors.liveness import Incarnation, LiveThreads, live_set_key
from actors.redis_store import connect_redis
from stickyray.errors import StoreUnavailable


def node() -> str:
    return f"node-{uuid.uuid4().hex[:8]}"


def me(name: str, actor_id: str = "a1") -> Incarnation:
    return Incarnation(f"thread/default/{name}", actor_id)


async def test_over_the_cap_the_least_recently_used_go_and_never_the_newcomer(
    redis_url: str,
) -> None:
    client = connect_redis(redis_url)
    live = LiveThreads(client, node(), cap=2, idle_timeout_s=60)
    assert await live.activate(me("a")) == []
    assert await live.activate(me("b")) == []
    assert await live.activate(me("c")) == [me("a")]
    live.TOUCH_EVERY_S = 0.0
    await live.touch(me("b"))  # b is now the most recent, so c goes before it
    assert await live.activate(me("d")) == [me("c")]
    await client.aclose()


async def test_a_member_names_the_incarnation_not_only_the_thread(redis_url: str) -> None:
    client = connect_redis(redis_url)
    node_id = node()
    live = LiveThreads(client, node_id, cap=1, idle_timeout_s=60)
    crashed = me("a", actor_id="dead0001")
    await live.activate(crashed)  # it dies without leaving
    again = me("a", actor_id="live0002")
    # The thread's next incarnation is another member: the leftover is what goes, and the
    # victim says which actor it was, so the caller can leave a later one alone.
    assert await live.activate(again) == [crashed]
    members = cast(list[bytes], await client.zrange(live_set_key(node_id), 0, -1))
    assert [Incarnation.parse(m) for m in members] == [again]
    await live.remove(again)
    assert await client.exists(live_set_key(node_id)) == 0
    await client.aclose()


async def test_the_set_expires_unless_written(redis_url: str) -> None:
    client = connect_redis(redis_url)
    node_id = node()
    live = LiveThreads(client, node_id, cap=5, idle_timeout_s=10)
    await live.activate(me("a"))
    ttl = await client.pttl(live_set_key(node_id))
    assert 0 < ttl <= (2 * 10 + 600) * 1000
    await client.persist(live_set_key(node_id))
    live.TOUCH_EVERY_S = 0.0
    await live.touch(me("a"))
    assert await client.pttl(live_set_key(node_id)) > 0
    await client.aclose()


def test_incarnation_round_trips() -> None:
    one = Incarnation("thread/t-1/x:y@z", "ffee00")
    assert Incarnation.parse(one.member) == one
    assert Incarnation.parse(one.member.encode()) == one
    # A member from a release that stored names only: whichever actor holds the name.
    old = Incarnation.parse(b"thread/default/alice")
    assert old == Incarnation("thread/default/alice", None)
    assert old.member == "thread/default/alice"


class _Handle:
    """An actor handle whose ``passivate`` has the given Python signature."""

    def __init__(self, passivate: Any) -> None:
        self.passivate = type("Method", (), {"remote": staticmethod(passivate)})


async def test_victims_of_either_release_are_passivated_once(monkeypatch) -> None:
    async def previous_release() -> None:  # passivate(self) -> None, no incarnation
        return None

    async def this_release(actor_id: str | None = None) -> bool:
        return actor_id in (None, "a1")

    killed: list[object] = []
    monkeypatch.setattr(directory.ray, "kill", lambda handle, no_restart: killed.append(handle))
    for passivate, actor_id, goes in [
        (previous_release, None, True),  # an entry it wrote: a name only
        (this_release, "a1", True),
        (this_release, "a2", False),  # the name is a later incarnation's now
    ]:
        handle = _Handle(passivate)
        lookups = iter([handle, None])  # then Ray releases the name
        monkeypatch.setattr(directory, "_lookup", lambda name, it=lookups: next(it))
        await directory.passivate_actor("thread/default/alice", actor_id)
        assert (handle in killed) is goes


class _ActorId:
    def __init__(self, hex_id: str) -> None:
        self._hex = hex_id

    def hex(self) -> str:
        return self._hex


class _Actor(_Handle):
    """A handle that knows which actor it names, as Ray's do; records passivate calls."""

    def __init__(self, actor_id: str) -> None:
        self.calls: list[str | None] = []

        async def passivate(asked: str | None = None) -> bool:
            self.calls.append(asked)
            return asked in (None, actor_id)

        super().__init__(passivate)
        self._actor_id = _ActorId(actor_id)


async def test_a_name_held_by_another_incarnation_is_not_asked_to_passivate(
    monkeypatch,
) -> None:
    """It may be in its constructor (the caller itself): the call would wait for it."""
    later = _Actor("a2")
    monkeypatch.setattr(directory, "_lookup", lambda name: later)
    monkeypatch.setattr(directory.ray, "kill", lambda handle, no_restart: None)
    await directory.passivate_actor("thread/default/alice", "a1")
    assert later.calls == []


async def test_a_name_taken_again_at_once_ends_the_wait(monkeypatch, caplog) -> None:
    """The victim's own messages, re-sent, bring its thread back under the same name."""
    victim, back = _Actor("a1"), _Actor("a3")
    lookups = iter([victim, victim, back])
    monkeypatch.setattr(directory, "_lookup", lambda name: next(lookups, back))
    monkeypatch.setattr(directory.ray, "kill", lambda handle, no_restart: None)
    await directory.passivate_actor("thread/default/alice", "a1", timeout_s=30)
    assert victim.calls == ["a1"] and back.calls == []
    assert "still registered" not in caplog.text


async def test_redis_refusing_writes_is_store_unavailable(redis_url: str) -> None:
    """A full Redis (-OOM), a replica after a failover (-READONLY) or one still loading came
    out of a new thread actor's constructor as a raw ResponseError, not an outage."""
    client, admin = connect_redis(redis_url), connect_redis(redis_url)
    live = LiveThreads(client, node(), cap=5, idle_timeout_s=60)
    live.TOUCH_EVERY_S = 0.0
    await live.activate(me("a"))
    await admin.config_set("maxmemory", "1")  # as a full Redis answers: -OOM
    try:
        with pytest.raises(StoreUnavailable, match="OOM"):
            await live.activate(me("b"))
        with pytest.raises(StoreUnavailable, match="maxmemory"):  # OOM, as a pipeline says it
            await live.touch(me("a"))
    finally:
        await admin.config_set("maxmemory", "0")
        await admin.aclose()
        await client.aclose()

    class Replica:
        def register_script(self, script: str) -> None:
            return None

        async def zrem(self, *args: object) -> None:
            raise ReadOnlyError("READONLY You can't write against a read only replica.")

    replica = LiveThreads(Replica(), node(), cap=5, idle_timeout_s=60)  # type: ignore[arg-type]
    with pytest.raises(StoreUnavailable, match="READONLY"):
        await replica.remove(me("a"))
