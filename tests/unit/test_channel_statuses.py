"""WhatsApp's statuses: a reply Meta accepted and then failed to deliver is reported later in
the webhook; it is logged, counted as a failed reply, and noted on its run (the webhook on
the real FastAPI app and a real Redis run queue, no Ray)."""

from __future__ import annotations

import logging
from typing import Any

import pytest

import serve_app.channels as channels
from actors.key import ThreadKey
from stickyray.errors import StoreUnavailable
from tests.unit.test_channel_replies import WhatsApp, answers_at_length, reply_is, whatsapp
from tests.unit.test_channels import post_whatsapp, wa_payload, wa_text, web  # noqa: F401
from tests.unit.test_runs import Running, dispatcher, msg, until


def status(state: str, recipient: str = "34600111222", **more: Any) -> dict:
    return {
        "id": f"wamid.{state}",
        "status": state,
        "timestamp": "1700000000",
        "recipient_id": recipient,
        **more,
    }


def with_statuses(*statuses: Any, messages: tuple[dict, ...] = ()) -> dict:
    body = wa_payload(*messages)
    body["entry"][0]["changes"][0]["value"]["statuses"] = list(statuses)
    return body


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, str]]:
    """The replies the webhook counts (app, channel, status)."""
    calls: list[tuple[str, str, str]] = []
    monkeypatch.setattr(channels, "record_reply", lambda *tags: calls.append(tags))
    return calls


def test_a_reply_that_failed_after_it_was_sent_is_logged_and_counted(
    web: Any,  # noqa: F811
    counted: list[tuple[str, str, str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    outside_window = status("failed", errors=[{"code": 131047, "title": "Re-engagement message"}])
    undeliverable = status(
        "failed", "447700900123", errors=[{"code": 131026, "title": "Message undeliverable"}]
    )
    body = with_statuses(
        status("sent"),
        outside_window,
        status("delivered"),
        undeliverable,
        status("read"),
        messages=(wa_text("hola", "wamid.in"),),
    )
    with caplog.at_level(logging.WARNING, logger=channels.__name__):
        response = post_whatsapp(web, body)
    assert response.status_code == 200, response.text
    # The statuses are not messages: the message of the same call is queued as ever.
    assert response.json() == {"queued": 1, "duplicate": 0, "ignored": 0}
    assert counted == [("test", "whatsapp", "failed")] * 2
    assert [r.getMessage() for r in caplog.records] == [
        "whatsapp reply to 34600111222 failed after Meta accepted it: 131047 Re-engagement message",
        "whatsapp reply to 447700900123 failed after Meta accepted it: "
        "131026 Message undeliverable",
    ]


def test_statuses_of_delivered_replies_are_neither_logged_nor_counted(
    web: Any,  # noqa: F811
    counted: list[tuple[str, str, str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    body = with_statuses(status("sent"), status("delivered"), status("read"))
    with caplog.at_level(logging.INFO, logger=channels.__name__):
        response = post_whatsapp(web, body)
    assert response.json() == {"queued": 0, "duplicate": 0, "ignored": 0}
    assert counted == [] and caplog.records == []


def test_a_failed_status_in_an_odd_shape_is_still_counted(
    web: Any,  # noqa: F811
    counted: list[tuple[str, str, str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Meta's status fields change over time: a failure is counted with what can be read."""
    bare = {"id": "wamid.x", "status": "failed"}  # no recipient, no errors
    untitled = status("failed", errors=[{"code": 131049}, {"title": "Spam rate limit hit"}])
    odd = status("failed", errors="131026")
    body = with_statuses(bare, untitled, odd, "not a status")
    with caplog.at_level(logging.WARNING, logger=channels.__name__):
        response = post_whatsapp(web, body)
    assert response.status_code == 200, response.text
    assert counted == [("test", "whatsapp", "failed")] * 3
    assert [r.getMessage() for r in caplog.records] == [
        "whatsapp reply to unknown recipient failed after Meta accepted it: no error given",
        "whatsapp reply to 34600111222 failed after Meta accepted it: 131049; Spam rate limit hit",
        "whatsapp reply to unknown recipient failed after Meta accepted it: "
        "errors: Input should be a valid list",
    ]


def test_a_failed_status_in_a_call_refused_is_counted_once_meta_sends_it_again(
    web: Any,  # noqa: F811
    counted: list[tuple[str, str, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Refused (Redis down), Meta sends the whole call again: the failure counts once."""
    failed = status("failed", errors=[{"code": 131047, "title": "Re-engagement message"}])
    body = with_statuses(failed, messages=(wa_text("hola", "wamid.in"),))
    queue = channels.ChannelInbox.queue

    async def redis_down(self: Any, *args: Any, **kwargs: Any) -> dict[str, int]:
        raise StoreUnavailable("redis", "down")

    monkeypatch.setattr(channels.ChannelInbox, "queue", redis_down)
    assert post_whatsapp(web, body).status_code == 503
    assert counted == []
    monkeypatch.setattr(channels.ChannelInbox, "queue", queue)
    assert post_whatsapp(web, body).status_code == 200
    assert counted == [("test", "whatsapp", "failed")]


def test_a_failed_status_is_noted_on_the_run_whose_reply_it_was(
    web: Any,  # noqa: F811
    counted: list[tuple[str, str, str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Meta names the reply by the wamid it answered the send with: the run that reply was
    of says it failed, and why; a status of a message sent by something else changes none."""
    key = ThreadKey.of("whatsapp:1055:34600111222")
    channel = WhatsApp()

    async def answer() -> None:
        await web.queue.submit(key, msg("book a table", "wamid.in1"), whatsapp())
        worker = Running(dispatcher(web.queue, answers_at_length, send_reply=channel))
        try:
            await until(lambda: reply_is(web.queue, key, "wamid.in1", "sent"))
        finally:
            await worker.stop()

    web.client.portal.call(answer)
    outside_window = status("failed", errors=[{"code": 131047, "title": "Re-engagement message"}])
    body = with_statuses(outside_window | {"id": "wamid.out2"}, status("failed"))
    with caplog.at_level(logging.WARNING, logger=channels.__name__):
        assert post_whatsapp(web, body).status_code == 200
    record = web.record(key.thread_id, "wamid.in1")
    assert (record.reply, record.reply_error) == (
        "failed",
        "not delivered: 131047 Re-engagement message",
    )
    assert counted == [("test", "whatsapp", "failed")] * 2
    assert [r.getMessage() for r in caplog.records] == [
        f"whatsapp reply to 34600111222 (run {key}/wamid.in1) failed after Meta accepted it: "
        "131047 Re-engagement message",
        "whatsapp reply to 34600111222 failed after Meta accepted it: no error given",
    ]
