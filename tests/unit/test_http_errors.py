"""The HTTP API's error paths, on the real FastAPI app with in-process fakes behind it (no Ray).

Every error answers in the API's shape (``{"error": ...}``), outages as 503s to retry.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from ray import serve
from ray.exceptions import RaySystemError

import serve_app.ingress as ingress
from actors.key import ID_RULE, ThreadKey
from actors.store import Checkpoint
from memory.in_memory import InMemoryMemoryStore
from memory.service import LongTermMemory
from serve_app.runs_api import RunsState
from stickyray.config import RunsConfig, load_config
from stickyray.errors import ConfigError, MessageIdReused, ProviderError
from stickyray.turns import InboundMessage, TurnResult, anonymous_owner


class Store:
    """Answers like a thread store holding one thread; ``fail`` makes every read raise it."""

    fail: Exception | None = None

    async def load(self, key: ThreadKey) -> Checkpoint | None:
        if self.fail is not None:
            raise self.fail
        return Checkpoint(turn=1, version=1) if key.thread_id != "missing" else None

    async def ping(self) -> None:
        return None


class Directory:
    """Records what it was sent."""

    def __init__(self) -> None:
        self.sent: list[InboundMessage] = []
        self.fail: Exception | None = None

    async def send(self, key: ThreadKey, message: InboundMessage) -> TurnResult:
        if self.fail is not None:
            raise self.fail
        self.sent.append(message)
        return TurnResult(
            thread_id=key.thread_id, message_id=message.message_id, turn=1, agent=None, reply="ok"
        )


class Embedder:
    dimension = 8

    def __init__(self) -> None:
        self.fail: Exception | None = None

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        if self.fail is not None:
            raise self.fail
        return np.full((len(texts), 8), 8**-0.5, dtype=np.float32)


_Ingress: Any = ingress.Ingress.__mro__[1]  # the class serve.ingress wraps


class Replica(_Ingress):
    """The ingress class with its attributes set by hand instead of by its async __init__."""

    def __del__(self) -> None:  # nothing was opened, so nothing to close
        return None


@pytest.fixture
def replica(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.SimpleNamespace]:
    instance = object.__new__(Replica)
    instance._team = load_config(None)
    instance._app_name = "stickyray"
    instance._store = Store()
    instance._directory = Directory()
    instance._keepalive_s = ingress.STREAM_KEEPALIVE_S
    # serve.ingress finds the replica's instance through the replica context.
    context = types.SimpleNamespace(servable_object=instance)
    monkeypatch.setattr(serve, "get_replica_context", lambda: context)
    embedder = Embedder()
    memory = LongTermMemory(InMemoryMemoryStore(dimension=8), embedder)
    monkeypatch.setattr(ingress.api.state, "memory", memory, raising=False)
    monkeypatch.setattr(ingress.api.state, "core_block_limit", 100, raising=False)
    client = TestClient(ingress.api, raise_server_exceptions=False)
    yield types.SimpleNamespace(client=client, instance=instance, embedder=embedder)


def test_an_unexpected_error_still_answers_json(replica: types.SimpleNamespace) -> None:
    replica.instance._store.fail = ValueError("a bug")
    response = replica.client.get("/v1/threads/alice")
    assert response.status_code == 500
    assert response.json()["error"] == "internal error: ValueError"


def test_an_error_is_answered_once_and_logged_once(
    replica: types.SimpleNamespace, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing is re-raised after the answer, which logged each error twice."""
    client = TestClient(ingress.api)  # raises whatever the app lets escape
    replica.instance._store.fail = ValueError("a bug")
    with caplog.at_level(logging.WARNING):
        response = client.get("/v1/threads/alice")
    assert response.status_code == 500
    assert [r.exc_info[1] for r in caplog.records if r.exc_info] == [replica.instance._store.fail]
    assert len(caplog.records) == 1
    caplog.clear()
    replica.instance._store.fail = RaySystemError("the node died")  # an outage: one line
    with caplog.at_level(logging.WARNING):
        response = client.get("/v1/threads/alice")
    assert response.status_code == 503
    assert [r.getMessage() for r in caplog.records] == [
        f"GET /v1/threads/alice: {response.json()['error']}"
    ]
    caplog.clear()
    replica.instance._store.fail = ConfigError("memory.dimension: no")  # named, but a 500
    with caplog.at_level(logging.WARNING):
        response = client.get("/v1/threads/alice")
    assert response.status_code == 500
    assert [r.exc_info[1] for r in caplog.records if r.exc_info] == [replica.instance._store.fail]


