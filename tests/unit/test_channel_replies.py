"""Replies of channel runs: from the run queue's outbox to the channel, on a real Redis, with
real Threads (no Ray). The e2e tests add Ray, Serve and the HTTP platforms."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from actors.run_queue import RunQueue
from actors.run_replies import RunReplies
from actors.run_streams import LeasedStreams
from serve_app.channel_sender import http_refusal
from stickyray.config import load_config
from stickyray.errors import ChannelSendFailed
from stickyray.turns import SORRY_REPLY, InboundMessage, TurnResult
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


class Channel:
    """Records what it is asked to send; ``refusals`` are raised first, one per call (None:
    that call succeeds)."""

    def __init__(self, *refusals: ChannelSendFailed | None) -> None:
        self.sent: list[tuple[Any, str]] = []
        self.refusals = list(refusals)
        self.hold = asyncio.Event()
        self.hold.set()
        self.calls = 0

    async def __call__(self, to: dict[str, Any], text: str) -> None:
        self.calls += 1
        await self.hold.wait()
        refusal = self.refusals.pop(0) if self.refusals else None
        if refusal is not None:
            raise refusal
        self.sent.append((to["chat_id"], text))


def telegram(chat: int) -> dict[str, Any]:
    return {"channel": "telegram", "chat_id": chat}


async def test_a_channel_run_is_answered_through_its_channel(client: Any) -> None:  # noqa: F811
    queue, channel = queue_of(client), Channel()
    threads = Threads(client, load_config(None), booking_agents())
    key, plain = fresh(), fresh()
    await queue.submit(key, msg("book a table", "m1"), telegram(1))
    await queue.submit(key, msg("for 2 people", "m2"), telegram(1))
    await queue.submit(plain, msg("book a room", "p1"))  # the API's: nobody to send to
    worker = Running(dispatcher(queue, threads, send_reply=channel))
    try:
        await until(lambda: len(channel.sent) == 2)
        await until(lambda: status_is(queue, plain, "p1", "completed"))
        first, second = await queue.get(key, "m1"), await queue.get(key, "m2")
        assert first is not None and second is not None and first.result and second.result
        assert channel.sent == [(1, first.result.reply), (1, second.result.reply)]
        await until(lambda: reply_is(queue, key, "m2", "sent"))
        assert (await queue.get(plain, "p1")).reply is None  # type: ignore[union-attr]
    finally:
        await worker.stop()
    assert len(channel.sent) == 2


async def reply_is(queue: Any, key: Any, mid: str, status: str) -> bool:
    record = await queue.get(key, mid)
    return record is not None and record.reply == status


async def test_a_chat_gets_its_replies_in_order_while_other_chats_go_on(
    client: Any,  # noqa: F811
) -> None:
    queue, channel = queue_of(client), Channel()
    threads = Threads(client, load_config(None), booking_agents())
    keys = [fresh(), fresh(), fresh()]
    for n in range(4):
        for chat, key in enumerate(keys):
            await queue.submit(key, msg(f"book {n}", f"m{n}"), telegram(chat))
    worker = Running(dispatcher(queue, threads, send_reply=channel))
    try:
        await until(lambda: len(channel.sent) == 12)
    finally:
        await worker.stop()
    for chat, key in enumerate(keys):
        expected = []
        for n in range(4):
            record = await queue.get(key, f"m{n}")
            assert record is not None and record.result is not None
            expected.append(record.result.reply)
        assert [text for to, text in channel.sent if to == chat] == expected


async def test_passing_refusals_are_retried_and_lasting_ones_fail_the_reply(
    client: Any,  # noqa: F811
) -> None:
    queue = queue_of(client)
    passing = ChannelSendFailed("telegram", "HTTP 503", permanent=False)
    limited = ChannelSendFailed("telegram", "HTTP 429", permanent=False, retry_after=0.2)
    blocked = ChannelSendFailed("telegram", "HTTP 403: bot was blocked", permanent=True)
    channel = Channel(passing, limited, None, blocked)
    threads = Threads(client, load_config(None), booking_agents())
    key = fresh()
    await queue.submit(key, msg("book a table", "m1"), telegram(1))  # 503, 429, then sent
    await queue.submit(key, msg("for 2", "m2"), telegram(1))  # blocked: fails for good
    worker = Running(dispatcher(queue, threads, send_reply=channel))
    try:
        await until(lambda: reply_is(queue, key, "m2", "failed"))
    finally:
        await worker.stop()
    first, second = await queue.get(key, "m1"), await queue.get(key, "m2")
    assert first is not None and first.reply == "sent" and first.reply_error is None
    assert second is not None and second.reply_error == "telegram: HTTP 403: bot was blocked"
    assert channel.calls == 4 and len(channel.sent) == 1


@pytest.mark.parametrize(
    ("refusal", "calls"),
    [
        # Down: sent again with backoff (0.5 s, then 1 s), the last try at the deadline.
        (ChannelSendFailed("telegram", "ConnectError", permanent=False), [3]),
        # Told to wait past that (Telegram's flood control): not sent early, which would
        # only prolong the wait.
        (ChannelSendFailed("telegram", "HTTP 429", permanent=False, retry_after=5.0), [1]),
    ],
)
async def test_a_channel_down_for_too_long_fails_the_reply(
    client: Any,  # noqa: F811
    refusal: ChannelSendFailed,
    calls: Any,
) -> None:
    queue = queue_of(client)
    channel = Channel(*[refusal] * 100)
    threads = Threads(client, load_config(None), booking_agents())
    key = fresh()
    await queue.submit(key, msg("book a table", "m1"), telegram(1))
    worker = Running(dispatcher(queue, threads, send_reply=channel, reply_give_up_after_s=1.0))
    try:
        await until(lambda: reply_is(queue, key, "m1", "failed"))
    finally:
        await worker.stop()
    record = await queue.get(key, "m1")
    assert record is not None and record.status == "completed"  # the turn itself stands
    assert record.reply_error is not None and record.reply_error.startswith("gave up after 1 s")
    assert channel.calls in calls


def test_a_refusal_in_no_shape_is_still_read() -> None:
    """Odd answers give a reason, never an exception that would fail a reply for good."""
    for response in (
        httpx.Response(429, headers=[(b"retry-after", "\u00b2".encode())]),  # a digit? no
        httpx.Response(503, content=b"[" * 60000),  # JSON nested past the parser
        httpx.Response(503, content=b"\xff\xfe"),
    ):
        reason, retry_after, code = http_refusal(response)
        assert retry_after is None and code is None and isinstance(reason, str)


def test_a_secret_quoted_across_the_cut_is_redacted_whole() -> None:
    """Cut first and redacted after, the start of a token at the cut would survive."""
    token = "123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw"
    quoted = httpx.Response(400, json={"ok": False, "description": "x" * 180 + " bot" + token})
    reason, _, _ = http_refusal(quoted, lambda text: text.replace(token, "***"))
    assert "123456789" not in reason and reason.endswith("bot***")


async def test_a_reply_left_by_a_stopped_worker_is_sent_by_the_next(
    client: Any,  # noqa: F811
) -> None:
    queue = queue_of(client)
    stuck = Channel()
    stuck.hold.clear()  # the first worker's channel never answers
    threads = Threads(client, load_config(None), booking_agents())
    key = fresh()
    await queue.submit(key, msg("book a table", "m1"), telegram(7))
    first = Running(dispatcher(queue, threads, send_reply=stuck))
    await until(lambda: stuck.calls == 1)  # finished, its reply is being sent
    await first.stop()
    assert await status_is(queue, key, "m1", "completed")
    record = await queue.get(key, "m1")
    assert record is not None and record.reply == "pending"
    channel = Channel()
    second = Running(dispatcher(queue, threads, send_reply=channel))
    try:
        await until(lambda: reply_is(queue, key, "m1", "sent"))
    finally:
        await second.stop()
    assert record.result is not None and channel.sent == [(7, record.result.reply)]
    assert threads.delivered == [(key, "book a table")]  # the turn did not run again


class LimitsChat(Channel):
    """Chat 1 is rate-limited for a long while on its first reply; other chats are not."""

    async def __call__(self, to: dict[str, Any], text: str) -> None:
        self.calls += 1
        if to["chat_id"] == 1 and self.calls == 1:
            raise ChannelSendFailed("telegram", "HTTP 429", permanent=False, retry_after=60)
        self.sent.append((to["chat_id"], text))


async def test_a_rate_limited_chat_holds_up_only_itself(client: Any) -> None:  # noqa: F811
    queue, channel = queue_of(client), LimitsChat()
    threads = Threads(client, load_config(None), booking_agents())
    limited, other = fresh(), fresh()
    await queue.submit(limited, msg("book a table", "a1"), telegram(1))
    await queue.submit(limited, msg("for 2", "a2"), telegram(1))
    worker = Running(dispatcher(queue, threads, send_reply=channel))
    try:
        await until(lambda: channel.calls == 1)
        # Replies queued after the limited chat's, in another chat, go out meanwhile.
        for n in range(3):
            await queue.submit(other, msg(f"book {n}", f"b{n}"), telegram(2))
        await until(lambda: len(channel.sent) == 3)
        assert [to for to, _ in channel.sent] == [2, 2, 2]
        record = await queue.get(limited, "a2")
        assert record is not None and record.status == "completed" and record.reply == "pending"
    finally:
        await worker.stop()


class LosesOneReplyRead(RunReplies):
    """Outboxes whose first read of new replies is lost on the way to the worker."""

    lost: list[str] = []

    async def read(
        self, token: str, count: int, *, after: str | None = None, seen: str = "0-0", **kw: Any
    ) -> Any:
        got = await super().read(token, count, after=after, seen=seen, **kw)
        if after is None and got[0] and not self.lost:
            self.lost.extend(r.message_id for r in got[0])
            return await super().read(token, count, after=after, seen=seen, **kw)
        return got


async def test_replies_read_and_lost_are_read_again(client: Any) -> None:  # noqa: F811
    queue = queue_of(client)
    lossy = LosesOneReplyRead(client, queue.keys, LeasedStreams(client, queue.keys))
    lossy.lost = []
    queue.replies = lossy
    channel = Channel()
    threads = Threads(client, load_config(None), booking_agents())
    key = fresh()
    await queue.submit(key, msg("book a table", "m1"), telegram(3))
    worker = Running(dispatcher(queue, threads, send_reply=channel, idle_wait_ms=50))
    try:
        await until(lambda: lossy.lost)
        await queue.submit(key, msg("for 2", "m2"), telegram(3))
        await until(lambda: len(channel.sent) == 2)
    finally:
        await worker.stop()
    assert lossy.lost == ["m1"]
    replies = [(await queue.get(key, mid)) for mid in ("m1", "m2")]
    assert [text for _, text in channel.sent] == [r.result.reply for r in replies if r and r.result]


async def test_a_run_that_failed_without_a_turn_still_tells_its_user(
    client: Any,  # noqa: F811
) -> None:
    async def broken(key: Any, message: Any) -> Any:
        raise ValueError("a bug in delivery")

    queue, channel = queue_of(client), Channel()
    key = fresh()
    await queue.submit(key, msg("book a table", "m1"), telegram(4))
    worker = Running(dispatcher(queue, broken, send_reply=channel))
    try:
        await until(lambda: reply_is(queue, key, "m1", "sent"))
    finally:
        await worker.stop()
    record = await queue.get(key, "m1")
    assert record is not None and record.status == "failed" and record.result is None
    assert channel.sent == [(4, SORRY_REPLY)]


LONG = "a" * 4000 + " " + "b" * 3000  # two pieces: 4,001 and 3,000 characters


async def answers_at_length(key: Any, message: InboundMessage) -> TurnResult:
    """Delivers a run as a turn whose reply is LONG."""
    return TurnResult(
        thread_id=key.thread_id, message_id=message.message_id, turn=1, agent="x", reply=LONG
    )


async def test_a_long_reply_goes_in_pieces_and_a_failed_piece_alone_is_sent_again(
    client: Any,  # noqa: F811
) -> None:
    limited = ChannelSendFailed("telegram", "HTTP 429", permanent=False, retry_after=0.1)
    queue, channel = queue_of(client), Channel(None, limited)
    key = fresh()
    await queue.submit(key, msg("tell me everything", "m1"), telegram(5))
    worker = Running(dispatcher(queue, answers_at_length, send_reply=channel))
    try:
        await until(lambda: reply_is(queue, key, "m1", "sent"))
    finally:
        await worker.stop()
    assert channel.sent == [(5, "a" * 4000 + " "), (5, "b" * 3000)]
    assert channel.calls == 3


async def test_pieces_sent_are_not_sent_again_by_the_next_worker(
    client: Any,  # noqa: F811
) -> None:
    # Piece 2 meets a long rate limit; the worker is replaced meanwhile (a deploy).
    limited = ChannelSendFailed("whatsapp", "HTTP 400: pair rate", permanent=False, retry_after=60)
    queue, first_channel = queue_of(client), Channel(None, limited)
    key = fresh()
    await queue.submit(key, msg("tell me everything", "m1"), telegram(8))
    first = Running(dispatcher(queue, answers_at_length, send_reply=first_channel))
    await until(lambda: first_channel.calls == 2)
    await first.stop()
    channel = Channel()
    second = Running(dispatcher(queue, answers_at_length, send_reply=channel))
    try:
        await until(lambda: reply_is(queue, key, "m1", "sent"))
    finally:
        await second.stop()
    assert first_channel.sent == [(8, "a" * 4000 + " ")]
    assert channel.sent == [(8, "b" * 3000)]  # only the piece not sent yet
    assert await client.hlen(queue.keys.progress) == 0  # nothing left behind


class WhatsApp:
    """Takes every message and names it as WhatsApp does (``wamid.out<n>``); ``on_send``
    runs as each is taken, before the id is returned."""

    def __init__(self, on_send: Any = None) -> None:
        self.sent: list[str] = []
        self.on_send = on_send

    async def __call__(self, to: dict[str, Any], text: str) -> str:
        self.sent.append(text)
        if self.on_send is not None:
            await self.on_send(len(self.sent))
        return f"wamid.out{len(self.sent)}"


def whatsapp() -> dict[str, Any]:
    return {"channel": "whatsapp", "phone_number_id": "1055", "to": "34600111222"}


async def test_a_reply_whatsapp_fails_to_deliver_later_is_noted_on_its_run(
    client: Any,  # noqa: F811
) -> None:
    """WhatsApp answers a send with the message's id, and names it so when it reports
    later that it could not deliver it: the run's record then says the reply failed."""
    queue, channel = queue_of(client), WhatsApp()
    key = fresh()
    await queue.submit(key, msg("tell me everything", "m1"), whatsapp())
    worker = Running(dispatcher(queue, answers_at_length, send_reply=channel))
    try:
        await until(lambda: reply_is(queue, key, "m1", "sent"))
    finally:
        await worker.stop()
    assert len(channel.sent) == 2
    assert await queue.replies.not_delivered("wamid.elsewhere", "not delivered: 131026") is None
    why = "not delivered: 131047 Re-engagement message"
    run = await queue.replies.not_delivered("wamid.out2", why)
    assert run == f"{key}/m1"
    record = await queue.get(key, "m1")
    assert record is not None and record.reply == "failed"
    assert record.reply_error == "not delivered: 131047 Re-engagement message"
    # The id is kept as long as the record, and no longer.
    sent_key = queue.keys.sent("wamid.out1")
    assert 0 < await client.ttl(sent_key) <= await client.ttl(queue.keys.record(key, "m1"))


