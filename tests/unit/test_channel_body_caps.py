"""How large a webhook call each channel reads: WhatsApp's up to Meta's documented 3 MB,
Telegram's up to 1 MiB, past the API's own cap on bodies (no Ray: the real FastAPI app and a
real Redis run queue)."""

from __future__ import annotations

import json
import types
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

import serve_app.ingress as ingress
from actors.redis_store import connect_redis
from actors.run_queue import RunQueue
from serve_app.channels import ChannelInbox
from stickyray.config import RunsConfig, load_config
from tests.unit.test_channels import (
    SECRET,
    channel_settings,
    post_whatsapp,
    update,
    wa_payload,
    wa_text,
)

MiB = 1024 * 1024


@pytest.fixture
def web(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[types.SimpleNamespace]:
    """The ingress's app with the API's body cap on, as the ingress sets it."""
    with TestClient(ingress.api, raise_server_exceptions=False) as client:
        redis = connect_redis(redis_url)
        queue = RunQueue(redis, f"app-{uuid.uuid4().hex[:8]}", RunsConfig(max_queued=500))
        inbox = ChannelInbox(queue, channel_settings(redis_url), "test", max_message_bytes=16384)
        monkeypatch.setattr(ingress.api.state, "channels", inbox, raising=False)
        cap = ingress.body_cap(load_config(None))
        monkeypatch.setattr(ingress.api.state, "max_body_bytes", cap, raising=False)
        monkeypatch.setattr(ingress.api.state, "api_key", None, raising=False)
        portal = client.portal
        assert portal is not None
        yield types.SimpleNamespace(client=client, cap=cap, depth=lambda: portal.call(queue.depth))
        portal.call(redis.aclose)


def test_a_signed_whatsapp_call_of_up_to_3_mb_is_read_whole(web: Any) -> None:
    # 100 texts of 4,096 UTF-16 units (2,048 emoji), each escaped as Meta sends it (12 bytes
    # an emoji): a batch some 2.4 MiB long, past the API's cap on other bodies.
    texts = [wa_text("\N{GRINNING FACE}" * 2048, f"wamid.big{i}") for i in range(100)]
    body = wa_payload(*texts)
    assert 2 * MiB < len(json.dumps(body).encode()) < 3 * 1000 * 1000  # post_whatsapp's bytes
    response = post_whatsapp(web, body)
    assert response.status_code == 200, response.text
    assert response.json() == {"queued": 100, "duplicate": 0, "ignored": 0}
    assert web.depth() == 100
    # The API's cap still holds for the API's own routes.
    assert web.cap == MiB
    other = web.client.post(
        "/v1/threads/alice/messages",
        content=b"{" + b" " * (2 * MiB) + b"}",
        headers={"Content-Type": "application/json"},
    )
    assert other.status_code == 413


def test_a_telegram_update_over_1_mib_is_refused_unread(web: Any) -> None:
    huge = update("x" * (MiB + 10))
    response = web.client.post(
        "/v1/channels/telegram/webhook",
        json=huge,
        headers={"X-Telegram-Bot-Api-Secret-Token": SECRET},
    )
    assert response.status_code == 413 and response.json()["error"].startswith("body:")
    assert web.depth() == 0
