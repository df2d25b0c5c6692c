"""The thread directory's per-process bookkeeping, without Ray: one lookup per actor name."""

from __future__ import annotations

import asyncio
import threading

from actors.directory import ThreadDirectory
from actors.key import ThreadKey
from stickyray.config import load_config


async def test_a_request_given_up_on_does_not_cancel_the_lookup_others_wait_for() -> None:
    """Two messages of a thread wait for one lookup of its actor; the first one's request
    cancelled (its client went away) cancelled the lookup for the second too."""
    directory = ThreadDirectory(load_config(None), "redis://unused", {}, app="test")
    looking, found = threading.Event(), threading.Event()
    names: list[str] = []

    def get_or_create(key: ThreadKey, name: str) -> str:
        names.append(name)
        looking.set()
        found.wait(10)  # the named-actor lookup's round trip to the GCS
        return f"handle of {name}"

    directory._get_or_create = get_or_create  # type: ignore[method-assign]
    key = ThreadKey.of("t")
    gone = asyncio.create_task(directory.actor(key))
    waiting = asyncio.create_task(directory.actor(key))
    assert await asyncio.to_thread(looking.wait, 10)
    gone.cancel()
    await asyncio.wait({gone})
    found.set()
    assert await asyncio.wait_for(waiting, 10) == f"handle of {key.actor_name}"
    assert names == [key.actor_name]  # one lookup for both
    assert await directory.actor(key) == f"handle of {key.actor_name}"  # and cached
