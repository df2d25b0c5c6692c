"""Channels: the Telegram and WhatsApp webhooks on the real FastAPI app and a real Redis run
queue (no Ray), and the sender against a stand-in platform over real HTTP."""

from __future__ import annotations

import json
import types
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

import serve_app.ingress as ingress
from actors.key import ThreadKey
from actors.redis_store import connect_redis
from actors.run_queue import RunQueue
from serve_app.channel_sender import ChannelSender, split_text
from serve_app.channels import ChannelInbox, whatsapp_signature
from stickyray.config import RunsConfig
from stickyray.errors import ChannelSendFailed
from stickyray.settings import Settings
from tests.channel_platform import PlatformServer

SECRET = "tg-secret_1"
APP_SECRET = "meta-app-secret"
VERIFY = "verify-me"


def channel_settings(redis_url: str, platform: str = "http://127.0.0.1:9") -> Settings:
    return Settings(
        REDIS_URL=redis_url,
        TELEGRAM_BOT_TOKEN="123:abc",
        TELEGRAM_WEBHOOK_SECRET=SECRET,
        TELEGRAM_API_BASE=platform,
        WHATSAPP_ACCESS_TOKEN="wa-token",
        WHATSAPP_APP_SECRET=APP_SECRET,
        WHATSAPP_VERIFY_TOKEN=VERIFY,
        WHATSAPP_API_BASE=platform,
        data_dir=Path("/nonexistent-data-dir"),
    )


def update(text: str | None, chat: int = 42, message_id: int = 7, sender: int = 9) -> dict:
    message: dict[str, Any] = {
        "message_id": message_id,
        "date": 1700000000,
        "chat": {"id": chat, "type": "private"},
        "from": {"id": sender, "is_bot": False, "first_name": "Ana"},
    }
    if text is not None:
        message["text"] = text
    else:
        message["photo"] = [{"file_id": "x", "width": 1, "height": 1}]
    return {"update_id": 1000 + message_id, "message": message}


def wa_payload(*messages: dict, number: str = "1055") -> dict:
    return {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": "biz",
                "changes": [
                    {
                        "field": "messages",
                        "value": {
                            "messaging_product": "whatsapp",
                            "metadata": {
                                "display_phone_number": "15550001",
                                "phone_number_id": number,
                            },
                            "messages": list(messages),
                            "statuses": [{"id": "wamid.s", "status": "delivered"}],
                        },
                    }
                ],
            }
        ],
    }


def wa_text(text: str, wamid: str, sender: str = "34600111222") -> dict:
    return {"from": sender, "id": wamid, "timestamp": "1", "type": "text", "text": {"body": text}}


