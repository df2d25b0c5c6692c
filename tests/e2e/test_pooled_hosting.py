"""Pooled hosting: threads as objects in a few host actors, with the same guarantees."""

from __future__ import annotations

import asyncio
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import ray
from ray import serve

from actors.directory import NAMESPACE, passivate_thread, pool_scope
from actors.key import ThreadKey
from actors.thread_host import ThreadHost
from stickyray.config import TeamConfig
from stickyray.testing import FakeLLMServer, FakeReply
from stickyray.turns import InboundMessage
from tests.e2e.conftest import (
    App,
    live_thread_actors,
    new_thread,
    sigkill_actor,
    start_usurper,
    thread_hosts,
    wait_for,
)
from tests.e2e.teams import openai_team
from tests.e2e.test_durability import epoch_in_redis, opens, route_to_bookings, send


def pooled_team(**threads: object) -> dict:
    team = openai_team()
    team["threads"].update(hosting="pooled", pool_size=2, **threads)
    return team


@pytest.fixture(scope="module")
def app(deploy) -> App:
    return deploy(pooled_team())


def host_of(app: App, thread: str) -> str:
    """The host that carries ``thread`` now (asking each host, not recomputing the hash)."""
    key = ThreadKey.of(thread)
    for name in thread_hosts(app.name):
        host = ray.get_actor(name, namespace=NAMESPACE)
        if key in ray.get(host.open_threads.remote()):
            return name
    raise AssertionError(f"no host carries {thread}")


async def test_many_threads_share_the_pool_and_stay_sticky(
    app: App, fake_llm: FakeLLMServer
) -> None:
    route_to_bookings(fake_llm)
    threads = [new_thread() for _ in range(12)]

    async def conversation(client, thread: str) -> list[dict]:
        replies = []
        for text in ("book a table", "for two", "at nine"):
            r = await client.post(f"/v1/threads/{thread}/messages", json={"text": text})
            assert r.status_code == 200, r.text
            replies.append(r.json())
        return replies

    async with app.async_client(timeout=120) as client:
        results = await asyncio.gather(*(conversation(client, t) for t in threads))
    assert all([r["turn"] for r in replies] == [1, 2, 3] for replies in results)
    assert all(r["agent"] == "bookings" for replies in results for r in replies)
    assert fake_llm.count(agent="triage") == 12, "one supervisor call per thread, none after"
    hosts = thread_hosts(app.name)
    assert 1 <= len(hosts) <= 2
    assert not any(live_thread_actors(t) for t in threads), "no actor per thread"
    assert {host_of(app, t) for t in threads} <= set(hosts)


def test_killed_host_loses_nothing(app: App, fake_llm: FakeLLMServer) -> None:
    route_to_bookings(fake_llm)
    thread = new_thread()
    with app.client() as client:
        send(client, thread, "book a table")
        send(client, thread, "for two")
        before = client.get(f"/v1/threads/{thread}").json()
        ray.kill(ray.get_actor(host_of(app, thread), namespace=NAMESPACE), no_restart=True)
        after_kill = send(client, thread, "at nine")
        assert (after_kill["turn"], after_kill["agent"], after_kill["handoffs"]) == (
            3,
            "bookings",
            [],
        )
        name = host_of(app, thread)
        assert sigkill_actor(name)
        after_sigkill = send(client, thread, "thanks")
        state = client.get(f"/v1/threads/{thread}").json()
    assert (after_sigkill["turn"], after_sigkill["agent"]) == (4, "bookings")
    assert state["buffer"][: len(before["buffer"])] == before["buffer"]
    assert fake_llm.count(agent="triage") == 1


async def test_concurrent_first_messages_open_the_thread_once(
    app: App, fake_llm: FakeLLMServer, redis_url: str
) -> None:
    route_to_bookings(fake_llm)
    thread = new_thread()
    async with app.async_client(timeout=120) as client:
        responses = await asyncio.gather(
            *(
                client.post(f"/v1/threads/{thread}/messages", json={"text": f"m{i}"})
                for i in range(30)
            )
        )
    assert sorted(r.json()["turn"] for r in responses) == list(range(1, 31))
    assert opens(epoch_in_redis(redis_url, thread)) == 1


