"""A thread's stored records read by an older release: fields it does not know are ignored."""

from __future__ import annotations

import json
import uuid

import pytest
from pydantic import ValidationError

from actors.key import ThreadKey
from actors.redis_store import RedisThreadStore, connect_redis
from actors.store import Checkpoint, Incarnation, PendingTurn
from actors.thread import Thread
from stickyray.config import load_config
from stickyray.turns import AgentRequest, AgentResult, CompressResult, InboundMessage

NEWER = {"added_by_a_newer_release": "x"}


class Agents:
    """Every agent answers at once; records the turns it ran."""

    def __init__(self) -> None:
        self.turns: list[tuple[int, str]] = []

    async def __call__(self, agent: str, request: AgentRequest) -> AgentResult:
        self.turns.append((request.turn, request.text))
        return AgentResult(agent=agent, reply=f"{agent}: {request.text}")

    async def compress(self, agent: str, request: object) -> CompressResult:
        return CompressResult()


def test_each_stored_record_ignores_fields_it_does_not_know() -> None:
    checkpoint = Checkpoint.model_validate({"turn": 3, "version": 4, **NEWER})
    assert checkpoint == Checkpoint(turn=3, version=4)
    message = InboundMessage(text="hi", message_id="m1")
    newer = {"seq": 4, "message": message.model_dump() | NEWER, **NEWER}
    pending = PendingTurn(seq=4, message=message)
    assert PendingTurn.model_validate(newer) == pending
    as_stored = newer | {"message": json.dumps(newer["message"])}  # the JSON Redis holds
    assert PendingTurn.model_validate(as_stored) == pending
    incarnation = Incarnation.model_validate({"epoch": 2, "checkpoint": checkpoint, **NEWER})
    assert incarnation == Incarnation(epoch=2, checkpoint=checkpoint)


async def test_a_thread_a_newer_release_wrote_still_opens_and_completes_its_turn(
    redis_url: str,
) -> None:
    """A field added to the checkpoint or to a pending message by a newer release made the
    thread unopenable here: every message to it failed until this instance was upgraded."""
    team = load_config(None)
    key = ThreadKey.of(f"newer-{uuid.uuid4().hex[:12]}")
    agents = Agents()
    client = connect_redis(redis_url)
    try:
        async with RedisThreadStore.from_url(redis_url, ttl_s=3600) as store:
            thread = await Thread.open(key, team, store, agents)
            await thread.handle(InboundMessage(text="book a table", message_id="m1"))
            # The newer release accepted the next message, then stopped before its turn ended.
            epoch = (await store.open(key)).epoch
            await store.accept(key, epoch, InboundMessage(text="for two", message_id="m2"))
            for part, field in (("checkpoint", "data"), ("pending", "message")):
                raw = await client.hget(key.redis_key(part), field)
                assert raw is not None
                newer = json.loads(raw) | NEWER
                await client.hset(key.redis_key(part), field, json.dumps(newer))

            reopened = await Thread.open(key, team, store, agents)
            assert reopened.snapshot().turns == 2
            turns = await store.turns(key)
    finally:
        await client.aclose()
    assert [(t.turn, t.status) for t in turns] == [(1, "completed"), (2, "completed")]
    assert agents.turns[-1] == (2, "for two")


def test_a_message_without_an_id_is_refused_before_any_store_sees_it() -> None:
    """The Redis store keys a turn's answer by the message id: with "" it stored none, so
    the turn stayed pending and every later message of the thread was refused."""
    with pytest.raises(ValidationError, match="message_id"):
        InboundMessage(text="hi", message_id="")
