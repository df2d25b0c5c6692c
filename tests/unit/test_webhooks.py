"""Run webhooks: which URLs a run may name, the signed POST, and its delivery from the run
queue's outbox, on a real Redis and a real HTTP receiver on 127.0.0.1 (no Ray). The e2e
tests add Ray, Serve and the HTTP API."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import json
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

import serve_app.run_outbox
from actors.key import ThreadKey
from actors.run_queue import RunQueue
from actors.run_records import OutboundReply
from serve_app.webhooks import WebhookSender
from stickyray.config import RunsConfig, load_config, parse_config
from stickyray.errors import ChannelSendFailed, ConfigError
from stickyray.settings import Settings
from stickyray.turns import InboundMessage, TurnResult
from stickyray.webhooks import check_webhooks, url_refusal, webhook_id
from tests.channel_platform import Call, PlatformServer
from tests.unit.test_channel_replies import Channel, reply_is, telegram
from tests.unit.test_runs import (
    Running,
    Threads,
    client,  # noqa: F401 - the fixture
    dispatcher,
    fresh,
    msg,
    queue_of,
    status_is,
    until,
)
from tests.unit.test_thread import booking_agents

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
ALLOWED = ["https://hooks.example.com/stickyray/", "http://127.0.0.1:9000"]


@pytest.fixture(scope="module")
def receiver() -> Iterator[PlatformServer]:
    server = PlatformServer()
    yield server
    server.close()


def prefixes(*urls: str) -> list[str]:
    return RunsConfig(webhook_urls=list(urls)).webhook_urls


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.example.com/stickyray",
        "https://hooks.example.com/stickyray/runs?token=abc",
        "https://HOOKS.example.com:443/stickyray/x",
        "http://127.0.0.1:9000/anything",
        "https://hooks.example.com/stickyray/caf%C3%A9/%20x",  # escapes of valid UTF-8
    ],
)
def test_a_url_under_an_allowed_prefix_may_be_called(url: str) -> None:
    assert url_refusal(url, prefixes(*ALLOWED)) is None


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("https://hooks.example.com/stickyray-admin", "not under"),  # not a path segment
        ("https://hooks.example.com/stickyray/../admin", "not under"),  # dot segments
        ("https://hooks.example.com/stickyray/%2e%2e/admin", "encoded dots"),
        ("https://hooks.example.com/stickyray/..%2fadmin", "encoded dots"),
        ("https://hooks.example.com/stickyray/..;/admin", "nor ';'"),  # Tomcat's "/../"
        ("https://hooks.example.com/stickyray/%252e%252e/admin", "percent signs"),
        ("https://hooks.example.com/stickyray/a%00", "NULs"),
        ("https://hooks.example.com/stickyray/%c0%ae%c0%ae/admin", "overlong"),
        ("https://hooks.example.com/stickyray/%u002e%u002e/admin", "overlong"),
        # Decoded twice, "%2%65" is "%2e", then ".": a '%' must start an escape.
        ("https://hooks.example.com/stickyray/%2%65%2%65/admin", "starts no escape"),
        ("https://hooks.example.com/stickyray/%%32%65%%32%65/admin", "starts no escape"),
        ("https://hooks.example.com/stickyray/a%", "starts no escape"),
        # Overlong UTF-8 of any length is no UTF-8 at all.
        ("https://hooks.example.com/stickyray/%e0%80%ae%e0%80%ae/admin", "not UTF-8"),
        ("https://hooks.example.com/stickyray/..%e0%80%afadmin", "not UTF-8"),
        ("https://hooks.example.com/stickyray/%f0%80%80%ae%f0%80%80%ae/admin", "not UTF-8"),
        ("https://hooks.example.com/stickyray/x#", "fragment"),  # even an empty one
        ("https://hooks.example.com.evil.net/stickyray/", "not under"),
        ("http://hooks.example.com/stickyray/", "not under"),  # another scheme
        ("https://hooks.example.com:8443/stickyray/", "not under"),  # another port
        ("http://127.0.0.1:9001/x", "not under"),
        ("http://169.254.169.254/latest/meta-data/", "not under"),
        ("https://user:pw@hooks.example.com/stickyray/", "credentials"),
        ("file:///etc/passwd", "http:// or https://"),
        ("stickyray/runs", "http:// or https://"),
        ("https://hooks.example.com/stickyray/#x", "fragment"),
        ("https://hooks.example.com/stickyray/" + "a" * 2048, "over 2048"),
    ],
)
def test_any_other_url_is_refused_saying_why(url: str, why: str) -> None:
    refusal = url_refusal(url, prefixes(*ALLOWED))
    assert refusal is not None and why in refusal


def test_without_allowed_urls_webhooks_are_off() -> None:
    refusal = url_refusal("https://hooks.example.com/stickyray/", [])
    assert refusal is not None and "runs.webhook_urls" in refusal


def test_allowed_urls_are_checked_when_the_config_loads(tmp_path: Path) -> None:
    assert prefixes("https://Hooks.example.com/a/", "http://127.0.0.1:9000") == [
        "https://hooks.example.com/a",
        "http://127.0.0.1:9000/",
    ]
    # Kept as written (percent-encoded), and compared so.
    assert prefixes("https://hooks.example.com/a%3Fb/") == ["https://hooks.example.com/a%3Fb"]
    assert (
        url_refusal(
            "https://hooks.example.com/a%3Fb/c?d=1", prefixes("https://hooks.example.com/a%3Fb/")
        )
        is None
    )
    config = load_config(None).model_dump(mode="json", exclude_none=True)
    config["runs"] = {"webhook_urls": ["https://hooks.example.com/a?token=1"]}
    with pytest.raises(ConfigError, match=r"runs\.webhook_urls.*query"):
        parse_config(config, source=tmp_path / "agents.yaml")


def test_the_signing_secret_is_checked_and_required_with_allowed_urls() -> None:
    for bad in ("not-a-secret", "whsec_" + base64.b64encode(b"short").decode(), "whsec_!!"):
        with pytest.raises(ValueError, match="whsec_"):
            Settings(STICKYRAY_WEBHOOK_SECRET=bad)
    team = load_config(None).model_copy(
        update={"runs": RunsConfig(webhook_urls=["https://hooks.example.com/"])}
    )
    with pytest.raises(ConfigError, match="STICKYRAY_WEBHOOK_SECRET"):
        check_webhooks(team, Settings())
    check_webhooks(team, Settings(STICKYRAY_WEBHOOK_SECRET=SecretStr(SECRET)))
    check_webhooks(load_config(None), Settings())  # no webhooks, no secret needed


def verified(call: Call) -> Any:
    """The body of a webhook call, once its Standard Webhooks signature checks out."""
    return Webhook(SECRET).verify(call.raw, call.headers)


async def test_a_delivery_is_signed_and_verifiable(receiver: PlatformServer) -> None:
    sender = WebhookSender(SECRET, prefixes(receiver.url))
    before = len(receiver.calls)
    try:
        await sender.send(f"{receiver.url}/hooks/runs", "msg_1", b'{"type": "run.finished"}')
    finally:
        await sender.aclose()
    call = receiver.calls[before]
    assert call.path == "/hooks/runs" and call.headers["webhook-id"] == "msg_1"
    assert verified(call) == {"type": "run.finished"}
    with pytest.raises(WebhookVerificationError):  # another secret: a forgery
        Webhook("whsec_" + base64.b64encode(b"x" * 32).decode()).verify(call.raw, call.headers)


async def test_refusals_say_whether_sending_again_can_help(receiver: PlatformServer) -> None:
    sender = WebhookSender(SECRET, prefixes(receiver.url))
    url = f"{receiver.url}/hooks/runs"
    try:
        cases = [
            (503, {}, False, "HTTP 503", None),
            (429, {"retry-after": "7"}, False, "HTTP 429", 7.0),
            (404, {}, True, "HTTP 404", None),
            (302, {"location": f"{receiver.url}/elsewhere"}, True, "redirects are not", None),
        ]
        for status, headers, permanent, reason, retry_after in cases:
            receiver.refuse(status, {"error": "no"}, headers=headers)
            with pytest.raises(ChannelSendFailed) as failed:
                await sender.send(url, "msg_2", b"{}")
            assert failed.value.permanent is permanent and reason in failed.value.reason
            assert failed.value.channel == "webhook"
            assert failed.value.retry_after == retry_after
        assert not [c for c in receiver.calls if c.path == "/elsewhere"]  # never followed
    finally:
        await sender.aclose()

    # A URL no longer allowed (the list changed since the run was queued), or no secret.
    for sender in (
        WebhookSender(SECRET, prefixes("https://other.example/")),
        WebhookSender(None, []),
    ):
        with pytest.raises(ChannelSendFailed) as failed:
            await sender.send(url, "msg_4", b"{}")
        assert failed.value.permanent
        await sender.aclose()


async def test_a_receiver_that_answers_slowly_is_given_up_for_now() -> None:
    """Every read gets a byte in time, the whole answer never comes: the call's own timeout
    ends it (transient), so a slow receiver does not hold a sending slot."""

    async def dribble(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            for byte in b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n":
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.3)

    server = await asyncio.start_server(dribble, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hooks"
    sender = WebhookSender(SECRET, prefixes(url), timeout_s=1.0)
    try:
        with pytest.raises(ChannelSendFailed) as failed:
            await sender.send(url, "msg_5", b"{}")
    finally:
        await sender.aclose()
        server.close()
    assert not failed.value.permanent and "no answer within 1 s" in failed.value.reason


async def test_a_taken_call_whose_answer_cannot_be_read_is_taken(receiver: PlatformServer) -> None:
    """A 2xx is the receiver's word, whatever its body: sending again would repeat it."""
    sender = WebhookSender(SECRET, prefixes(receiver.url))
    receiver.refuse(200, {"ok": True}, headers={"content-encoding": "gzip"})  # not gzip
    try:
        await sender.send(f"{receiver.url}/hooks/gzip", "msg_6", b"{}")
        # An HTTP date in Retry-After counts too (a 503 during maintenance, say).
        receiver.refuse(
            503, {}, headers={"retry-after": email.utils.formatdate(time.time() + 120, usegmt=True)}
        )
        with pytest.raises(ChannelSendFailed) as failed:
            await sender.send(f"{receiver.url}/hooks/date", "msg_7", b"{}")
    finally:
        await sender.aclose()
    assert failed.value.retry_after is not None and 100 < failed.value.retry_after <= 120


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def webhook(receiver: PlatformServer, key: ThreadKey, path: str = "/hooks") -> dict[str, Any]:
    """The reply address of a run whose outcome goes to ``receiver``'s ``path``."""
    return {"channel": "webhook", "url": f"{receiver.url}{path}", "thread": str(key)}


