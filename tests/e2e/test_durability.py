"""Thread actors that lose nothing: retries, races, fencing, crashes, passivation."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import pytest
import ray
import redis
from ray.util.state import list_actors

from actors.directory import NAMESPACE
from actors.key import ThreadKey
from actors.liveness import live_set_key
from stickyray.testing import FakeLLMServer, FakeReply
from stickyray.turns import InboundMessage
from tests.e2e.conftest import (
    App,
    live_thread_actors,
    new_thread,
    sigkill_actor,
    start_usurper,
    wait_for,
)
from tests.e2e.teams import openai_team


@pytest.fixture(scope="module")
def app(deploy) -> App:
    return deploy(openai_team())


def route_to_bookings(fake: FakeLLMServer) -> None:
    fake.on(agent="triage", reply=FakeReply.tool_call("transfer_to_bookings", {"reason": "b"}))
    fake.on(agent="bookings", reply=lambda r: FakeReply.text(f"booked: {r.last_user_text}"))


def send(client, thread: str, text: str, message_id: str | None = None) -> dict:
    body = {"text": text} | ({"message_id": message_id} if message_id else {})
    response = client.post(f"/v1/threads/{thread}/messages", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def epoch_in_redis(redis_url: str, thread: str) -> int:
    client = redis.Redis.from_url(redis_url)
    try:
        return int(client.get(ThreadKey.of(thread).redis_key("epoch")) or 0)
    finally:
        client.close()


def opens(epoch: int) -> int:
    """How many times the thread was opened: an epoch counts its opens on from the time its
    state began, in seconds times a million."""
    return epoch % 1_000_000


async def test_same_message_id_five_times_is_one_turn(app: App, fake_llm: FakeLLMServer) -> None:
    route_to_bookings(fake_llm)
    thread = new_thread()
    async with app.async_client() as client:
        await client.post(f"/v1/threads/{thread}/messages", json={"text": "book"})
        before = fake_llm.count(agent="bookings")

        async def post(mid: str):
            body = {"text": "for 2 people", "message_id": mid}
            return await client.post(f"/v1/threads/{thread}/messages", json=body)

        sequential = [await post("retry-seq") for _ in range(5)]
        concurrent = await asyncio.gather(*(post("retry-par") for _ in range(5)))
        # The id with another message: refused, not answered with the first one's reply.
        reused = await client.post(
            f"/v1/threads/{thread}/messages", json={"text": "for 3", "message_id": "retry-seq"}
        )
        history = (await client.get(f"/v1/threads/{thread}/turns")).json()["turns"]
    assert reused.status_code == 422
    assert reused.json()["error"].startswith("body.message_id: message_id 'retry-seq' was")
    for batch in (sequential, concurrent):
        assert all(r.status_code == 200 for r in batch)
        assert len({r.text for r in batch}) == 1, "five identical replies"
    assert sequential[0].json()["turn"] == 2 and concurrent[0].json()["turn"] == 3
    assert fake_llm.count(agent="bookings") - before == 2, "one model call per message id"
    assert [t["message_id"] for t in history[1:]] == ["retry-seq", "retry-par"]


async def test_fifty_concurrent_first_messages_make_one_actor_and_one_epoch(
    app: App, fake_llm: FakeLLMServer, redis_url: str
) -> None:
    route_to_bookings(fake_llm)
    thread = new_thread()
    async with app.async_client(timeout=120) as client:
        responses = await asyncio.gather(
            *(
                client.post(f"/v1/threads/{thread}/messages", json={"text": f"m{i}"})
                for i in range(50)
            )
        )
    assert sorted(r.json()["turn"] for r in responses) == list(range(1, 51))
    name = ThreadKey.of(thread).actor_name
    assert live_thread_actors(thread) == [name]
    assert len(list_actors(filters=[("name", "=", name)], detail=True)) == 1
    assert opens(epoch_in_redis(redis_url, thread)) == 1


def test_killed_actor_recovers_with_everything(app: App, fake_llm: FakeLLMServer) -> None:
    route_to_bookings(fake_llm)
    thread = new_thread()
    name = ThreadKey.of(thread).actor_name
    with app.client() as client:
        send(client, thread, "book a table")
        send(client, thread, "for two")
        before = client.get(f"/v1/threads/{thread}").json()
        ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
        after_kill = send(client, thread, "at nine")
        assert (after_kill["turn"], after_kill["agent"], after_kill["handoffs"]) == (
            3,
            "bookings",
            [],
        )
        # Now the hard way: SIGKILL the worker process itself.
        assert sigkill_actor(name)
        after_sigkill = send(client, thread, "thanks")
        state = client.get(f"/v1/threads/{thread}").json()
    assert (after_sigkill["turn"], after_sigkill["agent"]) == (4, "bookings")
    assert state["buffer"][: len(before["buffer"])] == before["buffer"]
    assert fake_llm.count(agent="triage") == 1


def test_a_passivated_actor_nobody_kills_stops_itself(app: App, fake_llm: FakeLLMServer) -> None:
    """Asked to passivate by a caller that never kills it (one that failed in between), a
    closed actor must not keep the thread's name: every message would bounce off it."""
    route_to_bookings(fake_llm)
    thread = new_thread()
    name = ThreadKey.of(thread).actor_name
    with app.client() as client:
        send(client, thread, "book a table")
        actor = ray.get_actor(name, namespace=NAMESPACE)
        assert ray.get(actor.passivate.remote(), timeout=30) is True
        wait_for(lambda: not live_thread_actors(thread), timeout=60, what="the closed actor")
        back = send(client, thread, "for two")
    assert (back["turn"], back["agent"]) == (2, "bookings")


