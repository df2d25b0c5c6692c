"""The pooled host's own bookkeeping, on a real Redis: placement, the LRU cap, passivation."""

from __future__ import annotations

import asyncio
import collections
import uuid
import zlib

from actors.directory import host_name
from actors.key import ThreadKey
from actors.thread_host import ThreadHost
from stickyray.config import load_config
from stickyray.turns import InboundMessage


def test_a_key_always_lands_on_the_same_host_and_keys_spread() -> None:
    keys = [ThreadKey.of(f"chat-{i}") for i in range(2000)]
    names = [host_name("app/abc", k, 4) for k in keys]
    assert names == [host_name("app/abc", k, 4) for k in keys], "deterministic"
    # The hash is crc32, not Python's per-process salted hash(): every replica agrees.
    assert names[0] == f"threadhost/app/abc/{zlib.crc32(b'default/chat-0') % 4}"
    counts = collections.Counter(names)
    assert len(counts) == 4 and min(counts.values()) > 400


async def open_host(redis_url: str, cap: int) -> ThreadHost:
    team = load_config(None)
    threads = team.threads.model_copy(update={"hosting": "pooled", "max_live_threads": cap})
    host = ThreadHost.__new__(ThreadHost)  # Ray awaits the async __init__; here we do
    await host.__init__(team.model_copy(update={"threads": threads}), redis_url, {})  # type: ignore[misc]
    return host


async def status(host: ThreadHost, thread: str) -> str:
    result = await host.handle(
        ThreadKey.of(thread), InboundMessage(text="/status", message_id=uuid.uuid4().hex)
    )
    return result.reply


async def test_the_least_recently_used_thread_closes_over_the_cap(redis_url: str) -> None:
    host = await open_host(redis_url, cap=2)
    a, b, c = (f"lru-{i}-{id(host)}" for i in range(3))
    for thread in (a, b, a, c):
        await status(host, thread)
    await asyncio.gather(*host._closing)
    assert await host.open_threads() == [ThreadKey.of(a), ThreadKey.of(c)]
    # The closed one reopens on its next message, as a new incarnation.
    await status(host, b)
    assert ThreadKey.of(b) in await host.open_threads()
    assert len(await host.open_threads()) == 2


async def test_passivate_closes_one_thread_and_a_retry_reopens_it(redis_url: str) -> None:
    host = await open_host(redis_url, cap=10)
    thread = f"pas-{id(host)}"
    await status(host, thread)
    await host.passivate(ThreadKey.of(thread))
    assert await host.open_threads() == []
    assert "active" in (await status(host, thread)).lower()
    assert await host.open_threads() == [ThreadKey.of(thread)]
