"""Telegram group commands addressed to a bot (``/reset@ShopBot``), with the closing
punctuation the thread's command parser takes (no Ray, no Redis)."""

from __future__ import annotations

from actors.commands import Command, parse_command
from tests.unit.test_channel_messages import texts_of


def test_a_command_to_another_bot_ending_in_punctuation_is_not_queued() -> None:
    assert texts_of("/reset@OtherBot.") == []
    assert texts_of("/reset@OtherBot!? now") == []
    assert texts_of("/reset@OtherBot?\nplease") == []


def test_a_command_to_this_bot_ending_in_punctuation_reaches_the_thread_as_the_command() -> None:
    assert texts_of("/supervisor@ShopBot.") == ["/supervisor."]
    assert parse_command("/supervisor.") == Command("supervisor")
    assert texts_of("/reset@shopbot! thanks") == ["/reset! thanks"]
    # Punctuation that does not end the command leaves the text as it was typed.
    assert texts_of("/reset@ShopBot.com is down") == ["/reset@ShopBot.com is down"]