def test_stale_incarnation_is_fenced(app: App, fake_llm: FakeLLMServer, redis_url: str) -> None:
    route_to_bookings(fake_llm)
    thread = new_thread()
    with app.client() as client:
        send(client, thread, "book")
        usurper = start_usurper(thread, app.team, redis_url)
        assert opens(ray.get(usurper.epoch.remote())) == 2
        # The named actor (the first open) is now stale: its write is refused, it stops serving,
        # and the directory delivers the message to a fresh incarnation instead.
        reply = send(client, thread, "for two")
        assert (reply["turn"], reply["agent"]) == (2, "bookings")
        history = client.get(f"/v1/threads/{thread}/turns").json()["turns"]
        state = client.get(f"/v1/threads/{thread}").json()
    assert opens(epoch_in_redis(redis_url, thread)) == 3
    with pytest.raises(Exception, match="superseded"):
        ray.get(usurper.handle.remote(InboundMessage(text="late", message_id="late")))
    assert [t["turn"] for t in history] == [1, 2]
    assert state["version"] == 2 and state["turns"] == 2
    ray.kill(usurper)


@pytest.fixture(scope="module")
def small_app(deploy) -> App:
    team = openai_team()
    team["threads"].update(max_live_threads=5, idle_timeout_s=600)
    return deploy(team)


class LiveCounter:
    """Polls Ray's actor list in the background and keeps the highest live count seen."""

    def __init__(self, thread_ids: set[str]) -> None:
        self.names = {ThreadKey.of(t).actor_name for t in thread_ids}
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            alive = list_actors(filters=[("state", "=", "ALIVE")], limit=10_000)
            live = sum(1 for a in alive if a.name in self.names)
            self.peak = max(self.peak, live)
            self.samples += 1
            self._stop.wait(0.05)

    def __enter__(self) -> LiveCounter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def test_live_actors_stay_under_the_cap(small_app: App, fake_llm: FakeLLMServer) -> None:
    route_to_bookings(fake_llm)
    threads = [new_thread() for _ in range(30)]

    async def conversation(client, thread: str) -> None:
        for i in range(3):
            r = await client.post(f"/v1/threads/{thread}/messages", json={"text": f"book {i}"})
            assert r.status_code == 200, r.text
            assert r.json()["turn"] == i + 1

    with LiveCounter(set(threads)) as counter:
        async with small_app.async_client(timeout=300) as client:
            for start in range(0, 30, 3):  # three conversations at a time
                await asyncio.gather(*(conversation(client, t) for t in threads[start : start + 3]))
            states = [(await client.get(f"/v1/threads/{t}")).json() for t in threads]
    print(f"live thread actors: peak {counter.peak} over {counter.samples} samples (cap 5)")
    assert counter.samples > 10
    assert 0 < counter.peak <= 5
    assert all(s["turns"] == 3 and s["active_agent"] == "bookings" for s in states)
    assert all(len(s["buffer"]) == 6 for s in states)


