"""WhatsApp (Cloud API): a webhook call read as runs, and as replies that failed.

Each message the agent can read becomes a run of the thread
``whatsapp:<business phone number id>:<user's WhatsApp id>``; user ``whatsapp:<WhatsApp id>``.
The WhatsApp id is the user's phone number, or, for a user Meta names only by their
business-scoped user id (a BSUID: a user with a username, who did not share their number),
the BSUID (a hash of it when it is too long for an id); the reply goes to the same.
Texts are read, a tapped button or list row as its title, a shared place or contact card,
and captioned images, videos and documents; other types are left out. Of the delivery
statuses only a failed one is read: a reply Meta accepted and then could not deliver.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from typing import Any, Self

from pydantic import Field, ValidationError, model_validator

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

__all__ = [
    "FailedReply",
    "WhatsAppPayload",
    "count_messages",
    "failed_replies",
    "whatsapp_messages",
]

log = logging.getLogger(__name__)


class _WhatsAppText(WireModel):
    body: str


class _WhatsAppMedia(WireModel):
    caption: str | None = None


class _WhatsAppButton(WireModel):
    """A quick-reply button of a template message, as the user tapped it."""

    text: str | None = None


class _WhatsAppChoice(WireModel):
    """A reply button or a list row of an interactive message, as the user chose it."""

    title: str | None = None
    description: str | None = None


class _WhatsAppInteractive(WireModel):
    type: str | None = None
    button_reply: _WhatsAppChoice | None = None
    list_reply: _WhatsAppChoice | None = None


class _WhatsAppLocation(WireModel):
    latitude: float
    longitude: float
    name: str | None = None
    address: str | None = None


class _WhatsAppName(WireModel):
    formatted_name: str | None = None


class _WhatsAppPhone(WireModel):
    phone: str | None = None


class _WhatsAppEmail(WireModel):
    email: str | None = None


class _WhatsAppContact(WireModel):
    name: _WhatsAppName | None = None
    phones: list[_WhatsAppPhone] = Field(default_factory=list)
    emails: list[_WhatsAppEmail] = Field(default_factory=list)


# A business-scoped user id: a country code, a period and up to 128 letters and digits
# ("US.13491208655302741918"; a parent BSUID has "ENT." after the country code).
_BSUID = re.compile(r"[A-Za-z0-9][A-Za-z0-9.]{0,255}")
# The longest user id kept as it is in thread and user ids (which hold 128 characters): the
# thread's is ``whatsapp:<number id, up to 48>:<user id>``.
_MAX_USER_ID = 64


class _WhatsAppMessage(WireModel):
    # The user's phone number. Meta leaves it out for a user it names only by their BSUID
    # (``from_user_id``): one who adopted a username and did not share their number.
    sender: str | None = Field(None, alias="from", pattern=r"^[A-Za-z0-9][A-Za-z0-9._=-]{0,63}$")
    sender_user_id: str | None = Field(None, alias="from_user_id")
    id: str = Field(min_length=1)
    type: str
    text: _WhatsAppText | None = None
    image: _WhatsAppMedia | None = None
    video: _WhatsAppMedia | None = None
    document: _WhatsAppMedia | None = None
    button: _WhatsAppButton | None = None
    interactive: _WhatsAppInteractive | None = None
    location: _WhatsAppLocation | None = None
    contacts: list[_WhatsAppContact] | None = None

    @model_validator(mode="after")
    def _has_a_sender(self) -> Self:
        # The BSUID's form is checked only when the message is read by it (no phone number).
        if self.sender is None and (
            self.sender_user_id is None or not _BSUID.fullmatch(self.sender_user_id)
        ):
            raise ValueError("from: missing, and from_user_id missing or not a BSUID")
        return self

    def whom(self) -> tuple[str, dict[str, str]]:
        """Who sent this, as the thread and user ids name them, and the reply's address:
        ``to`` a phone number, or ``recipient`` a BSUID (the Cloud API's fields for each)."""
        if self.sender is not None:
            return self.sender, {"to": self.sender}
        bsuid = self.sender_user_id or ""
        if len(bsuid) <= _MAX_USER_ID:
            return bsuid, {"recipient": bsuid}
        # Too long for an id: a hash, marked by a "-" no BSUID holds.
        return "bsuid-" + hashlib.sha256(bsuid.encode()).hexdigest()[:40], {"recipient": bsuid}


class _WhatsAppMetadata(WireModel):
    phone_number_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._=-]{0,47}$")


class _WhatsAppValue(WireModel):
    metadata: _WhatsAppMetadata | None = None
    # Each is read on its own (``_readable``): one Meta changed the shape of must not keep
    # the others of its call from being answered.
    messages: list[Any] = Field(default_factory=list)
    # What became of the business's own messages (``failed_replies``), read on their own too.
    statuses: list[Any] = Field(default_factory=list)


class _WhatsAppError(WireModel):
    code: int | None = None
    title: str | None = None


class _WhatsAppStatus(WireModel):
    """What became of a message the business sent: sent, delivered, read or failed."""

    status: str
    id: str | None = None  # the wamid Meta answered the send with
    recipient_id: str | None = None
    recipient_user_id: str | None = None  # the BSUID, of a message sent to one
    errors: list[_WhatsAppError] = Field(default_factory=list)


