"""Telegram (Bot API): an ``Update`` read as the run of its chat's thread.

Only new messages are read (not edits, not channel posts): a text, ``/start`` as a greeting,
a command addressed to this bot (one addressed to another bot is not for it), a captioned
photo, video, document, audio file or animation, a shared place or contact. Thread
``telegram:<chat id>`` (``:<topic id>`` in a forum topic); user ``telegram:<sender id>``
(``@<chat id>`` in a group). The message id is ``telegram:<chat id>:<message id>``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import Field

from actors.key import ThreadKey
from serve_app.channel_messages import (
    ChannelMessage,
    WireModel,
    read_caption,
    read_contact,
    read_contacts,
    read_place,
)
from stickyray.turns import InboundMessage

__all__ = ["TelegramUpdate", "telegram_messages"]


# Telegram's ids fit in 52 bits; a larger one would make a thread id over its limit.
_TelegramId = Annotated[int, Field(ge=-(2**53), le=2**53)]


class _TelegramChat(WireModel):
    id: _TelegramId
    type: str | None = None  # private, group, supergroup or channel


class _TelegramUser(WireModel):
    id: _TelegramId


class _TelegramLocation(WireModel):
    latitude: float
    longitude: float


class _TelegramVenue(WireModel):
    location: _TelegramLocation
    title: str | None = None
    address: str | None = None


class _TelegramContact(WireModel):
    phone_number: str | None = None
    first_name: str | None = None
    last_name: str | None = None


class _TelegramMessage(WireModel):
    message_id: _TelegramId
    chat: _TelegramChat
    sender: _TelegramUser | None = Field(default=None, alias="from")
    # Sent on behalf of a chat (an anonymous group admin, "send as" a channel): ``from`` is
    # then a placeholder account that every such message in every chat shares.
    sender_chat: _TelegramChat | None = None
    # A channel's post copied into its discussion group: the channel's, not a request.
    is_automatic_forward: bool = False
    text: str | None = None
    # A photo, video, document or audio file with words of the user's own: those are read.
    caption: str | None = None
    photo: list[Any] | None = None
    video: Any = None
    document: Any = None
    audio: Any = None
    animation: Any = None
    # A place the user shared: a venue comes with its location too.
    location: _TelegramLocation | None = None
    venue: _TelegramVenue | None = None
    # A phone contact the user shared (from their address book, or their own number).
    contact: _TelegramContact | None = None
    # A message in a forum topic of a group: the topic is a conversation of its own.
    message_thread_id: _TelegramId | None = None
    is_topic_message: bool = False


class TelegramUpdate(WireModel):
    """A Telegram Bot API ``Update``; only new messages are read (not edits, not posts)."""

    update_id: int
    message: _TelegramMessage | None = None


# The command may end in the punctuation the thread's command parser takes ("/reset@Bot.").
_ADDRESSED = re.compile(r"^(/[A-Za-z0-9_]+)@([A-Za-z0-9_]+)(?=[.!?]*(?:\s|$))")


def _command(text: str, username: str | None) -> str | None:
    """``text`` as this bot's: ``/supervisor@ShopBot ...`` becomes ``/supervisor ...`` when
    the bot is ShopBot; None when the command names another bot (it is not for this one)."""
    addressed = _ADDRESSED.match(text)
    if addressed is None:
        return text
    if username is None or addressed.group(2).lower() != username.lower():
        return None
    return addressed.group(1) + text[addressed.end() :]


# A Telegram user's first message is ``/start`` (and a deep link's payload, if they came by
# one): the user opening the chat, not one of the thread's commands.
_START = re.compile(r"^/start(?:\s+(.*?))?\s*$", re.DOTALL)


def _greeting(text: str) -> str:
    """``text``, unless it is ``/start``: then "Hello", or "Hello (<payload>)" with one."""
    start = _START.match(text)
    if start is None:
        return text
    return f"Hello ({start.group(1)})" if start.group(1) else "Hello"


def telegram_messages(update: TelegramUpdate, username: str | None = None) -> list[ChannelMessage]:
    """The text message in ``update`` (``/start`` as a greeting), a captioned file's caption,
    a shared place or contact (none for anything else, or for a command addressed to another
    bot than ``username``)."""
    message = update.message
    if message is None or message.is_automatic_forward:
        return []
    if message.text is not None:
        text = _command(message.text, username)
        text = _greeting(text) if text is not None else None
    elif message.venue is not None:
        venue = message.venue
        text = read_place(
            venue.location.latitude, venue.location.longitude, venue.title, venue.address
        )
    elif message.location is not None:
        text = read_place(message.location.latitude, message.location.longitude)
    elif message.contact is not None:
        card = message.contact
        name = " ".join(n.strip() for n in (card.first_name, card.last_name) if n and n.strip())
        text = read_contacts([read_contact(name, card.phone_number)])
    else:
        # An animation comes with a document too (the Bot API keeps both): it goes first.
        kinds = ("photo", "video", "animation", "audio", "document")
        kind = next((k for k in kinds if getattr(message, k) is not None), None)
        # A caption addressed to another bot ("/scan@OtherBot") is not for this one either.
        caption = _command(message.caption, username) if message.caption is not None else None
        text = read_caption(kind, caption) if kind is not None else None
    if text is None:
        return []
    chat = message.chat.id
    thread, reply_to = f"telegram:{chat}", {"channel": "telegram", "chat_id": chat}
    if message.is_topic_message and message.message_thread_id is not None:
        thread += f":{message.message_thread_id}"
        reply_to["message_thread_id"] = message.message_thread_id
    return [
        ChannelMessage(
            key=ThreadKey.of(thread),
            message=InboundMessage(
                text=text,
                message_id=f"telegram:{chat}:{message.message_id}",
                user_id=_telegram_user(message),
                channel="telegram",
            ),
            reply_to=reply_to,
        )
    ]


def _telegram_user(message: _TelegramMessage) -> str | None:
    """Whose memories a Telegram message makes and recalls.

    The sender's; in a group, the sender's in that group only, so nothing said in a private
    chat is recalled in front of the group (nor the other way round). A message on behalf of
    a chat has no person behind it: its memories stay the thread's, rather than those of
    the placeholder sender Telegram gives every such message in every chat.
    """
    if message.sender is None or message.sender_chat is not None:
        return None
    if message.chat.type in ("group", "supergroup"):
        return f"telegram:{message.sender.id}@{message.chat.id}"
    return f"telegram:{message.sender.id}"
