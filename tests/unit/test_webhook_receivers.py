"""Webhook receivers that are down or slow: their share of the run worker's posting slots,
the give-up time their webhooks share, and the sender's connections (a real Redis run queue
and real local HTTP servers, no Ray)."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

from serve_app.webhooks import WebhookSender
from stickyray.config import RunsConfig, load_config
from stickyray.errors import ChannelSendFailed
from tests.unit.test_runs import (
    Running,
    Threads,
    client,  # noqa: F401 - the fixture
    dispatcher,
    fresh,
    msg,
    queue_of,
    until,
)
from tests.unit.test_thread import booking_agents

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()


def webhook(url: str, key: Any) -> dict[str, Any]:
    return {"channel": "webhook", "url": url, "thread": str(key)}


async def test_a_receiver_that_is_down_holds_up_no_other_receiver_however_spelt(
    client: Any,  # noqa: F811
) -> None:
    """Each receiver gets a quarter of the webhook slots at most (here one of four): its
    calls hanging until they time out leave the others' slots free. The receiver is its
    scheme, host and port, as the allowed URLs are compared: spelt with capitals or its
    default port, it had a quarter per spelling, so four spellings took every slot."""
    queue = queue_of(client)
    threads = Threads(client, load_config(None), booking_agents())
    down = asyncio.Event()
    posting: list[str] = []
    posted: list[str] = []

    async def post(url: str, webhook_id: str, body: bytes) -> None:
        posting.append(url)
        if "down.example" in url.lower():
            await down.wait()  # a receiver that never answers, until its calls time out
        posted.append(url)

    spellings = [
        "https://down.example/hooks/0",
        "https://DOWN.example/hooks/1",
        "https://down.example:443/hooks/2",
        "HTTPS://Down.Example/hooks/3",
    ]
    for n, url in enumerate(spellings):
        key = fresh()
        await queue.submit(key, msg("book a table", f"d{n}"), webhook(url, key))
    worker = Running(dispatcher(queue, threads, send_webhook=post, max_in_flight=4))
    try:
        await until(lambda: posting)
        key = fresh()
        await queue.submit(key, msg("book a room", "u1"), webhook("https://up.example/h", key))
        await until(lambda: posted == ["https://up.example/h"])
        assert len([url for url in posting if "down" in url.lower()]) == 1
        down.set()
        await until(lambda: len(posted) == 5)
        # A receiver nobody is posting to, and whose last call was taken, is not kept.
        await until(lambda: not worker.dispatcher._outbox._receivers)
    finally:
        await worker.stop()


async def test_a_threads_webhooks_to_a_receiver_that_is_down_give_up_together(
    client: Any,  # noqa: F811
) -> None:
    """A thread's webhooks go in order, and each counted its give-up time from its own first
    failure: N of them to a receiver that is down took N times the give-up time (with 1,000
    in hand, days, while every other receiver's webhooks waited to be read)."""
    queue = queue_of(client)
    threads = Threads(client, load_config(None), booking_agents())
    tries: dict[str, int] = {}

    async def post(url: str, webhook_id: str, body: bytes) -> None:
        tries[webhook_id] = tries.get(webhook_id, 0) + 1
        raise ChannelSendFailed("webhook", "HTTP 503", permanent=False)

    key = fresh()
    for n in range(4):
        await queue.submit(
            key, msg("book a table", f"d{n}"), webhook("https://down.example/h", key)
        )
    worker = Running(
        dispatcher(queue, threads, send_webhook=post, reply_give_up_after_s=0.5, retry_cap_s=0.1)
    )
    try:
        await until(lambda: all_failed(queue, key, [f"d{n}" for n in range(4)]))
    finally:
        await worker.stop()
    first, *later = tries.values()
    assert first > 1  # tried until the give-up time
    assert later == [1, 1, 1]  # then each of the others once, past it


async def all_failed(queue: Any, key: Any, message_ids: list[str]) -> bool:
    """Whether every one of these runs' webhooks was given up."""
    records = [await queue.get(key, message_id) for message_id in message_ids]
    return all(record is not None and record.reply == "failed" for record in records)


async def test_one_receivers_hanging_calls_leave_connections_for_the_others() -> None:
    """httpx pools 100 connections: a receiver holding a quarter of 400 posting slots with
    calls that hang until they time out kept every other receiver's call waiting for one."""

    hanging: list[asyncio.StreamWriter] = []

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hanging.append(writer)
        await reader.read()  # until the client gives up and closes

    async def taken(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await writer.drain()
        writer.close()

    down = await asyncio.start_server(hang, "127.0.0.1", 0)
    up = await asyncio.start_server(taken, "127.0.0.1", 0)
    down_url = f"http://127.0.0.1:{down.sockets[0].getsockname()[1]}/h"
    up_url = f"http://127.0.0.1:{up.sockets[0].getsockname()[1]}/h"
    sender = WebhookSender(SECRET, RunsConfig(webhook_urls=[down_url, up_url]).webhook_urls, 3.0)
    try:
        stuck = [asyncio.create_task(sender.send(down_url, f"d{n}", b"{}")) for n in range(100)]
        await until(lambda: len(hanging) == 100)
        # Sent while the hanging calls hold their connections, not after they time out.
        await asyncio.wait_for(sender.send(up_url, "u1", b"{}"), 2.0)
        assert not any(task.done() for task in stuck)
        await asyncio.gather(*stuck, return_exceptions=True)
    finally:
        await sender.aclose()
        down.close()
        up.close()