@pytest.fixture
def web(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[types.SimpleNamespace]:
    """The ingress's FastAPI app with its channel inbox on a run queue of its own."""
    with TestClient(ingress.api, raise_server_exceptions=False) as client:
        redis = connect_redis(redis_url)
        queue = RunQueue(redis, f"app-{uuid.uuid4().hex[:8]}", RunsConfig(max_queued=5))
        inbox = ChannelInbox(queue, channel_settings(redis_url), "test", max_message_bytes=64)
        monkeypatch.setattr(ingress.api.state, "channels", inbox, raising=False)
        portal = client.portal
        assert portal is not None

        def record(thread: str, mid: str) -> Any:
            return portal.call(queue.get, ThreadKey.of(thread), mid)

        def depth() -> int:
            return portal.call(queue.depth)

        yield types.SimpleNamespace(
            client=client, queue=queue, inbox=inbox, record=record, depth=depth
        )
        portal.call(redis.aclose)


def post_telegram(web: Any, body: Any, secret: str | None = SECRET) -> Any:
    headers = {"X-Telegram-Bot-Api-Secret-Token": secret} if secret else {}
    return web.client.post("/v1/channels/telegram/webhook", json=body, headers=headers)


def post_whatsapp(web: Any, body: Any, secret: str = APP_SECRET) -> Any:
    raw = json.dumps(body).encode()
    headers = {"X-Hub-Signature-256": whatsapp_signature(raw, secret)}
    headers["Content-Type"] = "application/json"
    return web.client.post("/v1/channels/whatsapp/webhook", content=raw, headers=headers)


def test_a_telegram_text_is_queued_once_as_a_run_of_its_chat(web: Any) -> None:
    response = post_telegram(web, update("book a table for 2", chat=-1001, message_id=7))
    assert response.status_code == 200
    assert response.json() == {"queued": 1, "duplicate": 0, "ignored": 0}
    record = web.record("telegram:-1001", "telegram:-1001:7")
    assert record is not None and record.status == "queued"
    again = post_telegram(web, update("book a table for 2", chat=-1001, message_id=7))
    assert again.json() == {"queued": 0, "duplicate": 1, "ignored": 0}
    # Delivered again and read differently (say, by a newer release): the first reading
    # stands, and the platform is told it was taken.
    reread = post_telegram(web, update("book a table for 3", chat=-1001, message_id=7))
    assert reread.status_code == 200
    assert reread.json() == {"queued": 0, "duplicate": 1, "ignored": 0}
    assert web.depth() == 1


def test_telegram_refuses_a_call_without_the_secret_and_queues_nothing(web: Any) -> None:
    for secret in (None, "wrong"):
        response = post_telegram(web, update("hello"), secret=secret)
        assert response.status_code == 401
        assert "X-Telegram-Bot-Api-Secret-Token" in response.json()["error"]
    # Unauthenticated callers learn nothing about the payload's shape either.
    assert post_telegram(web, {"nonsense": 1}, secret="wrong").status_code == 401
    assert web.depth() == 0


def test_telegram_ignores_what_is_not_text_and_names_a_malformed_field(web: Any) -> None:
    photo = post_telegram(web, update(None))
    assert photo.status_code == 200 and photo.json()["ignored"] == 1
    blank = post_telegram(web, update("   ", message_id=8))
    assert blank.json()["ignored"] == 1
    too_long = post_telegram(web, update("x" * 65, message_id=9))
    assert too_long.json()["ignored"] == 1
    bad = post_telegram(web, {"update_id": 1, "message": {"message_id": 2, "chat": {}}})
    assert bad.status_code == 422
    assert "body.message.chat.id" in bad.json()["error"]
    assert web.depth() == 0
    with_words = update(None, message_id=10)
    with_words["message"]["caption"] = "is this receipt right?"
    assert post_telegram(web, with_words).json()["queued"] == 1  # read by its caption
    assert web.depth() == 1


def test_whatsapp_answers_the_verification_challenge_only_with_our_token(web: Any) -> None:
    ok = web.client.get(
        "/v1/channels/whatsapp/webhook",
        params={"hub.mode": "subscribe", "hub.verify_token": VERIFY, "hub.challenge": "1158201444"},
    )
    assert (ok.status_code, ok.text) == (200, "1158201444")
    wrong = web.client.get(
        "/v1/channels/whatsapp/webhook",
        params={"hub.mode": "subscribe", "hub.verify_token": "guess", "hub.challenge": "1"},
    )
    assert wrong.status_code == 403 and "hub.verify_token" in wrong.json()["error"]


def test_whatsapp_queues_each_text_of_a_signed_call(web: Any) -> None:
    image = {"from": "34600111222", "id": "wamid.img", "type": "image", "image": {"id": "1"}}
    tap = {"from": "34600111222", "id": "wamid.C", "type": "button", "button": {"text": "Yes"}}
    body = wa_payload(wa_text("hola", "wamid.A+/1="), image, wa_text("2 people", "wamid.B"), tap)
    response = post_whatsapp(web, body)
    assert response.status_code == 200
    assert response.json() == {"queued": 3, "duplicate": 0, "ignored": 1}
    assert web.depth() == 3
    assert post_whatsapp(web, body).json() == {"queued": 0, "duplicate": 3, "ignored": 1}
    statuses_only = post_whatsapp(web, wa_payload())
    assert statuses_only.json() == {"queued": 0, "duplicate": 0, "ignored": 0}


def test_a_whatsapp_message_in_an_unread_shape_does_not_hold_back_the_others(web: Any) -> None:
    """Meta repeats a refused call whole: the good messages in it would never be answered."""
    odd = wa_text("hola", "wamid.odd", sender="+34 600")  # not a WhatsApp id
    no_type = {"from": "34600111222", "id": "wamid.nt", "type": "interactive", "interactive": {}}
    body = wa_payload(wa_text("book a table", "wamid.good"), odd, no_type)
    response = post_whatsapp(web, body)
    assert response.status_code == 200, response.text
    assert response.json() == {"queued": 1, "duplicate": 0, "ignored": 2}
    assert web.depth() == 1


def test_a_telegram_id_no_chat_has_is_refused_naming_it(web: Any) -> None:
    """It would make a thread id over its limit: a 422, not a 500."""
    body = update("hi")
    body["message"]["chat"]["id"] = 10**130
    refused = post_telegram(web, body)
    assert refused.status_code == 422 and "body.message.chat.id" in refused.json()["error"]
    topic = update("hi", chat=-100)
    topic["message"] |= {"message_thread_id": 10**125, "is_topic_message": True}
    refused = post_telegram(web, topic)
    assert refused.status_code == 422, refused.text
    assert "body.message.message_thread_id" in refused.json()["error"]
    assert web.depth() == 0


def test_whatsapp_refuses_a_bad_signature_and_queues_nothing(web: Any) -> None:
    body = wa_payload(wa_text("hola", "wamid.X"))
    assert post_whatsapp(web, body, secret="not-the-secret").status_code == 401
    unsigned = web.client.post("/v1/channels/whatsapp/webhook", json=body)
    assert unsigned.status_code == 401
    assert "X-Hub-Signature-256" in unsigned.json()["error"]
    assert web.depth() == 0


def test_a_channel_not_set_up_says_which_variables_to_set(
    web: Any, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    bare = Settings(REDIS_URL=redis_url, data_dir=Path("/nonexistent-data-dir"))
    monkeypatch.setattr(web.inbox, "settings", bare)
    response = post_telegram(web, update("hi"))
    assert response.status_code == 404
    assert "TELEGRAM_BOT_TOKEN" in response.json()["error"]
    assert post_whatsapp(web, wa_payload()).status_code == 404


def test_a_full_queue_is_a_429_the_platform_retries(web: Any) -> None:
    for n in range(5):
        assert post_telegram(web, update(f"m{n}", message_id=n)).status_code == 200
    full = post_telegram(web, update("one more", message_id=99))
    assert full.status_code == 429 and full.headers["retry-after"]
    assert web.depth() == 5


def test_split_text_counts_as_the_platforms_do() -> None:
    emoji = "\U0001f600" * 3000  # two UTF-16 units each: 6,000 units
    pieces = split_text(emoji)
    assert [len(p) for p in pieces] == [2048, 952] and "".join(pieces) == emoji


def test_split_text_keeps_code_blocks_intact() -> None:
    prose = "This is a sentence of the answer. " * 150
    code = "".join(f"    value_{n} = compute({n})\n" for n in range(200))
    pieces = split_text(prose + "\n" + code)
    assert "".join(pieces) == prose + "\n" + code
    assert all(p.endswith(("\n", " ")) for p in pieces[:-1])  # cut at a line or a space
    assert all(p.startswith("    value_") for p in pieces[1:] if "value_" in p[:20])


def test_split_text_keeps_every_character_within_the_limit() -> None:
    text = ("word " * 30 + "\n") * 10
    pieces = split_text(text, limit=100)
    assert all(len(p) <= 100 for p in pieces) and len(pieces) > 1
    assert "".join(pieces) == text
    assert split_text("x" * 250, limit=100) == ["x" * 100, "x" * 100, "x" * 50]
    assert split_text("short") == ["short"]


@pytest.fixture
def platform() -> Iterator[PlatformServer]:
    server = PlatformServer()
    yield server
    server.close()


async def test_the_sender_calls_each_platform_api_as_documented(
    platform: PlatformServer, redis_url: str
) -> None:
    sender = ChannelSender(channel_settings(redis_url, platform.url))
    try:
        assert await sender.send({"channel": "telegram", "chat_id": -5}, "hello") is None
        sent_as = await sender.send(
            {"channel": "whatsapp", "phone_number_id": "1055", "to": "34600111222"}, "hola"
        )
        await sender.send({"channel": "telegram", "chat_id": -5, "message_thread_id": 12}, "t")
        # An answer without the message's id: sent all the same, with nothing to name it by.
        platform.refuse(200, {"messaging_product": "whatsapp", "messages": []})
        unnamed = await sender.send({"channel": "whatsapp", "phone_number_id": "1", "to": "2"}, "x")
    finally:
        await sender.aclose()
    assert sent_as == "wamid.out2"  # the id its statuses will name it by
    assert unnamed is None
    telegram, whatsapp, topic, _ = platform.calls
    assert topic.body == {"chat_id": -5, "text": "t", "message_thread_id": 12}
    assert telegram.path == "/bot123:abc/sendMessage"
    assert telegram.body == {"chat_id": -5, "text": "hello"}
    assert whatsapp.path == "/1055/messages"
    assert whatsapp.headers["authorization"] == "Bearer wa-token"
    assert whatsapp.body["to"] == "34600111222" and whatsapp.body["text"] == {"body": "hola"}


async def test_the_sender_tells_lasting_refusals_from_passing_ones(
    platform: PlatformServer, redis_url: str
) -> None:
    sender = ChannelSender(channel_settings(redis_url, platform.url))
    to = {"channel": "telegram", "chat_id": 1}
    try:
        platform.refuse(403, {"ok": False, "error_code": 403, "description": "bot was blocked"})
        with pytest.raises(ChannelSendFailed) as blocked:
            await sender.send(to, "hi")
        assert blocked.value.permanent and "bot was blocked" in str(blocked.value)
        platform.refuse(
            429, {"ok": False, "description": "Too Many", "parameters": {"retry_after": 3}}
        )
        with pytest.raises(ChannelSendFailed) as limited:
            await sender.send(to, "hi")
        assert not limited.value.permanent and limited.value.retry_after == 3.0
        platform.refuse(503, {"error": {"message": "try later", "code": 2}})
        with pytest.raises(ChannelSendFailed) as down:
            await sender.send({"channel": "whatsapp", "phone_number_id": "1", "to": "2"}, "hi")
        assert not down.value.permanent and "try later" in str(down.value)
        # Meta throttles with a 400 and a code: pair rate limit, throughput.
        for code in (131056, 130429):
            platform.refuse(400, {"error": {"message": f"(#{code}) rate limit hit", "code": code}})
            with pytest.raises(ChannelSendFailed) as throttled:
                await sender.send({"channel": "whatsapp", "phone_number_id": "1", "to": "2"}, "x")
            assert not throttled.value.permanent
        platform.refuse(400, {"error": {"message": "(#131026) undeliverable", "code": 131026}})
        with pytest.raises(ChannelSendFailed) as undeliverable:
            await sender.send({"channel": "whatsapp", "phone_number_id": "1", "to": "2"}, "x")
        assert undeliverable.value.permanent
        # A group upgraded to a supergroup: the reply goes to the id Telegram names.
        moved = {"migrate_to_chat_id": -1001234567890}
        upgraded = "Bad Request: group chat was upgraded to a supergroup chat"
        platform.refuse(400, {"ok": False, "description": upgraded, "parameters": moved})
        await sender.send({"channel": "telegram", "chat_id": -4567}, "still here")
        assert [c.body["chat_id"] for c in platform.calls[-2:]] == [-4567, -1001234567890]
        # A platform that quotes the token back: the error (logged, stored) does not.
        platform.refuse(401, {"ok": False, "description": "token 123:abc is not valid"})
        with pytest.raises(ChannelSendFailed) as bad_token:
            await sender.send(to, "hi")
        assert "123:abc" not in str(bad_token.value) and "***" in str(bad_token.value)
    finally:
        await sender.aclose()
    gone = ChannelSender(channel_settings(redis_url, "http://127.0.0.1:9"))  # nothing listens
    try:
        with pytest.raises(ChannelSendFailed) as refused:
            await gone.send(to, "hi")
        assert not refused.value.permanent
    finally:
        await gone.aclose()


def test_a_half_set_up_channel_is_refused_at_start() -> None:
    from stickyray.errors import ConfigError
    from stickyray.settings import load_settings

    def refused(**env: str) -> str:
        with pytest.MonkeyPatch.context() as patch:
            for name in ("TELEGRAM_BOT_TOKEN", "TELEGRAM_WEBHOOK_SECRET", "WHATSAPP_ACCESS_TOKEN"):
                patch.delenv(name, raising=False)
            for name, value in env.items():
                patch.setenv(name, value)
            with pytest.raises(ConfigError) as error:
                load_settings()
        return str(error.value)

    error = refused(TELEGRAM_BOT_TOKEN="123:secret-token-value")
    assert "TELEGRAM_WEBHOOK_SECRET must be too" in error and "secret-token-value" not in error
    # The other way round: the platform's check would pass, then every message fail.
    assert "TELEGRAM_BOT_TOKEN must be too" in refused(TELEGRAM_WEBHOOK_SECRET="abc")
    assert "WHATSAPP_ACCESS_TOKEN" in refused(WHATSAPP_VERIFY_TOKEN="v", WHATSAPP_APP_SECRET="s")
    # A secret mounted from a file with its newline would end up quoted in an HTTP error.
    newline = refused(TELEGRAM_BOT_TOKEN="123:tok\n", TELEGRAM_WEBHOOK_SECRET="abc")
    assert "TELEGRAM_BOT_TOKEN: must be printable ASCII" in newline and "123:tok" not in newline
    # A URL's password is masked.
    url = refused(REDIS_URL="http://default:hunter2@redis.internal:6379")
    assert "hunter2" not in url and "http://***@redis.internal:6379" in url
    schemeless = refused(REDIS_URL="default:hunter2@redis.internal:6379")
    assert "hunter2" not in schemeless and "***@redis.internal:6379" in schemeless
    assert "TELEGRAM_API_BASE: must start with http" in refused(TELEGRAM_API_BASE="localhost:8081")


def test_a_chunked_body_is_cut_off_once_too_large(web: Any) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(64):  # 4 MiB in all, with no Content-Length
            yield b" " * 65536

    response = web.client.post("/v1/channels/whatsapp/webhook", content=chunks())
    assert response.status_code == 413
    assert web.depth() == 0


def test_a_body_larger_than_any_platform_sends_is_refused_unread(web: Any) -> None:
    huge = b"{" + b" " * (3 * 1024 * 1024 + 10) + b"}"  # past WhatsApp's 3 MB
    response = web.client.post(
        "/v1/channels/whatsapp/webhook",
        content=huge,
        headers={"X-Hub-Signature-256": whatsapp_signature(huge, APP_SECRET)},
    )
    assert response.status_code == 413 and response.json()["error"].startswith("body:")
    assert web.depth() == 0
