"""The sticky flow over HTTP: real openai SDK against the fake server, real Ray and Redis."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Callable

import httpx
import pytest
from ray import serve
from ray.util.state import list_actors

from actors.key import ThreadKey
from stickyray.chat import run_chat
from stickyray.testing import FakeLLMServer, FakeReply, FakeRequest
from tests.e2e.conftest import App, live_thread_actors, new_thread
from tests.e2e.teams import openai_team


@pytest.fixture(scope="module")
def app(deploy) -> App:
    return deploy(openai_team())


def script(fake: FakeLLMServer) -> None:
    """triage routes by keyword; specialists echo; 'loop' makes invoices and support ping-pong."""
    fake.on(
        agent="triage",
        user_contains="book",
        reply=FakeReply.tool_call("transfer_to_bookings", {"reason": "wants a booking"}),
    )
    fake.on(
        agent="triage",
        user_contains="invoice",
        reply=FakeReply.tool_call("transfer_to_invoices", {"reason": "billing question"}),
    )
    fake.on(
        agent="triage",
        user_contains="loop",
        reply=FakeReply.tool_call("transfer_to_invoices", {"reason": "loop"}),
    )
    fake.on(
        agent="invoices",
        user_contains="loop",
        reply=FakeReply.tool_call("transfer_to_support", {"reason": "not mine"}),
    )
    fake.on(
        agent="support",
        user_contains="loop",
        reply=FakeReply.tool_call("transfer_to_invoices", {"reason": "not mine either"}),
    )
    for agent in ("triage", "bookings", "invoices", "support"):
        fake.on(agent=agent, reply=_echo_as(agent))


def _echo_as(agent: str) -> Callable[[FakeRequest], FakeReply]:
    """A reply that names the agent that answered and echoes the user's message."""
    return lambda req: FakeReply.text(f"{agent} says: {req.last_user_text}")


def post(client, thread: str, text: str, **extra):
    response = client.post(f"/v1/threads/{thread}/messages", json={"text": text, **extra})
    assert response.status_code == 200, response.text
    return response.json()


def test_follow_ups_skip_the_supervisor_until_asked(app: App, fake_llm: FakeLLMServer) -> None:
    script(fake_llm)
    thread = new_thread()
    with app.client() as client:
        first = post(client, thread, "I want to book a table for two")
        assert first["turn"] == 1
        assert first["agent"] == "bookings"
        assert first["handoffs"] == [
            {"from": "triage", "to": "bookings", "reason": "wants a booking"}
        ]
        assert first["reply"] == "bookings says: I want to book a table for two"
        assert first["usage"]["input_tokens"] > 0 and first["usage"]["output_tokens"] > 0
        split = first["usage_by_agent"]
        assert set(split) == {"triage", "bookings"}
        assert sum(u["input_tokens"] for u in split.values()) == first["usage"]["input_tokens"]
        assert {a: u["requests"] for a, u in split.items()} == {"triage": 1, "bookings": 1}
        assert [r.agent for r in fake_llm.requests] == ["triage", "bookings"]

        for turn, text in enumerate(["at 8pm", "2 people", "by the window", "thanks"], start=2):
            body = post(client, thread, text)
            assert (body["turn"], body["agent"], body["handoffs"]) == (turn, "bookings", [])
        assert fake_llm.count(agent="triage") == 1
        assert fake_llm.count(agent="bookings") == 5
        # The specialist sees the thread's short-term buffer in its prompt.
        last = fake_llm.requests_for(agent="bookings")[-1]
        contents = [m.get("content") for m in last.messages]
        assert "I want to book a table for two" in contents and "2 people" in contents

        state = client.get(f"/v1/threads/{thread}").json()
        assert state["active_agent"] == "bookings" and state["turns"] == 5
        assert [e["text"] for e in state["buffer"] if e["role"] == "user"][:2] == [
            "I want to book a table for two",
            "at 8pm",
        ]

        before = len(fake_llm.requests)
        status = post(client, thread, "/status")
        assert status["command"] == "status" and "bookings" in status["reply"]
        assert "5" in status["reply"]
        assert "/supervisor" in post(client, thread, "/help")["reply"]
        assert "bookings" in post(client, thread, "/agents")["reply"]
        assert "Unknown command /nope" in post(client, thread, "/nope")["reply"]
        back = post(client, thread, "/supervisor")
        assert back["command"] == "supervisor"
        assert len(fake_llm.requests) == before, "commands must not call a model"
        assert client.get(f"/v1/threads/{thread}").json()["active_agent"] is None

        routed = post(client, thread, "Now a question about my invoice")
        assert routed["turn"] == 6 and routed["agent"] == "invoices"
        assert [r.agent for r in fake_llm.requests[before:]] == ["triage", "invoices"]

        before = len(fake_llm.requests)
        reset = client.post(f"/v1/threads/{thread}/reset")
        assert reset.status_code == 200 and reset.json()["command"] == "reset"
        state = client.get(f"/v1/threads/{thread}").json()
        assert state["active_agent"] is None and state["buffer"] == []
        assert post(client, thread, "/reset")["command"] == "reset"
        assert len(fake_llm.requests) == before


