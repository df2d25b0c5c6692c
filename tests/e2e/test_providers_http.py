"""The same sticky flow with Anthropic agents, and the offline provider with no network."""

from __future__ import annotations

import pytest

from stickyray.config import load_config
from stickyray.testing import FakeLLMServer, FakeReply
from tests.e2e.conftest import App, new_thread
from tests.e2e.teams import openai_team


@pytest.fixture(scope="module")
def mixed_app(deploy) -> App:
    team = openai_team()
    team["supervisor"].update(provider="anthropic", model="claude-test")
    team["specialists"][1].update(provider="anthropic", model="claude-test")  # bookings
    return deploy(team)


def test_anthropic_supervisor_and_specialist(mixed_app: App, fake_llm: FakeLLMServer) -> None:
    fake_llm.on(
        agent="triage",
        user_contains="book",
        reply=FakeReply.tool_call("transfer_to_bookings", {"reason": "booking"}),
    )
    fake_llm.on(
        agent="triage",
        user_contains="invoice",
        reply=FakeReply.tool_call("transfer_to_invoices", {"reason": "billing"}),
    )
    fake_llm.on(agent="bookings", reply=lambda r: FakeReply.text(f"booked: {r.last_user_text}"))
    fake_llm.on(agent="invoices", reply=FakeReply.text("invoice sorted"))
    thread = new_thread()
    with mixed_app.client() as client:

        def send(text: str) -> dict:
            response = client.post(f"/v1/threads/{thread}/messages", json={"text": text})
            assert response.status_code == 200, response.text
            return response.json()

        first = send("please book a room")
        assert (first["agent"], first["reply"]) == ("bookings", "booked: please book a room")
        assert first["usage"]["input_tokens"] > 0
        for text in ("for two nights", "from Friday"):
            assert send(text)["agent"] == "bookings"
        assert [(r.agent, r.api) for r in fake_llm.requests] == [
            ("triage", "anthropic"),
            ("bookings", "anthropic"),
            ("bookings", "anthropic"),
            ("bookings", "anthropic"),
        ]
        # The Anthropic wire format carries the system prompt apart and the buffer in order.
        last = fake_llm.requests[-1]
        assert "You handle bookings." in last.system
        assert last.messages[0]["role"] == "user"
        before = len(fake_llm.requests)
        assert send("/status")["command"] == "status"
        assert send("/supervisor")["command"] == "supervisor"
        assert len(fake_llm.requests) == before
        assert send("an invoice question")["agent"] == "invoices"
    assert [(r.agent, r.api) for r in fake_llm.requests[before:]] == [
        ("triage", "anthropic"),
        ("invoices", "openai"),
    ]


@pytest.fixture(scope="module")
def offline_app(deploy) -> App:
    return deploy(load_config(None).model_dump(exclude_none=True))


def test_offline_provider_routes_a_booking_question(
    offline_app: App, fake_llm: FakeLLMServer
) -> None:
    thread = new_thread()
    with offline_app.client() as client:
        first = client.post(
            f"/v1/threads/{thread}/messages",
            json={"text": "Can I reserve a table for four people on Friday evening?"},
        ).json()
        follow = client.post(
            f"/v1/threads/{thread}/messages", json={"text": "yes, 4 people"}
        ).json()
        billing = client.post(
            f"/v1/threads/{thread}/messages",
            json={"text": "I was charged twice on my last invoice, I need a refund"},
        ).json()
    assert first["agent"] == "bookings"
    assert first["handoffs"][0]["from"] == "triage" and first["handoffs"][0]["to"] == "bookings"
    assert "offline mode" in first["reply"]
    assert follow["agent"] == "bookings" and follow["handoffs"] == []
    assert billing["agent"] == "invoices"
    assert fake_llm.requests == [], "the offline provider must not call any model server"


@pytest.fixture(scope="module")
def precheck_app(deploy) -> App:
    team = openai_team()
    team["routing"] = {"precheck": True}
    team["specialists"][0]["description"] = "Invoices, bills, payments, refunds and charges."
    team["specialists"][1]["description"] = "Reservations of restaurant tables and hotel rooms."
    team["specialists"][2]["description"] = "Technical support: login problems and app errors."
    return deploy(team)


def test_llm_specialist_precheck_hands_over_without_a_model_call(
    precheck_app: App, fake_llm: FakeLLMServer
) -> None:
    fake_llm.on(
        agent="triage",
        user_contains="refund",
        reply=FakeReply.tool_call("transfer_to_invoices", {"reason": "billing"}),
    )
    fake_llm.on(agent="triage", reply=FakeReply.tool_call("transfer_to_bookings", {"reason": "b"}))
    fake_llm.on(agent="bookings", reply=FakeReply.text("booked"))
    fake_llm.on(agent="invoices", reply=FakeReply.text("refund on its way"))
    thread = new_thread()
    with precheck_app.client() as client:

        def send(text: str) -> dict:
            response = client.post(f"/v1/threads/{thread}/messages", json={"text": text})
            assert response.status_code == 200, response.text
            return response.json()

        assert send("I want to reserve a table for dinner tonight")["agent"] == "bookings"
        assert send("yes, 2 people please")["agent"] == "bookings"
        before = fake_llm.count(agent="bookings")
        moved = send("I also need a refund, there is a wrong charge on my last invoice")
    assert moved["agent"] == "invoices"
    assert moved["handoffs"][0]["from"] == "bookings"
    assert moved["handoffs"][0]["reason"].startswith("routing pre-check")
    assert fake_llm.count(agent="bookings") == before, "the pre-check spent no model call"