async def test_a_failure_reported_before_the_reply_is_done_stands(
    client: Any,  # noqa: F811
) -> None:
    """The first piece's failure arrives while the second is being sent: finishing the
    reply does not turn it back into sent."""
    queue = queue_of(client)
    key = fresh()

    async def report_first_piece(sent: int) -> None:
        if sent == 2:
            run = await queue.replies.not_delivered("wamid.out1", "not delivered: 131026")
            assert run is not None

    channel = WhatsApp(report_first_piece)
    await queue.submit(key, msg("tell me everything", "m1"), whatsapp())
    worker = Running(dispatcher(queue, answers_at_length, send_reply=channel))
    try:
        await until(lambda: reply_taken_off(queue, channel))
    finally:
        await worker.stop()
    record = await queue.get(key, "m1")
    assert record is not None and (record.reply, record.reply_error) == (
        "failed",
        "not delivered: 131026",
    )


async def reply_taken_off(queue: RunQueue, channel: WhatsApp) -> bool:
    """Both pieces sent, and the reply done with: off the outbox."""
    return len(channel.sent) == 2 and await queue._client.xlen(queue.keys.outbox) == 0


async def test_a_reply_cut_short_says_how_much_was_sent(client: Any) -> None:  # noqa: F811
    refused = ChannelSendFailed("telegram", "HTTP 400: message is too long", permanent=True)
    queue, channel = queue_of(client), Channel(None, refused)
    key = fresh()
    await queue.submit(key, msg("tell me everything", "m1"), telegram(9))
    worker = Running(dispatcher(queue, answers_at_length, send_reply=channel))
    try:
        await until(lambda: reply_is(queue, key, "m1", "failed"))
    finally:
        await worker.stop()
    record = await queue.get(key, "m1")
    assert record is not None
    assert record.reply_error == "telegram: HTTP 400: message is too long (1 of 2 pieces were sent)"


