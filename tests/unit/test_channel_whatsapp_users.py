"""WhatsApp users Meta names by their business-scoped user id (BSUID) alone: a user who
adopted a username and did not share their phone number arrives with ``from_user_id`` and
no ``from``, and is answered at ``recipient`` (no Ray: the real FastAPI app and a real Redis
run queue, and the sender against a stand-in Cloud API)."""

from __future__ import annotations

import hashlib
from typing import Any

from actors.key import ThreadKey
from serve_app.channel_sender import ChannelSender
from serve_app.channel_whatsapp import WhatsAppPayload, failed_replies, whatsapp_messages
from tests.channel_platform import PlatformServer
from tests.unit.test_channels import (
    channel_settings,
    platform,  # noqa: F401 - the fixture
    post_whatsapp,
    wa_payload,
    wa_text,
    web,  # noqa: F401 - the fixture
)

BSUID = "US.13491208655302741918"


def from_bsuid(text: str, wamid: str, bsuid: str = BSUID) -> dict[str, Any]:
    """A message as Meta sends one from a user it names only by their BSUID."""
    message = wa_text(text, wamid)
    del message["from"]
    return {**message, "from_user_id": bsuid}


def read(*messages: dict[str, Any]) -> list[Any]:
    return whatsapp_messages(WhatsAppPayload.model_validate(wa_payload(*messages)))


def test_a_user_known_only_by_their_bsuid_is_a_thread_answered_at_it() -> None:
    (found,) = read(from_bsuid("I need to change my booking", "wamid.u1"))
    assert found.key == ThreadKey.of(f"whatsapp:1055:{BSUID}")
    assert found.message.user_id == f"whatsapp:{BSUID}"
    assert found.message.text == "I need to change my booking"
    # The Cloud API takes a BSUID in "recipient", a phone number in "to".
    assert found.reply_to == {"channel": "whatsapp", "phone_number_id": "1055", "recipient": BSUID}


def test_a_phone_number_given_too_still_names_the_thread() -> None:
    (found,) = read({**wa_text("hi", "wamid.u2"), "from_user_id": BSUID})
    assert found.key == ThreadKey.of("whatsapp:1055:34600111222")
    assert found.reply_to == {"channel": "whatsapp", "phone_number_id": "1055", "to": "34600111222"}


def test_a_bsuid_too_long_for_an_id_is_named_by_a_stable_hash() -> None:
    longest = "US.ENT." + "7" * 128  # a parent BSUID of 128 digits
    first, again = read(from_bsuid("a", "wamid.u3", longest), from_bsuid("b", "wamid.u4", longest))
    assert first.key == again.key and first.message.user_id == again.message.user_id
    thread_id = first.key.thread_id
    assert thread_id.startswith("whatsapp:1055:bsuid-") and len(thread_id) <= 128
    assert longest not in thread_id
    assert first.reply_to["recipient"] == longest  # the reply goes to the BSUID itself
    (other,) = read(from_bsuid("c", "wamid.u5", longest[:-1] + "8"))
    assert other.key != first.key


def test_a_message_from_no_one_it_can_name_is_ignored(web: Any) -> None:  # noqa: F811
    nobody = wa_text("hi", "wamid.u6")
    del nobody["from"]
    odd = from_bsuid("hi", "wamid.u7", "US/1349")
    response = post_whatsapp(web, wa_payload(nobody, odd, from_bsuid("hello", "wamid.u8")))
    assert response.status_code == 200
    assert response.json() == {"queued": 1, "duplicate": 0, "ignored": 2}


def test_the_webhook_queues_a_message_from_a_bsuid(web: Any) -> None:  # noqa: F811
    response = post_whatsapp(web, wa_payload(from_bsuid("Hi, I need help", "wamid.u9")))
    assert response.status_code == 200
    assert response.json() == {"queued": 1, "duplicate": 0, "ignored": 0}
    run = "whatsapp:" + hashlib.sha256(b"wamid.u9").hexdigest()[:40]
    record = web.record(f"whatsapp:1055:{BSUID}", run)
    assert record is not None and record.status == "queued"


async def test_the_sender_sends_to_a_bsuid_in_recipient(
    platform: PlatformServer,  # noqa: F811
    redis_url: str,
) -> None:
    sender = ChannelSender(channel_settings(redis_url, platform.url))
    try:
        to = {"channel": "whatsapp", "phone_number_id": "1055", "recipient": BSUID}
        assert await sender.send(to, "hola") == "wamid.out1"
    finally:
        await sender.aclose()
    (call,) = platform.calls
    assert call.path == "/1055/messages"
    assert call.body["recipient"] == BSUID and "to" not in call.body
    assert call.body["text"] == {"body": "hola"}


def test_a_failed_reply_to_a_bsuid_names_it() -> None:
    payload = wa_payload()
    payload["entry"][0]["changes"][0]["value"]["statuses"] = [
        {"id": "wamid.out1", "status": "failed", "recipient_user_id": BSUID, "errors": []}
    ]
    (failed,) = failed_replies(WhatsAppPayload.model_validate(payload))
    assert failed.recipient == BSUID and failed.platform_id == "wamid.out1"
