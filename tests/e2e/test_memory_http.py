"""Long-term memory end to end: Postgres + pgvector, OpenAI embeddings, the agent's prompt."""

from __future__ import annotations

import pytest

from serve_app.agent_memory import MEMORY_TOOLS
from stickyray.metrics import metrics_url
from stickyray.testing import FakeLLMServer, FakeReply
from tests.e2e.conftest import App, new_thread, wait_for
from tests.e2e.teams import memory_team
from tests.e2e.test_metrics import scrape


@pytest.fixture(scope="module")
def app(deploy) -> App:
    return deploy(memory_team(short_window=6))


def script(fake: FakeLLMServer) -> None:
    fake.on(
        system_contains="Summarise this excerpt",
        reply=lambda r: FakeReply.text(f"Summary: {r.last_user_text}"),
    )
    fake.on(agent="triage", reply=FakeReply.tool_call("transfer_to_bookings", {"reason": "b"}))
    fake.on(agent="bookings", reply=FakeReply.text("noted"))


def user() -> str:
    return f"user-{new_thread()}"


def test_prompt_has_core_block_and_relevant_memory(app: App, fake_llm: FakeLLMServer) -> None:
    script(fake_llm)
    who = user()
    with app.client() as client:
        put = client.put(f"/v1/users/{who}/core/user_profile", json={"value": "Name: Ana Lopez"})
        assert put.status_code == 200 and put.json()["label"] == "user_profile"
        for content in (
            "The user prefers WhatsApp for notifications",
            "The user is allergic to peanuts",
        ):
            created = client.post(f"/v1/users/{who}/memories", json={"content": content})
            assert created.status_code == 201, created.text
        body = {"text": "book a table; how will you notify me, by WhatsApp?", "user_id": who}
        assert client.post(f"/v1/threads/{new_thread()}/messages", json=body).status_code == 200
    system = fake_llm.requests_for(agent="bookings")[-1].system
    assert '- user_profile: "Name: Ana Lopez"' in system  # quoted data, in its block
    assert '"The user prefers WhatsApp for notifications"' in system
    assert system.index("<memory>") < system.index("Ana Lopez") < system.rindex("</memory>")
    # The supervisor has no memory section: nothing of the user leaks into its prompt.
    assert "Ana Lopez" not in fake_llm.requests_for(agent="triage")[-1].system


def test_a_fact_from_turn_2_is_recalled_at_turn_40(app: App, fake_llm: FakeLLMServer) -> None:
    script(fake_llm)
    who, thread = user(), new_thread()
    with app.client() as client:

        def say(text: str) -> dict:
            r = client.post(f"/v1/threads/{thread}/messages", json={"text": text, "user_id": who})
            assert r.status_code == 200, r.text
            return r.json()

        say("I want to book a table")
        say("my company's tax id is B-76543210")
        for n in range(3, 40):
            say(f"filler message number {n}")
        state = client.get(f"/v1/threads/{thread}").json()
        assert all("B-76543210" not in e["text"] for e in state["buffer"]), "left the buffer"
        assert len(state["buffer"]) <= 6
        assert say("what is my tax id?")["turn"] == 40
        found = client.get(
            f"/v1/users/{who}/memories", params={"query": "tax id", "k": 3, "kind": "episodic"}
        ).json()
    assert any("B-76543210" in m["memory"]["content"] for m in found["memories"])
    (final,) = [
        r
        for r in fake_llm.requests_for(agent="bookings")
        if r.last_user_text == "what is my tax id?"
    ]
    assert "B-76543210" in final.system
    assert not any("B-76543210" in str(m.get("content")) for m in final.messages[1:])


def test_memory_tools_write_memories(app: App, fake_llm: FakeLLMServer) -> None:
    fake_llm.on(agent="triage", reply=FakeReply.tool_call("transfer_to_bookings", {"reason": "b"}))
    fake_llm.on(agent="bookings", after_tool_result=True, reply=FakeReply.text("saved"))
    fake_llm.on(
        agent="bookings",
        user_contains="vegetarian",
        reply=FakeReply.tool_calls(
            [
                ("remember", {"content": "The user is vegetarian", "importance": 0.9}),
                ("core_memory_update", {"label": "user_profile", "value": "Vegetarian."}),
            ]
        ),
    )
    who = user()
    with app.client() as client:
        body = {"text": "book dinner, I am vegetarian", "user_id": who}
        reply = client.post(f"/v1/threads/{new_thread()}/messages", json=body).json()
        core = client.get(f"/v1/users/{who}/core/user_profile")
        found = client.get(f"/v1/users/{who}/memories", params={"query": "vegetarian"}).json()
    assert reply["reply"] == "saved"
    assert core.status_code == 200 and core.json()["value"] == "Vegetarian."
    assert found["memories"][0]["memory"]["content"] == "The user is vegetarian"
    assert found["memories"][0]["memory"]["agent"] == "bookings"
    tools = set(fake_llm.requests_for(agent="bookings")[0].tools)
    assert set(MEMORY_TOOLS) <= tools  # the names start-up checks for clashes