class RefusesBlanks(Channel):
    """Answers a text of whitespace alone as Telegram does."""

    async def __call__(self, to: dict[str, Any], text: str) -> None:
        if not text.strip():
            self.calls += 1
            raise ChannelSendFailed("telegram", "HTTP 400: message text is empty", permanent=True)
        await super().__call__(to, text)


async def test_a_reply_ending_in_blank_lines_past_the_limit_is_sent(client: Any) -> None:  # noqa: F811
    reply = "x" * 4094 + ".\n\n\n"

    async def answers(key: Any, message: InboundMessage) -> TurnResult:
        return TurnResult(
            thread_id=key.thread_id, message_id=message.message_id, turn=1, agent="x", reply=reply
        )

    queue, channel = queue_of(client), RefusesBlanks()
    key = fresh()
    await queue.submit(key, msg("tell me everything", "m1"), telegram(10))
    worker = Running(dispatcher(queue, answers, send_reply=channel))
    try:
        await until(lambda: channel.calls)
        await until(lambda: reply_is(queue, key, "m1", "sent"), 2)
    finally:
        await worker.stop()
    record = await queue.get(key, "m1")
    assert record is not None and record.reply_error is None
    assert channel.sent == [(10, reply[:4096])] and channel.calls == 1  # no blank second one