def test_a_request_no_route_takes_says_what_to_fix(replica: types.SimpleNamespace) -> None:
    client = replica.client
    slashed = client.post("/v1/threads/team%2Falice/messages", json={"text": "hi"})
    assert slashed.status_code == 404
    assert slashed.json()["error"] == (
        "POST /v1/threads/team/alice/messages: no such endpoint (a thread or user id has no "
        "'/', not even as %2F); see /docs"
    )
    assert client.get("/v2/x").json()["error"] == "GET /v2/x: no such endpoint; see /docs"
    wrong = client.delete("/v1/threads/alice/messages")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    assert wrong.json()["error"] == (
        "DELETE /v1/threads/alice/messages: method not allowed here (allowed: POST); see /docs"
    )
    # Every method of the path, not only the first route's.
    runs = client.patch("/v1/threads/alice/runs")
    assert runs.status_code == 405 and runs.headers["allow"] == "GET, HEAD, POST"
    assert "(allowed: GET, HEAD, POST)" in runs.json()["error"]
    core = client.patch("/v1/users/bob/core/profile")
    assert core.headers["allow"] == "DELETE, GET, HEAD, PUT"
    # HEAD is answered wherever GET is, as GET is, with no body (so is a refusal).
    head = client.head("/v1/threads/missing")
    assert (head.status_code, head.content) == (404, b"")
    assert int(head.headers["content-length"]) == len(client.get("/v1/threads/missing").content)
    refused = client.head("/v1/threads/alice/messages")
    assert (refused.status_code, refused.headers["allow"], refused.content) == (405, "POST", b"")
    # A route's own 404 keeps its message.
    missing = client.get("/v1/threads/missing")
    assert missing.status_code == 404 and missing.json()["error"] == "thread 'missing' not found"


def test_a_failing_model_provider_is_a_503(replica: types.SimpleNamespace) -> None:
    replica.instance._directory.fail = ProviderError("openai", "triage", "RateLimitError: 429")
    response = replica.client.post("/v1/threads/alice/messages", json={"text": "hi"})
    assert response.status_code == 503
    assert "model provider is unavailable" in response.json()["error"]


def test_a_message_id_reused_for_another_message_is_a_422(
    replica: types.SimpleNamespace,
) -> None:
    replica.instance._directory.fail = MessageIdReused("default/alice", "m-1")
    response = replica.client.post(
        "/v1/threads/alice/messages", json={"text": "hi", "message_id": "m-1"}
    )
    assert response.status_code == 422
    assert response.json()["error"].startswith("body.message_id: message_id 'm-1' was already")