def test_a_dead_incarnations_leftover_never_passivates_the_live_one(
    small_app: App, fake_llm: FakeLLMServer, redis_url: str
) -> None:
    """A crashed actor's live-set member outlives it; the thread may by then live elsewhere."""
    route_to_bookings(fake_llm)
    thread = new_thread()
    name = ThreadKey.of(thread).actor_name
    admin = redis.Redis.from_url(redis_url, decode_responses=True)
    with small_app.client() as client:
        send(client, thread, "book")
        (actor,) = list_actors(filters=[("name", "=", name), ("state", "=", "ALIVE")])
        assert actor.node_id
        live_set = live_set_key(actor.node_id)

        def members() -> set[str]:
            return {str(m) for m in admin.zrange(live_set, 0, -1) if str(m).startswith(name)}

        crashed = members()
        assert crashed and sigkill_actor(name)
        send(client, thread, "for two")  # a new incarnation, registered on its node
        epoch = epoch_in_redis(redis_url, thread)
        # As if that node were another one: this node's set keeps only the dead actor's
        # member, the oldest of all, with enough others that the next thread pushes it out.
        if registered_since := members() - crashed:
            admin.zrem(live_set, *registered_since)
        admin.zadd(live_set, dict.fromkeys(crashed, 0))
        padding = {f"thread/default/pad-{uuid.uuid4().hex[:8]}#0": time.time() for _ in range(5)}
        admin.zadd(live_set, padding)
        send(client, new_thread(), "book")
        assert not members(), "the leftover was not chosen to go"
        later = send(client, thread, "at nine")
    admin.zrem(live_set, *padding)
    admin.close()
    assert later["turn"] == 3
    assert epoch_in_redis(redis_url, thread) == epoch, "the live incarnation was passivated"


def test_a_crashed_incarnations_leftover_never_holds_up_its_own_thread(
    small_app: App, fake_llm: FakeLLMServer, redis_url: str
) -> None:
    """The next actor of the thread, making room, finds its own name among the victims."""
    route_to_bookings(fake_llm)
    thread = new_thread()
    name = ThreadKey.of(thread).actor_name
    admin = redis.Redis.from_url(redis_url, decode_responses=True)
    with small_app.client(timeout=45) as client:
        send(client, thread, "book")
        (actor,) = list_actors(filters=[("name", "=", name), ("state", "=", "ALIVE")])
        assert actor.node_id
        live_set = live_set_key(actor.node_id)
        crashed = {str(m) for m in admin.zrange(live_set, 0, -1) if str(m).startswith(name)}
        assert crashed and sigkill_actor(name)
        # The leftover is the oldest member of a full set: the next actor must make room.
        admin.zadd(live_set, dict.fromkeys(crashed, 0))
        padding = {f"thread/default/pad-{uuid.uuid4().hex[:8]}#0": time.time() for _ in range(5)}
        admin.zadd(live_set, padding)
        after = send(client, thread, "for two")  # hung for ever, waiting on itself
    admin.zrem(live_set, *padding)
    admin.close()
    assert (after["turn"], after["agent"]) == (2, "bookings")


@pytest.fixture(scope="module")
def idle_app(deploy) -> App:
    team = openai_team()
    team["threads"].update(idle_timeout_s=1)
    return deploy(team)


def test_idle_actor_exits_and_comes_back(idle_app: App, fake_llm: FakeLLMServer) -> None:
    route_to_bookings(fake_llm)
    thread = new_thread()
    with idle_app.client() as client:
        send(client, thread, "book")
        assert live_thread_actors(thread)
        wait_for(lambda: not live_thread_actors(thread), timeout=30, what="idle passivation")
        back = send(client, thread, "still there?")
    assert (back["turn"], back["agent"], back["handoffs"]) == (2, "bookings", [])
    assert fake_llm.count(agent="triage") == 1


def test_history_lists_every_turn_and_reset_deletes_it(app: App, fake_llm: FakeLLMServer) -> None:
    route_to_bookings(fake_llm)
    thread = new_thread()
    with app.client() as client:
        assert client.get(f"/v1/threads/{thread}/turns").status_code == 404
        for i in range(1, 5):
            send(client, thread, f"message {i}", message_id=f"m{i}")
        turns = client.get(f"/v1/threads/{thread}/turns").json()["turns"]
        page = client.get(f"/v1/threads/{thread}/turns", params={"after": 2, "limit": 1}).json()
        bad = client.get(f"/v1/threads/{thread}/turns", params={"limit": 0})
        reset = client.post(f"/v1/threads/{thread}/reset")
        after_reset = client.get(f"/v1/threads/{thread}/turns").json()["turns"]
        again = send(client, thread, "message 1", message_id="m1")
    assert [(t["turn"], t["message_id"], t["agent"], t["status"]) for t in turns] == [
        (i, f"m{i}", "bookings", "completed") for i in range(1, 5)
    ]
    assert turns[0]["reply"] == "booked: message 1"
    assert turns[0]["handoffs"] == [{"from": "triage", "to": "bookings", "reason": "b"}]
    assert [t["turn"] for t in page["turns"]] == [3]
    assert bad.status_code == 422 and "limit" in bad.text
    assert reset.status_code == 200 and after_reset == []
    # Reset deleted the stored state, message ids included: m1 is a new first turn.
    assert (again["turn"], again["agent"], again["handoffs"] != []) == (1, "bookings", True)