async def test_a_worker_that_lost_its_lease_sends_nothing_more(client: Any) -> None:  # noqa: F811
    queue = queue_of(client)
    threads = Threads(client, load_config(None), booking_agents())
    key = fresh()
    await queue.submit(key, msg("book a table", "m1"), telegram(6))
    await queue.submit(key, msg("for 2", "m2"), telegram(6))
    stalled = Channel()
    stalled.hold.clear()
    old = Running(dispatcher(queue, threads, send_reply=stalled))
    await until(lambda: stalled.calls == 1)  # m1's reply is on its way when the lease goes
    await client.delete(queue.keys.lease)  # it expired: the worker stalled past it
    channel = Channel()
    new = Running(dispatcher(queue, threads, send_reply=channel))
    try:
        await until(lambda: len(channel.sent) == 2)
        stalled.hold.set()  # the old worker wakes up, and finds its lease gone
        await until(lambda: not old.dispatcher._outbox._replies[False])
    finally:
        await new.stop()
        await old.stop()
    replies = [await queue.get(key, mid) for mid in ("m1", "m2")]
    texts = [r.result.reply for r in replies if r is not None and r.result is not None]
    assert [text for _, text in channel.sent] == texts
    assert texts[1] not in [text for _, text in stalled.sent]  # at most the one in flight