def test_agents_without_a_serve_controller_is_a_503(
    replica: types.SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreachable() -> None:
        raise ConnectionError("controller gone")

    monkeypatch.setattr(ingress.serve, "status", unreachable)
    response = replica.client.get("/v1/agents")
    assert response.status_code == 503
    assert "controller gone" in response.json()["error"]


def test_a_reset_takes_the_clients_message_id(replica: types.SimpleNamespace) -> None:
    """So a retried reset is the same reset, which the thread answers once."""
    for _ in range(2):
        body = replica.client.post("/v1/threads/alice/reset", json={"message_id": "r-1"}).json()
        assert body["message_id"] == "r-1"
    assert [m.message_id for m in replica.instance._directory.sent] == ["r-1", "r-1"]
    assert replica.client.post("/v1/threads/alice/reset").status_code == 200  # id generated
    bad = replica.client.post("/v1/threads/alice/reset", json={"message_id": "no spaces"})
    assert bad.status_code == 422 and "body.message_id" in bad.json()["error"]


def test_memory_outages_and_bad_fields(replica: types.SimpleNamespace) -> None:
    client = replica.client
    users = "/v1/users/u1/memories"
    assert client.post(users, json={"content": "likes tea"}).status_code == 201
    # An empty kind is an unset one, as forms send it.
    assert client.get(f"{users}?query=tea&k=10&kind=").status_code == 200
    blank = client.post(users, json={"content": "   "})
    assert blank.status_code == 422 and "body.content" in blank.json()["error"]
    agent = client.post(users, json={"content": "x", "agent": "a\x00b"})
    assert agent.status_code == 422 and "body.agent" in agent.json()["error"]
    for importance in (True, "0.5"):  # a number is what JSON writes as one
        odd = client.post(users, json={"content": "x", "importance": importance})
        assert odd.status_code == 422 and "body.importance" in odd.json()["error"]
    assert client.post(users, json={"content": "tea", "importance": 1}).status_code == 201
    # Nested past what a response carries back: refused, not stored to break every search.
    deep: Any = "x"
    for _ in range(300):
        deep = [deep]
    nested = client.post(users, json={"content": "deep", "metadata": {"a": deep}})
    assert nested.status_code == 422 and "body.metadata" in nested.json()["error"]
    assert "deeper than 32" in nested.json()["error"]
    shallow: Any = "x"
    for _ in range(31):
        shallow = [shallow]
    kept = client.post(users, json={"content": "shallow", "metadata": {"a": shallow}})
    assert kept.status_code == 201, kept.text
    assert client.get(f"{users}?query=deep&k=10").status_code == 200
    # A user id that breaks the id rule is told the rule, as a thread id is.
    for bad in ("-alice", "a" * 129):
        refused = client.get(f"/v1/users/{bad}/memories?query=tea")
        assert refused.status_code == 422
        assert refused.json()["error"] == f"path.user_id: {ID_RULE}"
    # Malformed JSON names the body, not a character as if it were a field (body.8).
    cut = client.post(users, content=b'{"content":', headers={"Content-Type": "application/json"})
    assert cut.status_code == 422
    assert cut.json()["error"] == "body: not valid JSON (Expecting value at character 11)"
    # JSON no parser reads is malformed JSON too: a 422 naming the body, not a bare 400.
    for raw in (b'{"content": "\xff\xfe"}', b'{"content": "x", "importance": 1' + b"0" * 5000):
        unread = client.post(users, content=raw, headers={"Content-Type": "application/json"})
        assert unread.status_code == 422, unread.text
        assert unread.json()["error"].startswith("body: not valid JSON")
    # A memory's id in capitals is the same memory, in every store.
    tea = client.post(users, json={"content": "likes green tea"}).json()["id"]
    assert client.delete(f"{users}/{tea.upper()}").status_code == 204
    assert client.delete(f"{users}/{tea}").status_code == 404
    replica.embedder.fail = ProviderError("openai", "embedder", "RateLimitError: 429")
    for response in (client.get(f"{users}?query=tea"), client.post(users, json={"content": "x"})):
        assert response.status_code == 503
        assert response.json()["error"].startswith("the embedding model is unavailable")


def test_an_anonymous_threads_memories_are_the_threads_own(
    replica: types.SimpleNamespace,
) -> None:
    """A thread whose messages carry no user_id keeps memories its API reads and deletes."""
    client = replica.client
    thread = "/v1/threads/t-anon"
    stored = client.post(f"{thread}/memories", json={"content": "likes green tea"})
    assert stored.status_code == 201, stored.text
    found = client.get(f"{thread}/memories?query=tea").json()
    # The owner the thread's turns write to when a message has no user_id.
    assert found["user_id"] == anonymous_owner("default/t-anon")
    assert [h["memory"]["content"] for h in found["memories"]] == ["likes green tea"]
    # Not a user's: a user with the thread's id has none of them.
    assert client.get("/v1/users/t-anon/memories?query=tea").json()["memories"] == []
    assert client.put(f"{thread}/core/profile", json={"value": "calm"}).status_code == 200
    assert client.get(f"{thread}/core/profile").json()["value"] == "calm"
    assert client.delete(f"{thread}/core/profile").status_code == 204
    assert client.delete(f"{thread}/memories/{stored.json()['id']}").status_code == 204
    gone = client.delete(f"{thread}/memories/{stored.json()['id']}")
    assert gone.status_code == 404 and gone.json()["error"].startswith("thread 't-anon' has no")
    bad = client.get("/v1/threads/no spaces/memories?query=tea")
    assert bad.status_code == 422 and "path.thread_id" in bad.json()["error"]


def test_a_core_block_over_the_users_maximum_is_a_409(replica: types.SimpleNamespace) -> None:
    ingress.api.state.memory.max_core_blocks = 1  # this test's own memory (the fixture's)
    core = "/v1/users/u1/core"
    assert replica.client.put(f"{core}/persona", json={"value": "calm"}).status_code == 200
    refused = replica.client.put(f"{core}/notes", json={"value": "more"})
    assert refused.status_code == 409
    assert refused.json()["error"].startswith("path.label: the user has 1 core blocks")
    assert replica.client.put(f"{core}/persona", json={"value": "warm"}).status_code == 200
    # Deleting one makes room.
    assert replica.client.delete(f"{core}/persona").status_code == 204
    assert replica.client.delete(f"{core}/persona").status_code == 404
    assert replica.client.delete(f"{core}/Bad Label").status_code == 422
    assert replica.client.put(f"{core}/notes", json={"value": "more"}).status_code == 200


def test_a_run_naming_a_webhook_outside_the_allowed_urls_is_refused(
    replica: types.SimpleNamespace,
) -> None:
    """Refused before anything is queued (this replica has no queue: reaching it is a 500)."""
    run = {"text": "book a table", "webhook_url": "http://169.254.169.254/latest/meta-data/"}
    off = replica.client.post("/v1/threads/alice/runs", json=run)
    assert off.status_code == 422
    assert off.json()["error"].startswith("body.webhook_url: webhooks are off")
    replica.instance._team = replica.instance._team.model_copy(
        update={"runs": RunsConfig(webhook_urls=["https://hooks.example.com/runs/"])}
    )
    outside = replica.client.post("/v1/threads/alice/runs", json=run)
    assert outside.status_code == 422 and "is not under any URL" in outside.json()["error"]
    long = {**run, "webhook_url": "https://hooks.example.com/runs/" + "a" * 2048}
    too_long = replica.client.post("/v1/threads/alice/runs", json=long)
    assert too_long.status_code == 422 and "body.webhook_url" in too_long.json()["error"]
    message = replica.client.post("/v1/threads/alice/messages", json=run)  # runs only
    assert message.status_code == 422 and "body.webhook_url" in message.json()["error"]


class Runs:
    """Answers whether a worker of this release took the run queue, then refuses to queue."""

    def __init__(self, takes_webhooks: bool) -> None:
        self.webhooks = takes_webhooks
        self.asked = 0

    async def takes_webhooks(self) -> bool:
        self.asked += 1
        return self.webhooks

    async def submit(self, *args: Any) -> Any:
        raise ConfigError("queued (this stand-in stores nothing)")


def test_a_webhook_waits_for_the_run_worker_of_this_release(
    replica: types.SimpleNamespace,
) -> None:
    """During the deploy that brings webhooks, the previous worker would fail them: 503."""
    instance = replica.instance
    instance._team = instance._team.model_copy(
        update={"runs": RunsConfig(webhook_urls=["https://hooks.example.com/runs/"])}
    )
    instance._runs, instance._worker_sends_webhooks = Runs(takes_webhooks=False), False
    run = {"text": "book a table", "webhook_url": "https://hooks.example.com/runs/done"}
    early = replica.client.post("/v1/threads/alice/runs", json=run)
    assert early.status_code == 503 and early.headers["retry-after"] == "5"
    assert "retry a run with a webhook_url" in early.json()["error"]
    instance._runs.webhooks = True
    for _ in range(2):  # asked once, then known
        taken = replica.client.post("/v1/threads/alice/runs", json=run)
        assert "queued (this stand-in" in taken.json()["error"]
    assert instance._runs.asked == 2


def test_a_body_of_many_mistakes_gets_an_answer_of_a_few(replica: types.SimpleNamespace) -> None:
    body = {"text": "hi", **{f"field{i}": i for i in range(5000)}}
    response = replica.client.post("/v1/threads/alice/messages", json=body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error.startswith("body.field0: Extra inputs are not permitted")
    assert error.endswith("; and 4980 more") and len(response.json()["detail"]) == 20
    assert len(response.content) < 10_000


def test_an_empty_after_is_the_first_page_of_runs(
    replica: types.SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[tuple[int, str | None]] = []

    class Runs:
        async def open_runs(self, key: ThreadKey, limit: int, after: str | None) -> list:
            asked.append((limit, after))
            return []

    state = RunsState(Runs(), "stickyray")  # type: ignore[arg-type]
    monkeypatch.setattr(ingress.api.state, "runs", state, raising=False)
    response = replica.client.get("/v1/threads/alice/runs?limit=100&after=")  # as in the README
    assert response.status_code == 200 and response.json() == {"thread_id": "alice", "runs": []}
    assert asked == [(100, None)]


def test_a_query_parameter_the_endpoint_does_not_take_is_refused_by_name(
    replica: types.SimpleNamespace,
) -> None:
    """As an unknown body field is: a misspelt ``limt`` must not quietly return everything."""
    client = replica.client
    misspelt = client.get("/v1/threads/alice/turns?limt=1")
    assert misspelt.status_code == 422
    assert misspelt.json()["error"] == (
        "query.limt: unknown parameter (this endpoint takes: after, limit)"
    )
    twice = client.get("/v1/users/bob/memories?query=tea&kind=episodic&kind=semantic")
    assert twice.status_code == 422
    assert twice.json()["error"] == "query.kind: given 2 times; it takes one value"
    none_taken = client.get("/v1/users/bob/core/persona?full=1")
    assert none_taken.json()["error"] == "query.full: unknown parameter (this endpoint takes: none)"
    assert client.get("/v1/users/bob/memories?query=tea&kind=episodic").status_code == 200
    # Nor is the parameter the server's own methods take (it was a 500).
    itself = client.get("/v1/threads/alice/turns?self=1")
    assert itself.status_code == 422 and itself.json()["error"].startswith("query.self: unknown")
    # A platform's webhook takes whatever the platform adds: not refused for it.
    verify = "hub.mode=subscribe&hub.verify_token=t&hub.challenge=1&hub.extra=x"
    answer = client.get(f"/v1/channels/whatsapp/webhook?{verify}")
    assert answer.json()["error"] == "channels are not ready"  # here: passed the check