def calls_to(receiver: PlatformServer, path: str) -> list[Call]:
    return [c for c in receiver.calls if c.path == path]


async def test_a_finished_run_is_posted_to_its_webhook_once_as_its_record(
    client: Any,  # noqa: F811
    receiver: PlatformServer,
) -> None:
    queue = queue_of(client, webhook_urls=[receiver.url])
    sender = WebhookSender(SECRET, prefixes(receiver.url))
    threads = Threads(client, load_config(None), booking_agents())
    key, path = fresh(), f"/hooks/{uuid.uuid4().hex}"
    await queue.submit(key, msg("book a table", "m1"), webhook(receiver, key, path))
    await queue.submit(key, msg("for 2 people", "m2"), webhook(receiver, key, path))
    await queue.submit(key, msg("no webhook", "m3"))
    worker = Running(dispatcher(queue, threads, send_webhook=sender.send))
    try:
        await until(lambda: len(calls_to(receiver, path)) == 2)
        await until(lambda: reply_is(queue, key, "m2", "sent"))
        await until(lambda: status_is(queue, key, "m3", "completed"))
    finally:
        await worker.stop()
        await sender.aclose()
    first, second = (verified(c) for c in calls_to(receiver, path))
    assert [first["type"], second["type"]] == ["run.finished", "run.finished"]
    assert [first["data"]["message_id"], second["data"]["message_id"]] == ["m1", "m2"]  # in order
    record = await queue.get(key, "m1")
    assert record is not None and record.reply == "sent" and record.result is not None
    expected = record.model_dump(mode="json", by_alias=True, exclude={"reply", "reply_error"})
    assert first["data"] == expected and first["data"]["result"]["agent"] == "bookings"
    assert first["data"]["result"]["handoffs"][0]["from"] == "triage"  # as the API writes it
    ids = {c.headers["webhook-id"] for c in calls_to(receiver, path)}
    assert len(ids) == 2
    assert (await queue.get(key, "m3")).reply is None  # type: ignore[union-attr]


