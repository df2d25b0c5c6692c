"""A reply's text as it is written: agents add it to a Redis stream, the ingress reads it.

The stream is the thread's (``ThreadKey.deltas_key``), so an agent replica on one node and
the ingress replica on another that holds the caller's connection meet in Redis, as the
rest of a turn does. It holds the text only: the turn itself comes back the usual way, and
its reply is the one that counts (text a model wrote before calling tools is not it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncGenerator
from typing import Any

import redis.asyncio as aioredis

from providers.model import valid_unicode

__all__ = ["DELTAS_TTL_S", "DeltaWriter", "read_deltas", "sse"]

log = logging.getLogger(__name__)

# Counted again from each write: a reply nobody reads is gone this long after its last text.
DELTAS_TTL_S = 600
# Entries kept per reply: a model's reply is far shorter than this many batches.
_MAX_ENTRIES = 10_000
# How often the ingress looks for new text while the turn runs.
_POLL_S = 0.05


class DeltaWriter:
    """Adds a model's text to one reply's stream, in order, a batch per Redis round trip.

    Text that comes while a write is in flight joins the next one, so a fast model costs few
    round trips. A Redis failure ends the streaming of this reply (logged once), never the
    turn: the caller still gets the whole reply at the end.
    """

    def __init__(self, client: aioredis.Redis, key: str, agent: str) -> None:
        self._client = client
        self._key = key
        self._agent = agent
        # Names this agent call in its pieces: a turn run again (its thread actor was lost
        # midway) writes to the same stream, its steps numbered from 1 again.
        self._call = uuid.uuid4().hex[:12]
        self._pending: list[tuple[int, str]] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._failed = False
        self._task = asyncio.create_task(self._drain())

    async def write(self, step: int, text: str) -> None:
        """Queue ``text`` of model call ``step``; returns at once."""
        if not self._failed and text:
            self._pending.append((step, valid_unicode(text)))
            self._wake.set()

    async def close(self) -> None:
        """Write what is queued, then stop."""
        self._closing = True
        self._wake.set()
        await self._task

    async def _drain(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    async with self._client.pipeline(transaction=False) as pipe:
                        for step, text in _joined(batch):
                            fields: dict[Any, Any] = {
                                "agent": self._agent,
                                "call": self._call,
                                "step": step,
                                "text": text,
                            }
                            pipe.xadd(self._key, fields, maxlen=_MAX_ENTRIES, approximate=True)
                        # Every time: the reader may have deleted the stream (it left) and
                        # this write made it again.
                        pipe.expire(self._key, DELTAS_TTL_S)
                        await pipe.execute()
                except Exception as exc:
                    log.warning("reply text for %s not streamed: %s", self._key, exc)
                    self._failed = True
                    self._pending = []
                    return
            if self._closing:
                return


def _joined(batch: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Consecutive pieces of one model call as one."""
    joined: list[tuple[int, str]] = []
    for step, text in batch:
        if joined and joined[-1][0] == step:
            joined[-1] = (step, joined[-1][1] + text)
        else:
            joined.append((step, text))
    return joined


async def read_deltas(
    client: aioredis.Redis, key: str, turn: asyncio.Future[Any], idle_s: float | None = None
) -> AsyncGenerator[dict[str, Any] | None, None]:
    """The pieces added to ``key`` until ``turn`` is done, then the rest, then the key goes.

    With ``idle_s``, ``None`` comes after each ``idle_s`` seconds without a piece, for the
    caller to keep its connection alive.
    Polls without blocking, so a reply being read holds no Redis connection between looks.
    A Redis failure ends the pieces early (the keep-alives go on); the turn still ends the
    stream. A reader that
    stops early (its caller went away) leaves the key to go when the turn is done, so a
    retry of the message later does not read this delivery's text.
    """
    last = "0-0"
    read_all = False
    clock = asyncio.get_running_loop().time
    quiet_since = clock()
    try:
        while True:
            finished = turn.done()
            found: Any = await client.xread({key: last}, count=1000)
            for _, entries in found or []:
                for entry_id, fields in entries:
                    last = entry_id
                    yield _piece(fields)
                    quiet_since = clock()
            if finished and not found:
                read_all = True
                return
            if not found:
                if idle_s is not None and clock() - quiet_since >= idle_s:
                    yield None
                    quiet_since = clock()
                await asyncio.wait([turn], timeout=_POLL_S)
    except Exception as exc:  # Redis: the turn still answers
        log.warning("reply text of %s not read: %s", key, exc)
        while idle_s is not None and not turn.done():  # and its caller still waits for it
            await asyncio.wait([turn], timeout=idle_s)
            if not turn.done():
                yield None
    finally:
        if read_all:
            with contextlib.suppress(Exception):
                await client.delete(key)
        else:  # no await here: a reader cancelled with its request cannot wait
            turn.add_done_callback(lambda _: _forget(client, key))


_forgetting: set[asyncio.Task[Any]] = set()


def _forget(client: aioredis.Redis, key: str) -> None:
    """Delete ``key`` in the background (its TTL is the fallback if that fails)."""

    async def delete() -> None:
        try:
            await client.delete(key)
        except Exception as exc:
            log.info("reply text of %s left to expire: %s", key, exc)

    task = asyncio.get_running_loop().create_task(delete())
    _forgetting.add(task)
    task.add_done_callback(_forgetting.discard)


def _piece(fields: dict[Any, Any]) -> dict[str, Any]:
    text = {_str(k): _str(v) for k, v in fields.items()}
    return {
        "agent": text.get("agent"),
        "call": text.get("call"),
        "step": int(text.get("step", 0)),
        "text": text.get("text"),
    }


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def sse(event: str, data: Any) -> bytes:
    """One server-sent event. JSON escaped to ASCII keeps ``data`` on one line for every
    client: some split lines at U+2028 or U+0085 too, which JSON leaves raw otherwise."""
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()
