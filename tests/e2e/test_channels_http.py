"""Channels end to end: a Telegram or WhatsApp webhook in, the reply out to the platform's API.

Real Ray, Serve and Redis; the agents are the openai SDK against the fake LLM server, and the
platforms are a stand-in HTTP server on 127.0.0.1 that records what it is sent.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from standardwebhooks.webhooks import Webhook

from serve_app.channels import whatsapp_signature
from stickyray.chat import run_chat
from stickyray.metrics import metrics_url
from stickyray.settings import Settings
from stickyray.testing import FakeLLMServer
from tests.channel_platform import PlatformServer
from tests.e2e.conftest import App, new_thread, wait_for
from tests.e2e.teams import openai_team
from tests.e2e.test_metrics import scrape
from tests.e2e.test_runs_http import script
from tests.unit.test_channels import wa_payload, wa_text

pytestmark = pytest.mark.ray

SECRET = "tg-webhook-secret"
APP_SECRET = "meta-app-secret"
API_KEY = "sr-e2e-key"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"e2e-webhook-signing-key-32-bytes").decode()


def api(app: App) -> httpx.Client:
    """A client of the app's API, with its key (the webhooks need none)."""
    return httpx.Client(
        base_url=app.url, timeout=60, headers={"Authorization": f"Bearer {API_KEY}"}
    )


@pytest.fixture(scope="module")
def platform() -> Iterator[PlatformServer]:
    server = PlatformServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def settings(settings: Settings, platform: PlatformServer) -> Settings:
    """The session's settings, with both channels pointed at the stand-in platform."""
    return settings.model_copy(
        update={
            "telegram_bot_token": SecretStr("777:bot-token"),
            "telegram_webhook_secret": SecretStr(SECRET),
            "telegram_api_base": platform.url,
            "whatsapp_access_token": SecretStr("wa-token"),
            "whatsapp_app_secret": SecretStr(APP_SECRET),
            "whatsapp_verify_token": SecretStr("verify-me"),
            "whatsapp_api_base": platform.url,
            "telegram_bot_username": "ShopBot",
            "api_key": SecretStr(API_KEY),
            "webhook_secret": SecretStr(WEBHOOK_SECRET),
        }
    )


@pytest.fixture(scope="module")
def app(deploy: Any, platform: PlatformServer) -> App:
    config = openai_team()
    config["runs"] = {"webhook_urls": [f"{platform.url}/hooks/"]}
    return deploy(config)


def telegram(app: App, chat: int, message_id: int, text: str, secret: str = SECRET) -> Any:
    update = {
        "update_id": message_id,
        "message": {
            "message_id": message_id,
            "date": 1700000000,
            "chat": {"id": chat, "type": "private"},
            "from": {"id": chat, "is_bot": False, "first_name": "Ana"},
            "text": text,
        },
    }
    with app.client() as client:
        return client.post(
            "/v1/channels/telegram/webhook",
            json=update,
            headers={"X-Telegram-Bot-Api-Secret-Token": secret},
        )


def sent_to(platform: PlatformServer, path: str, n: int) -> list[Any]:
    """Wait until ``path`` got ``n`` calls; their bodies."""

    def arrived() -> bool:
        return len([c for c in platform.calls if c.path == path]) >= n

    wait_for(arrived, timeout=60, what=f"{n} calls to {path}")
    return [c for c in platform.calls if c.path == path]


def test_a_telegram_chat_is_answered_in_the_chat_and_stays_with_its_specialist(
    app: App, fake_llm: FakeLLMServer, platform: PlatformServer
) -> None:
    script(fake_llm)
    chat, path = 5501, "/bot777:bot-token/sendMessage"
    first = telegram(app, chat, 1, "I want to book a table")
    assert first.status_code == 200 and first.json()["queued"] == 1
    calls = sent_to(platform, path, 1)
    assert calls[-1].body == {"chat_id": chat, "text": "bookings says: I want to book a table"}

    assert telegram(app, chat, 2, "for 2 people").json()["queued"] == 1
    assert telegram(app, chat, 2, "for 2 people").json()["duplicate"] == 1  # a repeated call
    calls = sent_to(platform, path, 2)
    assert calls[-1].body["text"] == "bookings says: for 2 people"
    # The follow-up went straight to the specialist: one supervisor call in all.
    assert fake_llm.count(agent="triage") == 1 and fake_llm.count(agent="bookings") == 2

    # A group-style command is a command of the thread, answered in the chat too.
    telegram(app, chat, 3, "/supervisor@ShopBot")
    calls = sent_to(platform, path, 3)
    assert "supervisor" in calls[-1].body["text"].lower()
    with app.client() as client:  # without the key: a chat's history stays private
        assert client.get(f"/v1/threads/telegram:{chat}").status_code == 401
    with api(app) as client:
        thread = client.get(f"/v1/threads/telegram:{chat}").json()
        assert thread["active_agent"] is None and thread["turns"] == 2
        record = client.get(f"/v1/threads/telegram:{chat}/runs/telegram:{chat}:2").json()
        assert record["status"] == "completed" and record["reply"] == "sent"
    assert len([c for c in platform.calls if c.path == path]) == 3  # nothing sent twice

    refused = telegram(app, chat, 4, "book again", secret="guessed")
    assert refused.status_code == 401


