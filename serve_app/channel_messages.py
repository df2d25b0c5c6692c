"""Channel messages: a platform's message as a run, and what every platform's reads as.

A webhook's payload (``channel_telegram``, ``channel_whatsapp``) becomes a ``ChannelMessage``
for each message the agent can read: the thread of its chat, the inbound message, and where
its reply goes. Photos, videos and documents are read by their caption: the agent gets the
words, after a note of what came with them. A shared place reads as its name, address and
coordinates; a shared contact card as its name, phones and emails.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

from actors.key import ThreadKey
from stickyray.turns import InboundMessage

__all__ = [
    "CHANNEL_ID_PREFIXES",
    "ChannelMessage",
    "WireModel",
    "read_caption",
    "read_contact",
    "read_contacts",
    "read_place",
]

# Message ids of channel messages start with these; the HTTP API refuses them.
CHANNEL_ID_PREFIXES = ("telegram:", "whatsapp:")


class WireModel(BaseModel):
    """A platform's wire format: only the fields stickyray reads; the platforms add fields
    over time."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)


@dataclass(frozen=True)
class ChannelMessage:
    """A platform message as a run: its thread, the message, and where the reply goes."""

    key: ThreadKey
    message: InboundMessage
    reply_to: dict[str, Any]


def read_caption(kind: str, caption: str | None) -> str | None:
    """What the agent reads of a photo, video, document... that the user sent with words:
    the words, after a note of what came with them, which the agent cannot see."""
    if caption is None or not caption.strip():
        return None
    return f"[{kind} attached, not shown] {caption}"


def read_place(
    latitude: float, longitude: float, name: str | None = None, address: str | None = None
) -> str:
    """What the agent reads of a location the user shared: its name and address, when the
    platform gives them, then its coordinates."""
    words = ", ".join(w.strip() for w in (name, address) if w is not None and w.strip())
    where = f"{_degrees(latitude)}, {_degrees(longitude)}"
    return f"[location shared] {words} ({where})" if words else f"[location shared] {where}"


def _degrees(value: float) -> str:
    """A coordinate in plain decimals (never ``1e-05`` nor ``-0``), to a tenth of a metre."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def read_contact(name: str | None, *ways: str | None) -> str | None:
    """What the agent reads of a contact card the user shared: its name, then its phones
    and emails; None for a card with none of them."""
    said = [w.strip() for w in (name, *ways) if w is not None and w.strip()]
    return ", ".join(said) if said else None


def read_contacts(cards: list[str | None]) -> str | None:
    """What the agent reads of the contact cards the user shared (``read_contact`` of
    each); None when none of them has anything to read."""
    read = [card for card in cards if card is not None]
    return "[contact shared] " + "; ".join(read) if read else None