class _WhatsAppChange(WireModel):
    field: str
    value: _WhatsAppValue


class _WhatsAppEntry(WireModel):
    changes: list[_WhatsAppChange] = Field(default_factory=list)


class WhatsAppPayload(WireModel):
    """A WhatsApp Cloud API webhook call: messages and statuses of business numbers."""

    object: str
    entry: list[_WhatsAppEntry] = Field(default_factory=list)


def _chosen(choice: _WhatsAppChoice | None) -> str | None:
    """A tapped reply button or list row, read as if its title were typed (a row's
    description after it)."""
    if choice is None or choice.title is None or not choice.title.strip():
        return None
    if choice.description is not None and choice.description.strip():
        return f"{choice.title} ({choice.description.strip()})"
    return choice.title


def _whatsapp_text(message: _WhatsAppMessage) -> str | None:
    """What the agent reads of a WhatsApp message; None for what it cannot read."""
    if message.type == "text" and message.text is not None:
        return message.text.body
    if message.type == "button" and message.button is not None:
        return message.button.text
    if message.type == "interactive" and message.interactive is not None:
        chosen = message.interactive
        return _chosen(chosen.button_reply or chosen.list_reply)
    if message.type == "location" and message.location is not None:
        at = message.location
        return read_place(at.latitude, at.longitude, at.name, at.address)
    if message.type == "contacts" and message.contacts is not None:
        return read_contacts(
            [
                read_contact(
                    card.name.formatted_name if card.name else None,
                    *(p.phone for p in card.phones),
                    *(e.email for e in card.emails),
                )
                for card in message.contacts
            ]
        )
    media = getattr(message, message.type, None)
    caption = media.caption if isinstance(media, _WhatsAppMedia) else None
    return read_caption(message.type, caption)


def whatsapp_messages(payload: WhatsAppPayload) -> list[ChannelMessage]:
    """The messages of ``payload`` the agent can read, in order: texts, tapped buttons and
    list rows, shared locations, and captioned images, videos and documents (statuses and
    other types are left out)."""
    found: list[ChannelMessage] = []
    for entry in payload.entry:
        for change in entry.changes:
            if change.field != "messages" or change.value.metadata is None:
                continue
            number = change.value.metadata.phone_number_id
            for raw in change.value.messages:
                message = _readable(raw)
                text = _whatsapp_text(message) if message is not None else None
                if message is None or text is None:
                    continue
                # Message ids ("wamid.<base64>") may hold characters a run id cannot.
                digest = hashlib.sha256(message.id.encode()).hexdigest()[:40]
                who, address = message.whom()
                found.append(
                    ChannelMessage(
                        key=ThreadKey.of(f"whatsapp:{number}:{who}"),
                        message=InboundMessage(
                            text=text,
                            message_id=f"whatsapp:{digest}",
                            user_id=f"whatsapp:{who}",
                            channel="whatsapp",
                        ),
                        reply_to={"channel": "whatsapp", "phone_number_id": number, **address},
                    )
                )
    return found


def _readable(raw: Any) -> _WhatsAppMessage | None:
    """One message of a call, or None (logged) when it is in no shape stickyray reads."""
    try:
        return _WhatsAppMessage.model_validate(raw)
    except ValidationError as exc:
        where = ".".join(str(part) for part in exc.errors()[0]["loc"])
        log.warning("whatsapp message ignored: %s: %s", where or "message", exc.errors()[0]["msg"])
        return None


@dataclass(frozen=True)
class FailedReply:
    """A message the business sent that Meta then failed to deliver: whom it was for, why,
    and Meta's id for it (the ``wamid`` the send was answered with), if the status had one."""

    recipient: str
    why: str
    platform_id: str | None = None


def failed_replies(payload: WhatsAppPayload) -> list[FailedReply]:
    """The messages the business sent that Meta then failed to deliver (outside the 24-hour
    window, undeliverable...): one per failed status of ``payload``."""
    failed: list[FailedReply] = []
    for entry in payload.entry:
        for change in entry.changes:
            if change.field != "messages":
                continue
            for raw in change.value.statuses:
                if not isinstance(raw, dict) or raw.get("status") != "failed":
                    continue
                try:
                    status = _WhatsAppStatus.model_validate(raw)
                except ValidationError as exc:  # still a failure: counted, with what was read
                    where = ".".join(str(part) for part in exc.errors()[0]["loc"])
                    why = f"{where}: {exc.errors()[0]['msg']}"
                    platform_id = raw.get("id")
                    if not isinstance(platform_id, str):
                        platform_id = None
                    failed.append(FailedReply("unknown recipient", why, platform_id))
                    continue
                why = "; ".join(
                    " ".join(str(w) for w in (e.code, e.title) if w is not None)
                    for e in status.errors
                )
                failed.append(
                    FailedReply(
                        status.recipient_id or status.recipient_user_id or "unknown recipient",
                        why or "no error given",
                        status.id,
                    )
                )
    return failed


def count_messages(payload: WhatsAppPayload) -> int:
    """How many messages ``payload`` holds, readable or not."""
    return sum(len(c.value.messages) for e in payload.entry for c in e.changes)