async def test_a_failed_run_is_posted_and_a_refusal_is_retried_under_the_same_id(
    client: Any,  # noqa: F811
    receiver: PlatformServer,
) -> None:
    async def broken(key: ThreadKey, message: InboundMessage) -> TurnResult:
        raise ValueError("a bug in delivery")

    queue = queue_of(client)
    sender = WebhookSender(SECRET, prefixes(receiver.url))
    key, path = fresh(), f"/hooks/{uuid.uuid4().hex}"
    # The next call (this run's first) fails, with a header value outside ASCII.
    receiver.refuse(503, {"error": "restarting"}, headers={"x-reason": "Wartung läuft"})
    await queue.submit(key, msg("book a table", "m1"), webhook(receiver, key, path))
    worker = Running(dispatcher(queue, broken, send_webhook=sender.send))
    try:
        await until(lambda: reply_is(queue, key, "m1", "sent"))
    finally:
        await worker.stop()
        await sender.aclose()
    refused, taken = calls_to(receiver, path)
    assert refused.headers["webhook-id"] == taken.headers["webhook-id"]
    data = verified(taken)["data"]
    assert data["status"] == "failed" and "a bug in delivery" in data["error"]
    assert data["result"] is None


async def test_a_webhook_that_refuses_for_good_is_noted_on_the_run(
    client: Any,  # noqa: F811
    receiver: PlatformServer,
) -> None:
    queue = queue_of(client)
    sender = WebhookSender(SECRET, prefixes(receiver.url))
    threads = Threads(client, load_config(None), booking_agents())
    key, path = fresh(), f"/hooks/{uuid.uuid4().hex}"
    receiver.refuse(410, {"error": "gone"})
    await queue.submit(key, msg("book a table", "m1"), webhook(receiver, key, path))
    await queue.submit(key, msg("for 2", "m2"), webhook(receiver, key, path))
    worker = Running(dispatcher(queue, threads, send_webhook=sender.send))
    try:
        await until(lambda: reply_is(queue, key, "m2", "sent"))
    finally:
        await worker.stop()
        await sender.aclose()
    first = await queue.get(key, "m1")
    assert first is not None and first.status == "completed" and first.reply == "failed"
    assert first.reply_error is not None and "HTTP 410" in first.reply_error
    assert len(calls_to(receiver, path)) == 2  # the refused one is not sent again