def test_a_whatsapp_message_is_verified_queued_and_answered(
    app: App, fake_llm: FakeLLMServer, platform: PlatformServer
) -> None:
    script(fake_llm)
    with app.client() as client:
        check = client.get(
            "/v1/channels/whatsapp/webhook",
            params={
                "hub.mode": "subscribe",
                "hub.verify_token": "verify-me",
                "hub.challenge": "42",
            },
        )
        assert (check.status_code, check.text) == (200, "42")
        payload = wa_payload(wa_text("can I book a room?", "wamid.HBgL+/A=="))
        raw = json.dumps(payload).encode()
        forged = client.post(
            "/v1/channels/whatsapp/webhook",
            content=raw,
            headers={"X-Hub-Signature-256": whatsapp_signature(raw, "wrong")},
        )
        assert forged.status_code == 401
        signed = client.post(
            "/v1/channels/whatsapp/webhook",
            content=raw,
            headers={
                "X-Hub-Signature-256": whatsapp_signature(raw, APP_SECRET),
                "Content-Type": "application/json",
            },
        )
        assert signed.status_code == 200 and signed.json()["queued"] == 1
    calls = sent_to(platform, "/1055/messages", 1)
    assert len(calls) == 1  # the forged call queued nothing
    assert calls[0].headers["authorization"] == "Bearer wa-token"
    assert calls[0].body["to"] == "34600111222"
    assert calls[0].body["text"] == {"body": "bookings says: can I book a room?"}
    with api(app) as client:
        thread = client.get("/v1/threads/whatsapp:1055:34600111222").json()
        assert thread["active_agent"] == "bookings"


def test_a_run_with_a_webhook_url_is_posted_there_signed_once_it_finishes(
    app: App, fake_llm: FakeLLMServer, platform: PlatformServer
) -> None:
    script(fake_llm)
    thread, path = new_thread(), "/hooks/runs?token=t1"
    run = {"text": "I want to book a table", "message_id": "w1"}
    with api(app) as client:
        outside = client.post(
            f"/v1/threads/{thread}/runs",
            json={**run, "webhook_url": "http://169.254.169.254/latest/meta-data/"},
        )
        assert outside.status_code == 422 and "body.webhook_url" in outside.json()["error"]
        queued = client.post(
            f"/v1/threads/{thread}/runs", json={**run, "webhook_url": f"{platform.url}{path}"}
        )
        assert queued.status_code == 202, queued.text  # the refused one queued nothing
        (call,) = sent_to(platform, path, 1)
        event = Webhook(WEBHOOK_SECRET).verify(call.raw, call.headers)
        assert event["type"] == "run.finished"
        assert event["data"]["result"]["reply"] == "bookings says: I want to book a table"

        def noted() -> bool:
            return client.get(f"/v1/threads/{thread}/runs/w1").json()["reply"] == "sent"

        wait_for(noted, timeout=30, what="the webhook's delivery noted on the run")
        record = client.get(f"/v1/threads/{thread}/runs/w1").json()
    del record["reply"], record["reply_error"]
    assert event["data"] == record and record["status"] == "completed"
    assert len(sent_to(platform, path, 1)) == 1


def test_channel_messages_and_replies_are_counted(app: App) -> None:
    """After the tests above: what each webhook took and what went back."""
    url = metrics_url()
    assert url is not None
    wanted = {
        (
            "ray_stickyray_channel_messages_total",
            (("channel", "telegram"), ("outcome", "queued")),
        ): 3.0,
        (
            "ray_stickyray_channel_messages_total",
            (("channel", "telegram"), ("outcome", "duplicate")),
        ): 1.0,
        (
            "ray_stickyray_channel_messages_total",
            (("channel", "whatsapp"), ("outcome", "queued")),
        ): 1.0,
        ("ray_stickyray_channel_replies_total", (("channel", "telegram"), ("status", "sent"))): 3.0,
        ("ray_stickyray_channel_replies_total", (("channel", "whatsapp"), ("status", "sent"))): 1.0,
        ("ray_stickyray_channel_replies_total", (("channel", "webhook"), ("status", "sent"))): 1.0,
    }
    found: dict = {}

    def exported() -> bool:
        totals, _ = scrape(url, app.name)
        found.clear()
        found.update({k: v for k, v in totals.items() if "channel" in k[0]})
        return found == wanted

    wait_for(exported, timeout=60, what=f"channel metrics {wanted} (last seen {found})")


def test_the_terminal_chat_sends_the_api_key(
    app: App, fake_llm: FakeLLMServer, capsys: pytest.CaptureFixture[str]
) -> None:
    script(fake_llm)
    assert (
        run_chat(app.url, "chat-keyed", stdin=io.StringIO("book a table\n"), api_key=API_KEY) == 0
    )
    out, err = capsys.readouterr()
    assert "[bookings] bookings says: book a table" in out and "error" not in err
    run_chat(app.url, "chat-unkeyed", stdin=io.StringIO("book a table\n"))
    assert "error 401" in capsys.readouterr().err
