"""Rejected requests get a 4xx naming the field, and leave nothing behind."""

from __future__ import annotations

import pytest

from stickyray.testing import FakeLLMServer
from tests.e2e.conftest import App, live_thread_actors, new_thread
from tests.e2e.teams import openai_team


@pytest.fixture(scope="module")
def app(deploy) -> App:
    return deploy(openai_team())


@pytest.mark.parametrize(
    ("payload", "status", "field"),
    [
        ({"text": ""}, 422, "text"),
        ({"text": "   "}, 422, "text"),
        ({}, 422, "text"),
        ({"text": 5}, 422, "text"),
        ({"text": "hi", "colour": "red"}, 422, "colour"),
        ({"text": "hi", "message_id": "has spaces"}, 422, "message_id"),
        ({"text": "hi", "user_id": "john doe"}, 422, "user_id"),
        ({"text": "nul \u0000 inside"}, 422, "NUL"),
        ({"text": "x" * 1025}, 413, "text"),
    ],
)
def test_bad_message_bodies(app: App, fake_llm: FakeLLMServer, payload, status, field) -> None:
    thread = new_thread()
    with app.client() as client:
        response = client.post(f"/v1/threads/{thread}/messages", json=payload)
        assert response.status_code == status, response.text
        assert field in response.text
        assert client.get(f"/v1/threads/{thread}").status_code == 404
    assert fake_llm.requests == []
    assert live_thread_actors(thread) == []


def test_malformed_json_and_bad_thread_ids(app: App, fake_llm: FakeLLMServer) -> None:
    thread = new_thread()
    with app.client() as client:
        response = client.post(
            f"/v1/threads/{thread}/messages",
            content=b'{"text": "unterminated',
            headers={"content-type": "application/json"},
        )
        assert response.status_code == 422 and "json" in response.text.lower()
        bad = client.post("/v1/threads/bad%20id!/messages", json={"text": "hi"})
        assert bad.status_code == 422 and bad.json()["error"].startswith("path.thread_id")
        # Python's "$" would let a trailing newline through as a distinct thread.
        newline = client.post(f"/v1/threads/{thread}%0A/messages", json={"text": "hi"})
        assert newline.status_code == 422 and "thread_id" in newline.json()["error"]
        assert client.get(f"/v1/threads/{thread}").status_code == 404
        assert client.post(f"/v1/threads/{thread}/reset").status_code == 404
        # A body over the API's cap (1 MiB here), whatever it holds, streamed or not.
        huge = b'{"text": "hi", "pad": "' + b"x" * (1024 * 1024) + b'"}'
        over = client.post(
            f"/v1/threads/{thread}/messages",
            content=huge,
            headers={"content-type": "application/json"},
        )
        assert over.status_code == 413 and over.json()["error"].startswith("body: over")
        streamed = client.post(
            f"/v1/threads/{thread}/runs",
            content=(huge[i : i + 65536] for i in range(0, len(huge), 65536)),
            headers={"content-type": "application/json"},
        )
        assert streamed.status_code == 413 and streamed.json()["error"].startswith("body: over")
    assert fake_llm.requests == []
    assert live_thread_actors(thread) == []