def sse_events(response: httpx.Response) -> list[tuple[str, dict]]:
    events: list[tuple[str, dict]] = []
    name = ""
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            events.append((name, json.loads(line.removeprefix("data: "))))
    return events


def test_a_streamed_turn_tells_its_reply_as_it_is_written(
    app: App, fake_llm: FakeLLMServer
) -> None:
    script(fake_llm)
    thread = new_thread()
    body = {"text": "book a table for two tonight", "message_id": "m1", "stream": True}
    url = f"/v1/threads/{thread}/messages"
    with app.client() as client:
        with client.stream("POST", url, json=body) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = sse_events(response)
        names = [name for name, _ in events]
        assert names[-1] == "turn" and set(names[:-1]) == {"delta"}
        turn = events[-1][1]
        assert (turn["turn"], turn["agent"], turn["status"]) == (1, "bookings", "completed")
        assert turn["handoffs"][0]["from"] == "triage"
        pieces = [piece for name, piece in events if name == "delta"]
        assert {(p["agent"], p["step"]) for p in pieces} == {("bookings", 1)}
        assert "".join(p["text"] for p in pieces) == turn["reply"]
        assert turn["reply"] == "bookings says: book a table for two tonight"
        # The same message again is not a second turn: its turn, told at once.
        with client.stream("POST", url, json=body) as again:
            assert sse_events(again) == [("turn", turn)]
        history = client.get(f"{url.removesuffix('/messages')}/turns").json()["turns"]
        assert [t["reply"] for t in history] == [turn["reply"]]
        # The follow-up, unstreamed, goes straight to bookings as ever.
        follow = client.post(url, json={"text": "for two"}).json()
        assert (follow["turn"], follow["agent"], follow["handoffs"]) == (2, "bookings", [])
        bad = client.post(url, json={"text": "hi", "stream": "maybe"})
        assert bad.status_code == 422 and "body.stream" in bad.json()["error"]
    streamed = [r.stream for r in fake_llm.requests_for(agent="bookings")]
    assert streamed == [True, False]


def test_handoff_loop_stops_after_three(app: App, fake_llm: FakeLLMServer) -> None:
    script(fake_llm)
    thread = new_thread()
    with app.client() as client:
        body = post(client, thread, "loop please")
    assert body["error"] == "handoff_limit"
    assert "more than 3 times" in body["reply"]
    assert [(h["from"], h["to"]) for h in body["handoffs"]] == [
        ("triage", "invoices"),
        ("invoices", "support"),
        ("support", "invoices"),
    ]
    assert [r.agent for r in fake_llm.requests] == ["triage", "invoices", "support", "invoices"]