def test_stale_thread_in_a_host_is_fenced_and_reopened(
    app: App, fake_llm: FakeLLMServer, redis_url: str
) -> None:
    route_to_bookings(fake_llm)
    thread = new_thread()
    with app.client() as client:
        send(client, thread, "book")
        usurper = start_usurper(thread, app.team, redis_url)
        assert opens(ray.get(usurper.epoch.remote())) == 2
        host = host_of(app, thread)
        # The host's thread (the first open) is refused, dropped, and reopened in the same host.
        reply = send(client, thread, "for two")
        history = client.get(f"/v1/threads/{thread}/turns").json()["turns"]
    assert (reply["turn"], reply["agent"]) == (2, "bookings")
    assert host_of(app, thread) == host
    assert opens(epoch_in_redis(redis_url, thread)) == 3
    assert [t["turn"] for t in history] == [1, 2]
    with pytest.raises(Exception, match="superseded"):
        ray.get(usurper.handle.remote(InboundMessage(text="late", message_id="late")))
    ray.kill(usurper)


def test_passivated_thread_reopens_where_it_was(app: App, fake_llm: FakeLLMServer) -> None:
    route_to_bookings(fake_llm)
    thread = new_thread()
    key = ThreadKey.of(thread)
    with app.client() as client:
        send(client, thread, "book")
        host = ray.get_actor(host_of(app, thread), namespace=NAMESPACE)
        team = TeamConfig.model_validate(app.team.model_dump())
        asyncio.run(passivate_thread(key, team, pool_scope(app.name, team)))
        assert key not in ray.get(host.open_threads.remote())
        back = send(client, thread, "still there?")
    assert (back["turn"], back["agent"], back["handoffs"]) == (2, "bookings", [])
    assert fake_llm.count(agent="triage") == 1


def test_a_thread_moves_to_the_next_config_version_after_its_turn_in_progress(
    app: App, fake_llm: FakeLLMServer, redis_url: str
) -> None:
    """A deploy that changes agents.yaml names new hosts. A thread's next message reaching
    one while its old host still runs a turn waits for that turn, which runs once."""
    fake_llm.on(
        agent="bookings", user_contains="slow one", reply=FakeReply.text("done"), latency_s=3
    )
    route_to_bookings(fake_llm)
    thread = new_thread()
    key = ThreadKey.of(thread)
    team = TeamConfig.model_validate(app.team.model_dump())
    name = f"threadhost/{app.name}/next-version/0"
    handles = {a.name: serve.get_deployment_handle(a.name, app.name) for a in team.agents}
    host: Any = (  # Any: ray's stubs do not see ThreadHost's methods as remote methods
        ray.remote(ThreadHost)
        .options(name=name, namespace=NAMESPACE, num_cpus=0)
        .remote(team, redis_url, handles, app.name, name)
    )

    def slow_ones() -> int:
        asked = fake_llm.requests_for(agent="bookings")
        return sum(r.last_user_text == "slow one" for r in asked)

    try:
        with app.client() as client, ThreadPoolExecutor(1) as pool:
            send(client, thread, "book")
            old = host_of(app, thread)
            slow = pool.submit(send, client, thread, "slow one")
            wait_for(lambda: slow_ones() == 1, timeout=30, what="the slow turn to start")
            message = InboundMessage(text="for two", message_id=uuid.uuid4().hex)
            moved = ray.get(host.handle.remote(key, message), timeout=60)
            slowly = slow.result(timeout=60)
        assert (slowly["turn"], slowly["status"], slowly["reply"]) == (2, "completed", "done")
        assert (moved.turn, moved.status, moved.agent) == (3, "completed", "bookings")
        assert slow_ones() == 1, "the turn in progress ran once"
        old_host = ray.get_actor(old, namespace=NAMESPACE)
        assert key not in ray.get(old_host.open_threads.remote())
        assert ray.get(host.open_threads.remote()) == [key]
    finally:
        ray.kill(host, no_restart=True)


@pytest.fixture(scope="module")
def idle_app(deploy) -> App:
    return deploy(pooled_team(idle_timeout_s=1))


def test_idle_threads_close_and_an_empty_host_exits(idle_app: App, fake_llm: FakeLLMServer) -> None:
    route_to_bookings(fake_llm)
    thread = new_thread()
    with idle_app.client() as client:
        send(client, thread, "book")
        assert thread_hosts(idle_app.name)
        wait_for(lambda: not thread_hosts(idle_app.name), timeout=30, what="idle hosts to exit")
        back = send(client, thread, "still there?")
    assert (back["turn"], back["agent"], back["handoffs"]) == (2, "bookings", [])
    assert fake_llm.count(agent="triage") == 1
