"""The thread directory's per-process bookkeeping, without Ray: one lookup per actor name."""

from __future__ import annotations

import asyncio
import threading
import types

import pytest
from ray.exceptions import ActorDiedError

from actors.directory import ThreadDirectory
from actors.key import ThreadKey
from stickyray.config import load_config
from stickyray.errors import StoreUnavailable
from stickyray.turns import InboundMessage


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


class DiedInConstructor:
    """A thread actor whose constructor raised ``error``, as its caller's handle sees it."""

    def __init__(self, error: Exception) -> None:
        from ray.exceptions import ActorDiedError, RayTaskError

        wrapped = RayTaskError("ThreadActor.__init__", "Traceback ...", error, "", 1, "10.0.0.1")
        died = ActorDiedError.from_task_error(wrapped)

        async def handle(message: InboundMessage) -> None:
            raise died

        self.handle = types.SimpleNamespace(remote=handle)


async def test_redis_down_as_a_thread_actor_starts_is_an_outage_not_a_broken_actor() -> None:
    """Its ActorDiedError read as "retrying will not help": a queued run failed for good on
    a Redis blip, though outages are retried until runs.give_up_after_s."""
    from serve_app.runs import transient

    directory = ThreadDirectory(load_config(None), "redis://unused", {}, app="test")
    key = ThreadKey.of("t")
    actors = [DiedInConstructor(StoreUnavailable("redis", "connection refused"))]
    directory._get_or_create = lambda key, name: actors[-1]  # type: ignore[method-assign]
    with pytest.raises(StoreUnavailable) as down:
        await directory.send(key, InboundMessage(text="hi", message_id="m1"))
    assert transient(down.value)  # so the run worker delivers it again later
    assert key.actor_name not in directory._cache  # the dead actor's handle is not kept

    actors.append(DiedInConstructor(ValueError("a bug")))  # what retrying does not mend
    with pytest.raises(ActorDiedError) as broken:
        await directory.send(key, InboundMessage(text="hi", message_id="m2"))
    assert not transient(broken.value)