async def test_concurrent_messages_to_one_thread_queue_in_order(
    app: App, fake_llm: FakeLLMServer
) -> None:
    script(fake_llm)
    fake_llm.latency_s = 0.02
    thread = new_thread()
    async with app.async_client() as client:
        first = await client.post(f"/v1/threads/{thread}/messages", json={"text": "book a room"})
        assert first.json()["agent"] == "bookings"
        texts = [f"follow-up {i}" for i in range(19)]
        responses = await asyncio.gather(
            *(client.post(f"/v1/threads/{thread}/messages", json={"text": t}) for t in texts)
        )
        state = (await client.get(f"/v1/threads/{thread}")).json()
    bodies = [r.json() for r in responses]
    assert sorted(b["turn"] for b in bodies) == list(range(2, 21))
    assert all(b["agent"] == "bookings" for b in bodies)
    text_of_turn = {b["turn"]: t for b, t in zip(bodies, texts, strict=True)}
    text_of_turn[1] = "book a room"
    users = [e for e in state["buffer"] if e["role"] == "user"]
    assert [e["turn"] for e in users] == list(range(1, 21))
    assert [e["text"] for e in users] == [text_of_turn[t] for t in range(1, 21)]
    assert fake_llm.count(agent="triage") == 1


async def test_new_threads_in_parallel_get_their_own_actors(
    app: App, fake_llm: FakeLLMServer
) -> None:
    script(fake_llm)
    threads = [new_thread() for _ in range(20)]
    async with app.async_client(timeout=120) as client:
        responses = await asyncio.gather(
            *(client.post(f"/v1/threads/{t}/messages", json={"text": "book it"}) for t in threads)
        )
    assert all(r.status_code == 200 and r.json()["turn"] == 1 for r in responses)
    names = set(live_thread_actors())
    assert {ThreadKey.of(t).actor_name for t in threads} <= names


async def test_concurrent_first_messages_create_exactly_one_actor(
    app: App, fake_llm: FakeLLMServer
) -> None:
    script(fake_llm)
    thread = new_thread()
    async with app.async_client(timeout=120) as client:
        responses = await asyncio.gather(
            *(
                client.post(f"/v1/threads/{thread}/messages", json={"text": "book"})
                for _ in range(30)
            )
        )
    assert sorted(r.json()["turn"] for r in responses) == list(range(1, 31))
    assert live_thread_actors(thread) == [ThreadKey.of(thread).actor_name]
    # Alive or dead, Ray only ever created one actor under this name.
    created = list_actors(filters=[("name", "=", ThreadKey.of(thread).actor_name)], detail=True)
    assert len(created) == 1
    assert fake_llm.count(agent="triage") == 1


def test_each_agent_is_its_own_deployment_with_its_replicas(app: App) -> None:
    deployments = serve.status().applications[app.name].deployments
    assert {"triage", "invoices", "bookings", "support"} <= set(deployments)

    def running(name: str) -> int:
        states = deployments[name].replica_states
        return sum(n for s, n in states.items() if getattr(s, "value", s) == "RUNNING")

    assert running("bookings") == 2
    assert running("triage") == running("invoices") == running("support") == 1
    with app.client() as client:
        agents = {a["name"]: a for a in client.get("/v1/agents").json()}
        health = client.get("/healthz")
        checked = client.head("/healthz")  # as a load balancer may check it
    assert (checked.status_code, checked.content) == (200, b"")
    assert agents["bookings"]["replicas"] == 2
    assert agents["triage"]["role"] == "supervisor" and agents["support"]["role"] == "specialist"
    assert health.status_code == 200 and health.json()["checks"]["redis"] == "ok"


def test_chat_client_shows_which_agent_answered(app: App, fake_llm: FakeLLMServer, capsys) -> None:
    script(fake_llm)
    thread = new_thread()
    assert run_chat(app.url, thread, stdin=io.StringIO("book a table\n\n/status\n")) == 0
    out = capsys.readouterr().out
    assert f"thread {thread}" in out
    assert "(triage -> bookings: wants a booking)" in out
    assert "[bookings] bookings says: book a table" in out
    assert "[stickyray] Active agent: bookings" in out


def test_memory_routes_say_when_memory_is_off(app: App) -> None:
    with app.client() as client:
        response = client.get("/v1/users/someone/memories", params={"query": "x"})
    assert response.status_code == 404 and "memory` section" in response.text