async def test_a_run_whose_record_expired_is_not_posted(
    client: Any,  # noqa: F811
    receiver: PlatformServer,
) -> None:
    queue = queue_of(client)
    key, path = fresh(), f"/hooks/{uuid.uuid4().hex}"
    await queue.submit(key, msg("book a table", "m1"), webhook(receiver, key, path))
    token = "w1"  # a worker that finished the run and stopped before posting its webhook
    assert await queue.acquire(token, 10.0)
    await queue.join()
    (run,), _, _ = await queue.read(token, 10)
    assert await queue.start(token, run)
    assert await queue.finish(token, run, error="failed")
    (reply,), _, _ = await queue.replies.read(token, 10, webhooks=True)
    assert webhook_id(reply.record, reply.entry).startswith("msg_")
    await queue.release(token)
    await client.delete(reply.record)  # then the record's time ran out

    sender = WebhookSender(SECRET, prefixes(receiver.url))
    worker = Running(dispatcher(queue, lambda *_: None, send_webhook=sender.send))
    try:
        await until(lambda: _outbox_empty(client, queue))
    finally:
        await worker.stop()
        await sender.aclose()
    assert calls_to(receiver, path) == []  # nothing to tell it, and nothing left behind


async def _outbox_empty(client: Any, queue: RunQueue) -> bool:  # noqa: F811
    return await client.xlen(queue.keys.webhook_outbox) == 0


