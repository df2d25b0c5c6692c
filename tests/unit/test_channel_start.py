"""Telegram's ``/start``: a new user's first message is a greeting for the agent, not an
unknown command (no Ray: a real Redis run queue and real Threads)."""

from __future__ import annotations

from typing import Any

from actors.key import ThreadKey
from serve_app.channel_telegram import TelegramUpdate, telegram_messages
from serve_app.channels import ChannelInbox
from stickyray.config import load_config
from tests.unit.test_channel_messages import texts_of
from tests.unit.test_channels import channel_settings, update
from tests.unit.test_runs import (
    Running,
    Threads,
    client,  # noqa: F401 - the fixture
    dispatcher,
    queue_of,
    until,
)
from tests.unit.test_thread import booking_agents


def test_start_is_a_greeting_with_its_deep_link_payload() -> None:
    assert texts_of("/start") == ["Hello"]
    assert texts_of("/start ref_campaign42") == ["Hello (ref_campaign42)"]
    assert texts_of("/start@ShopBot") == ["Hello"]  # in a group, addressed to this bot
    assert texts_of("/start@ShopBot promo-7") == ["Hello (promo-7)"]
    assert texts_of("/start@OtherBot") == []  # another bot's, as any command
    # Other commands, known or not, and words that only begin like it stay as they are.
    assert texts_of("/help") == ["/help"]
    assert texts_of("/stop") == ["/stop"]
    assert texts_of("/started late") == ["/started late"]
    assert texts_of("hi /start") == ["hi /start"]


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[Any, str]] = []

    async def __call__(self, to: dict[str, Any], text: str) -> None:
        self.sent.append((to["chat_id"], text))


async def test_a_new_telegram_user_is_answered_by_the_agent(
    client: Any,  # noqa: F811
    redis_url: str,
) -> None:
    queue = queue_of(client)
    inbox = ChannelInbox(queue, channel_settings(redis_url), "test", 16384)
    first = TelegramUpdate.model_validate(update("/start", chat=4242, message_id=1))
    assert await inbox.queue("telegram", telegram_messages(first, "ShopBot"), 1) == {
        "queued": 1,
        "duplicate": 0,
        "ignored": 0,
    }
    chat = Recorder()
    worker = Running(
        dispatcher(queue, Threads(client, load_config(None), booking_agents()), send_reply=chat)
    )
    try:
        await until(lambda: len(chat.sent) == 1)
    finally:
        await worker.stop()
    assert chat.sent == [(4242, "bookings: Hello")]  # routed and answered, not "Unknown command"
    record = await queue.get(ThreadKey.of("telegram:4242"), "telegram:4242:1")
    assert record is not None and record.result is not None
    assert record.result.agent == "bookings"
