"""The API key (STICKYRAY_API_KEY) and the message ids reserved for channels, on the real
FastAPI app with in-process fakes behind it (no Ray)."""

from __future__ import annotations

import types

import pytest

import serve_app.ingress as ingress
from tests.unit.test_http_errors import replica  # noqa: F401 - the fixture

KEY = "sr-test-key-1"


@pytest.fixture
def keyed(
    replica: types.SimpleNamespace,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> types.SimpleNamespace:
    monkeypatch.setattr(ingress.api.state, "api_key", KEY, raising=False)
    return replica


def test_with_a_key_every_api_route_needs_it(keyed: types.SimpleNamespace) -> None:
    client = keyed.client
    for method, path, body in [
        ("GET", "/v1/threads/alice", None),
        ("GET", "/v1/threads/alice/turns", None),
        ("POST", "/v1/threads/alice/messages", {"text": "hi"}),
        ("POST", "/v1/threads/alice/runs", {"text": "hi"}),
        ("POST", "/v1/threads/alice/reset", None),
        ("GET", "/v1/agents", None),
        ("GET", "/v1/users/alice/memories", None),
        ("GET", "/v1/threads/alice/memories", None),
    ]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            response = client.request(method, path, json=body, headers=headers)
            assert response.status_code == 401, (method, path, headers)
            assert response.json()["error"].startswith("header Authorization")
            assert response.headers["www-authenticate"] == "Bearer"
    # Refused before the body is read: a bad body still gets 401, not 422.
    assert client.post("/v1/threads/alice/messages", json={"nope": 1}).status_code == 401
    broken = client.post("/v1/threads/alice/messages", content=b"{not json")
    assert broken.status_code == 401
    assert keyed.instance._directory.sent == []
    ok = client.post(
        "/v1/threads/alice/messages",
        json={"text": "hi"},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert ok.status_code == 200 and ok.json()["reply"] == "ok"
    # The scheme in any case, as HTTP allows; the key exactly.
    for scheme, key, status in (
        ("bearer", KEY, 200),
        ("BEARER", KEY, 200),
        ("Bearer", KEY.upper(), 401),
    ):
        answer = client.get("/v1/threads/alice", headers={"Authorization": f"{scheme} {key}"})
        assert answer.status_code in ((200, 404) if status == 200 else (401,)), scheme


def test_health_docs_and_webhooks_do_not_take_the_key(keyed: types.SimpleNamespace) -> None:
    client = keyed.client
    assert client.get("/openapi.json").status_code == 200
    keyed.instance._serve_checks = lambda: {"ray": "ok"}  # (no Ray in unit tests)
    assert client.get("/healthz").status_code == 200
    # A webhook authenticates the platform instead (here: no channel inbox set up at all).
    assert client.post("/v1/channels/telegram/webhook", json={}).status_code != 401


def test_health_without_the_key_says_what_is_down_not_where(
    keyed: types.SimpleNamespace,
) -> None:
    """Hosts and ports in the errors go to the log, not to whoever asks."""
    from stickyray.errors import StoreUnavailable

    class Down:
        async def ping(self) -> None:
            raise StoreUnavailable("redis", "Error 111 connecting to 10.1.2.3:6379")

    def no_controller() -> dict[str, str]:
        raise ConnectionError("GCS at 10.1.2.4:6380 unreachable")

    keyed.instance._store = Down()
    keyed.instance._serve_checks = no_controller
    answer = keyed.client.get("/healthz")
    assert answer.status_code == 503
    assert answer.json()["checks"] == {"redis": "down", "ray": "down"}
    assert "10.1.2" not in answer.text


def test_without_a_key_the_api_is_open(replica: types.SimpleNamespace) -> None:  # noqa: F811
    response = replica.client.post("/v1/threads/alice/messages", json={"text": "hi"})
    assert response.status_code == 200


def test_channel_message_ids_are_refused_on_the_api(replica: types.SimpleNamespace) -> None:  # noqa: F811
    """A chat's next message id is predictable: taken first through the API, the user's
    own message would be answered with another turn, or never."""
    client = replica.client
    for path, body in [
        ("/v1/threads/telegram:42/messages", {"text": "hi", "message_id": "telegram:42:8"}),
        ("/v1/threads/telegram:42/runs", {"text": "hi", "message_id": "telegram:42:8"}),
        ("/v1/threads/alice/reset", {"message_id": "whatsapp:abc"}),
    ]:
        response = client.post(path, json=body)
        assert response.status_code == 422, path
        assert response.json()["error"].startswith("body.message_id: Value error, ids starting")
    assert replica.instance._directory.sent == []


def test_the_key_is_checked_under_a_route_prefix(keyed: types.SimpleNamespace) -> None:
    """As Serve mounts an app at /<name>: the full path, with root_path set."""
    from fastapi.testclient import TestClient

    client = TestClient(ingress.api, root_path="/myapp", raise_server_exceptions=False)
    assert client.get("/myapp/v1/threads/alice").status_code == 401
    assert client.post("/myapp/v1/threads/alice/messages", content=b"{x").status_code == 401
    authorized = client.get("/myapp/v1/threads/alice", headers={"Authorization": f"Bearer {KEY}"})
    assert authorized.status_code == 200


def test_a_body_over_the_cap_is_refused_before_it_is_read(
    replica: types.SimpleNamespace,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ingress.api.state, "max_body_bytes", 1000, raising=False)
    client = replica.client
    text = "x" * 900
    declared = client.post("/v1/threads/alice/messages", json={"text": text + "x" * 200})
    assert declared.status_code == 413
    assert declared.json()["error"] == "body: over the limit of 1000 bytes"

    def pieces(total: int):  # streamed, with no Content-Length
        for _ in range(total // 100):
            yield b" " * 100
        yield b'{"text": "hi"}'

    json_type = {"content-type": "application/json"}
    streamed = client.post("/v1/threads/alice/messages", content=pieces(2000), headers=json_type)
    assert streamed.status_code == 413
    assert replica.instance._directory.sent == []
    ok = client.post("/v1/threads/alice/messages", content=pieces(500), headers=json_type)
    assert ok.status_code == 200, ok.text
    fits = client.post("/v1/threads/alice/messages", json={"text": text})
    assert fits.status_code == 200
    assert [m.text for m in replica.instance._directory.sent] == ["hi", text]
    # The key is checked first.
    monkeypatch.setattr(ingress.api.state, "api_key", KEY, raising=False)
    refused = client.post("/v1/threads/alice/messages", content=pieces(2000), headers=json_type)
    assert refused.status_code == 401


def test_the_cap_fits_the_longest_valid_body() -> None:
    from stickyray.config import load_config

    team = load_config(None)
    assert ingress.body_cap(team) == ingress.MAX_BODY
    data = team.model_dump()
    data["threads"]["max_message_bytes"] = 1024 * 1024
    big = type(team).model_validate(data)
    assert ingress.body_cap(big) == 6 * 1024 * 1024 + 64 * 1024