async def test_a_long_retry_after_still_gets_a_last_try_at_the_deadline(
    client: Any,  # noqa: F811
    receiver: PlatformServer,
) -> None:
    """Asked to wait past ``reply_give_up_after_s``, the worker tries once more at the
    deadline instead of giving up at once."""
    queue = queue_of(client)
    sender = WebhookSender(SECRET, prefixes(receiver.url))
    threads = Threads(client, load_config(None), booking_agents())
    key, path = fresh(), f"/hooks/{uuid.uuid4().hex}"
    receiver.refuse(503, {"error": "deploying"}, headers={"retry-after": "900"})
    await queue.submit(key, msg("book a table", "m1"), webhook(receiver, key, path))
    worker = Running(
        dispatcher(queue, threads, send_webhook=sender.send, reply_give_up_after_s=1.0)
    )
    try:
        await until(lambda: reply_is(queue, key, "m1", "sent"))
    finally:
        await worker.stop()
        await sender.aclose()
    assert len(calls_to(receiver, path)) == 2
    assert await queue.takes_webhooks()  # the worker said it sends them: the ingress takes them


async def test_a_stuck_webhook_never_holds_a_chats_reply_back(
    client: Any,  # noqa: F811
    receiver: PlatformServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Neither a sending slot nor room among the replies in hand: webhooks have their own
    outbox and slots (here two in hand at most, and a receiver that never answers)."""
    monkeypatch.setattr(serve_app.run_outbox, "_MAX_REPLIES_IN_HAND", 2)
    queue, channel = queue_of(client), Channel()
    threads = Threads(client, load_config(None), booking_agents())
    stuck = asyncio.Event()
    posted: list[str] = []

    async def post(url: str, webhook_id: str, body: bytes) -> None:
        posted.append(url)
        await stuck.wait()

    hooked, chat = fresh(), fresh()
    for n in range(3):
        await queue.submit(hooked, msg("book a table", f"w{n}"), webhook(receiver, hooked))
    worker = Running(
        dispatcher(queue, threads, send_reply=channel, send_webhook=post, max_in_flight=1)
    )
    try:
        await until(lambda: status_is(queue, hooked, "w2", "completed"))
        in_hand = worker.dispatcher._outbox._replies
        await until(lambda: len(in_hand[True]) + len(in_hand[False]) >= 2)  # stuck, in hand
        await queue.submit(chat, msg("book a room", "c1"), {"channel": "telegram", "chat_id": 7})
        await until(lambda: channel.sent)  # the chat's reply went past them
        stuck.set()
        await until(lambda: reply_is(queue, hooked, "w2", "sent"))
    finally:
        await worker.stop()
    assert channel.sent[0][0] == 7 and len(posted) == 3


async def test_a_webhook_done_keeps_a_chat_replys_count_of_pieces_sent(
    client: Any,  # noqa: F811
) -> None:
    """Each outbox numbers its own entries, so the same id can be in both at once."""
    queue, token = queue_of(client), "w1"
    assert await queue.acquire(token, 10.0)
    await queue.join()
    replies = {}
    keys = queue.keys
    for stream, to in ((keys.outbox, telegram(1)), (keys.webhook_outbox, webhook_to(fresh()))):
        body = {"to": to, "text": "a long reply", "thread": "default/t", "message_id": "m1"}
        record = f"{queue.keys.record_prefix}default/t/m1"
        await client.xadd(stream, {"reply": json.dumps(body), "record": record}, id="1-1")
        replies[stream] = OutboundReply(
            "1-1", to, "a long reply", "default/t", "m1", record, stream
        )
    chat, hook = replies[queue.keys.outbox], replies[queue.keys.webhook_outbox]
    await queue.replies.piece_sent(token, chat, 2)
    await queue.replies.done(token, hook)
    assert await queue.replies.pieces_sent(chat) == 2


def webhook_to(key: ThreadKey) -> dict[str, Any]:
    return {"channel": "webhook", "url": "http://127.0.0.1:9/hooks", "thread": str(key)}
