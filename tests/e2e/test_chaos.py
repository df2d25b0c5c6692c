"""Chaos: actors killed under load, Redis stopped under load. Nothing accepted is lost.

Bounded: 500 turns and a few kills; 60 turns around one Redis outage; 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Callable

import httpx
import pytest
import ray

from actors.directory import NAMESPACE
from stickyray.embedded_redis import EmbeddedRedis
from stickyray.testing import FakeLLMServer, FakeReply
from tests.e2e.conftest import App, live_thread_actors, new_thread, sigkill_actor
from tests.e2e.teams import openai_team

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def app(deploy) -> App:
    return deploy(openai_team())


def script(fake: FakeLLMServer) -> None:
    fake.on(agent="triage", reply=FakeReply.tool_call("transfer_to_bookings", {"reason": "b"}))
    fake.on(agent="bookings", reply=lambda r: FakeReply.text(f"reply to {r.last_user_text}"))


class Client:
    """A chat client that retries a message, with its id, until it gets an answer."""

    def __init__(self, http: httpx.AsyncClient, deadline: float) -> None:
        self.http = http
        self.deadline = deadline
        self.codes: Counter[int] = Counter()
        self.errors: list[str] = []
        self.acked: dict[str, str] = {}
        self.changed = asyncio.Event()

    async def until(self, condition: Callable[[], bool], within_s: float) -> None:
        """Wait (by responses, not by the clock) until ``condition`` holds or time runs out."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within_s):
                while not condition():
                    self.changed.clear()
                    await self.changed.wait()

    async def say(self, thread: str, text: str, message_id: str) -> None:
        while time.monotonic() < self.deadline:
            try:
                response = await self.http.post(
                    f"/v1/threads/{thread}/messages", json={"text": text, "message_id": message_id}
                )
            except httpx.HTTPError as exc:
                self.codes[0] += 1
                self.errors.append(type(exc).__name__)
            else:
                self.codes[response.status_code] += 1
                self.changed.set()
                if response.status_code == 200:
                    self.acked[message_id] = response.json()["reply"]
                    return
                self.errors.append(response.text)
            await asyncio.sleep(0.1)  # a client's retry pause, not a wait for a condition
        raise AssertionError(f"{message_id} never got an answer")


async def check_history(http: httpx.AsyncClient, thread: str, expected_ids: list[str]) -> list:
    turns = (await http.get(f"/v1/threads/{thread}/turns", params={"limit": 1000})).json()["turns"]
    assert [t["turn"] for t in turns] == list(range(1, len(expected_ids) + 1))
    assert [t["message_id"] for t in turns] == expected_ids, "each id once, in acceptance order"
    for t in turns:
        assert t["status"] in ("completed", "failed")
        assert t["status"] == "completed" or t["error"], "a failed turn says why"
    state = (await http.get(f"/v1/threads/{thread}")).json()
    assert state["turns"] == len(expected_ids)
    return turns


async def _kill_one(threads: set[str], hard: bool) -> str | None:
    def pick() -> str | None:
        live = [n for n in live_thread_actors() if n.rsplit("/", 1)[-1] in threads]
        if not live:
            return None
        victim = random.choice(live)
        if hard:
            if not sigkill_actor(victim):
                return None
        else:
            try:
                ray.kill(ray.get_actor(victim, namespace=NAMESPACE), no_restart=True)
            except ValueError:
                return None
        return victim

    return await asyncio.to_thread(pick)


async def test_kill_actors_under_load(app: App, fake_llm: FakeLLMServer) -> None:
    script(fake_llm)
    fake_llm.latency_s = 0.05
    random.seed(7)
    threads = [new_thread() for _ in range(20)]
    ids = {t: [f"{t}-{i}" for i in range(1, 26)] for t in threads}
    kills: list[str] = []
    done = asyncio.Event()
    started = time.monotonic()

    async def killer() -> None:
        while not done.is_set():
            try:
                await asyncio.wait_for(done.wait(), timeout=2.0)
            except TimeoutError:
                victim = await _kill_one(set(threads), hard=len(kills) % 2 == 1)
                if victim:
                    kills.append(victim)

    async with app.async_client(timeout=60) as http:
        client = Client(http, deadline=time.monotonic() + 240)

        async def conversation(thread: str) -> None:
            for n, message_id in enumerate(ids[thread], start=1):
                await client.say(thread, f"message {n}", message_id)

        chaos = asyncio.ensure_future(killer())
        try:
            await asyncio.gather(*(conversation(t) for t in threads))
        finally:
            done.set()
            await chaos
        histories = [await check_history(http, t, ids[t]) for t in threads]

    elapsed = time.monotonic() - started
    turns = sum(len(h) for h in histories)
    failed = sum(1 for h in histories for t in h if t["status"] == "failed")
    specialist = fake_llm.count(agent="bookings")
    supervisor = fake_llm.count(agent="triage")
    retries = sum(client.codes.values()) - turns
    print(
        f"\nchaos: {turns} turns in {elapsed:.1f} s, {len(kills)} kills "
        f"({(len(kills) + 1) // 2} ray.kill, {len(kills) // 2} SIGKILL), "
        f"{retries} client retries {dict(client.codes)}, {failed} failed turns, "
        f"specialist calls {specialist} (extra {specialist - 500 + failed}), "
        f"supervisor calls {supervisor}"
    )
    assert turns == 500
    assert len(kills) >= 2, "the test must actually kill actors"
    assert len(client.acked) == 500
    assert specialist <= 500 + len(kills)
    assert supervisor <= 20 + len(kills)


async def test_redis_outage_gives_503_then_recovers(
    app: App, fake_llm: FakeLLMServer, embedded_redis: EmbeddedRedis
) -> None:
    script(fake_llm)
    fake_llm.latency_s = 0.02
    threads = [new_thread() for _ in range(4)]
    ids = {t: [f"{t}-{i}" for i in range(1, 16)] for t in threads}
    health_while_down: dict = {}

    async with app.async_client(timeout=60) as http:
        client = Client(http, deadline=time.monotonic() + 180)

        async def conversation(thread: str) -> None:
            for n, message_id in enumerate(ids[thread], start=1):
                await client.say(thread, f"message {n}", message_id)

        async def outage() -> None:
            await client.until(lambda: len(client.acked) >= 8, within_s=60)
            await asyncio.to_thread(embedded_redis.stop)
            await client.until(lambda: client.codes[503] >= 4, within_s=10)
            health = await http.get("/healthz")
            health_while_down.update(code=health.status_code, body=health.json())
            await asyncio.to_thread(embedded_redis.start)

        await asyncio.gather(outage(), *(conversation(t) for t in threads))
        for t in threads:
            await check_history(http, t, ids[t])
        health_after = await http.get("/healthz")

    print(f"\nredis outage: responses {dict(client.codes)}")
    assert client.codes[503] >= 1
    assert any("redis" in e.lower() for e in client.errors)
    assert health_while_down["code"] == 503
    assert health_while_down["body"]["checks"]["redis"].startswith("down")
    assert health_after.status_code == 200
    assert len(client.acked) == 60