def test_an_anonymous_threads_memories_are_read_and_deleted_by_thread(
    app: App, fake_llm: FakeLLMServer
) -> None:
    fake_llm.on(agent="triage", reply=FakeReply.tool_call("transfer_to_bookings", {"reason": "b"}))
    fake_llm.on(agent="bookings", after_tool_result=True, reply=FakeReply.text("saved"))
    fake_llm.on(
        agent="bookings",
        user_contains="vegan",
        reply=FakeReply.tool_call("remember", {"content": "The guest is vegan"}),
    )
    thread = new_thread()
    with app.client() as client:
        reply = client.post(f"/v1/threads/{thread}/messages", json={"text": "book, I am vegan"})
        assert reply.status_code == 200 and reply.json()["reply"] == "saved"
        found = client.get(f"/v1/threads/{thread}/memories", params={"query": "vegan"}).json()
        (hit,) = [h for h in found["memories"] if h["memory"]["content"] == "The guest is vegan"]
        memory_id = hit["memory"]["id"]
        assert client.delete(f"/v1/threads/{thread}/memories/{memory_id}").status_code == 204
        again = client.get(f"/v1/threads/{thread}/memories", params={"query": "vegan"}).json()
    assert all(h["memory"]["id"] != memory_id for h in again["memories"])


def test_memory_api_validates_and_scopes(app: App, fake_llm: FakeLLMServer) -> None:
    who, other = user(), user()
    with app.client() as client:
        created = client.post(
            f"/v1/users/{who}/memories", json={"content": "Lives in Porto", "kind": "semantic"}
        ).json()
        assert (
            client.get(f"/v1/users/{other}/memories", params={"query": "Porto"}).json()["memories"]
            == []
        )
        queries: list[tuple[dict[str, str | int], str]] = [
            ({}, "query"),
            ({"query": "x", "k": 0}, "k"),
            ({"query": "x", "kind": "dream"}, "kind"),
        ]
        for params, field in queries:
            bad = client.get(f"/v1/users/{who}/memories", params=params)
            assert bad.status_code == 422 and field in bad.text, bad.text
        for body, field in [
            ({"content": ""}, "content"),
            ({"content": "x", "importance": 2}, "importance"),
            ({"content": "x", "colour": 1}, "colour"),
            # Postgres stores neither: they must be a 422, not a 500 from the database.
            ({"content": "a\u0000b"}, "body.content"),
        ]:
            bad = client.post(f"/v1/users/{who}/memories", json=body)
            assert bad.status_code == 422 and field in bad.text, bad.text
        nan = client.post(
            f"/v1/users/{who}/memories",
            content=b'{"content": "x", "metadata": {"n": NaN}}',  # Python's json reads NaN
            headers={"content-type": "application/json"},
        )
        assert nan.status_code == 422 and "body.metadata" in nan.text, nan.text
        assert client.delete(f"/v1/users/{other}/memories/{created['id']}").status_code == 404
        assert client.delete(f"/v1/users/{who}/memories/not-a-uuid").status_code == 404
        assert client.delete(f"/v1/users/{who}/memories/{created['id']}").status_code == 204
        assert client.delete(f"/v1/users/{who}/memories/{created['id']}").status_code == 404
        assert client.get(f"/v1/users/{who}/core/persona").status_code == 404
        too_long = client.put(f"/v1/users/{who}/core/persona", json={"value": "x" * 5000})
        assert too_long.status_code == 422 and "value" in too_long.text
        nul = client.put(f"/v1/users/{who}/core/persona", json={"value": "\u0000"})
        assert nul.status_code == 422 and "body.value" in nul.json()["error"]
        assert client.put(f"/v1/users/{who}/core/Bad-Label", json={"value": "x"}).status_code == 422


def test_embedding_calls_count_in_the_model_metrics(app: App, fake_llm: FakeLLMServer) -> None:
    script(fake_llm)
    who = user()
    with app.client() as client:
        created = client.post(f"/v1/users/{who}/memories", json={"content": f"{who} likes tea"})
        assert created.status_code == 201, created.text
        body = {"text": f"book a table, {who} says", "user_id": who}
        turn = client.post(f"/v1/threads/{new_thread()}/messages", json=body)
        assert turn.status_code == 200, turn.text
    # The turn's usage has the search too: bookings' model call and its embedding.
    usage = turn.json()["usage_by_agent"]
    assert usage["bookings"]["requests"] == 2 and usage["triage"]["requests"] == 1
    assert turn.json()["usage"]["requests"] == 3
    url = metrics_url()
    assert url is not None
    # The memory API's and the agent's own searches, under the embedding model's name.
    wanted = [
        (name, (("agent", agent), *direction, ("model", "text-embedding-3-small")))
        for agent in ("memory-api", "bookings")
        for name, direction in (
            ("ray_stickyray_llm_requests_total", ()),
            ("ray_stickyray_llm_tokens_total", (("direction", "input"),)),
        )
    ]
    seen: dict = {}

    def counted() -> bool:
        totals, _ = scrape(url, app.name)
        seen.update({key: totals.get(key, 0) for key in wanted})
        return all(seen.values())

    wait_for(counted, timeout=60, what=f"embedding metrics (last seen {seen})")
