"""Channels: Telegram and WhatsApp webhooks in, their send APIs out.

A webhook authenticates the platform's call, turns each message the agent can read into a
queued run of the chat's thread and answers 200 at once (the platforms wait a few seconds
at most, and call again when they get no 2xx). The run worker answers the run like any
other, then sends its reply back through the same channel (``ChannelSender``), from the run queue's
outbox. The platform's message id is the run's message id, so a webhook the platform
repeats queues nothing twice.

- Telegram (Bot API): ``POST /v1/channels/telegram/webhook``, authenticated by the
  ``X-Telegram-Bot-Api-Secret-Token`` header (the ``secret_token`` given to setWebhook);
  replies go through ``sendMessage``. Thread ``telegram:<chat id>``; user
  ``telegram:<sender id>``.
- WhatsApp (Cloud API): ``GET /v1/channels/whatsapp/webhook`` answers Meta's verification
  challenge; ``POST`` is authenticated by ``X-Hub-Signature-256`` (HMAC-SHA256 of the body
  with the app secret); replies go through ``/<phone number id>/messages``. Thread
  ``whatsapp:<business phone number id>:<user's WhatsApp id>``; user ``whatsapp:<WhatsApp
  id>``.

Photos, videos and documents (and Telegram's audio files and animations) are read by their
caption: the agent gets the words, after a note of what came with them. A tapped WhatsApp
button or list row reads as its title; a shared place as its name, address and coordinates.
Other messages (voice, stickers, reactions, media without a caption) and texts over
``threads.max_message_bytes`` are acknowledged and ignored, and counted. Of WhatsApp's
delivery statuses only a failed one is read: logged, counted as a failed reply, and noted on
the run whose reply it was (found by the message id WhatsApp answered the send with).
"""

from __future__ import annotations

import email.utils
import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal
from urllib.parse import quote

import httpx
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from actors.key import ThreadKey
from actors.run_queue import RunQueue
from stickyray.errors import ChannelSendFailed, MessageIdReused
from stickyray.metrics import record_channel_message, record_reply
from stickyray.settings import Settings
from stickyray.turns import InboundMessage, message_text

__all__ = [
    "CHANNELS_PREFIX",
    "CHANNEL_ID_PREFIXES",
    "ChannelInbox",
    "ChannelMessage",
    "ChannelSender",
    "TelegramUpdate",
    "WhatsAppPayload",
    "http_refusal",
    "router",
    "split_text",
    "telegram_messages",
    "whatsapp_messages",
    "whatsapp_signature",
]

log = logging.getLogger(__name__)

Channel = Literal["telegram", "whatsapp"]
# Message ids of channel messages start with these; the HTTP API refuses them.
CHANNEL_ID_PREFIXES = ("telegram:", "whatsapp:")

# Both platforms refuse a text over 4,096 characters; longer replies go in several messages.
MAX_TEXT = 4096
# A webhook call is a few KB; WhatsApp batches at most a few messages in one.
MAX_BODY = 1024 * 1024

CHANNELS_PREFIX = "/v1/channels"
router = APIRouter(prefix=CHANNELS_PREFIX, tags=["channels"])


# -- Wire formats: only the fields stickyray reads; the platforms add fields over time.


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


# Telegram's ids fit in 52 bits; a larger one would make a thread id over its limit.
_TelegramId = Annotated[int, Field(ge=-(2**53), le=2**53)]


class _TelegramChat(_Wire):
    id: _TelegramId
    type: str | None = None  # private, group, supergroup or channel


class _TelegramUser(_Wire):
    id: _TelegramId


class _TelegramLocation(_Wire):
    latitude: float
    longitude: float


class _TelegramVenue(_Wire):
    location: _TelegramLocation
    title: str | None = None
    address: str | None = None


class _TelegramContact(_Wire):
    phone_number: str | None = None
    first_name: str | None = None
    last_name: str | None = None


class _TelegramMessage(_Wire):
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


class TelegramUpdate(_Wire):
    """A Telegram Bot API ``Update``; only new messages are read (not edits, not posts)."""

    update_id: int
    message: _TelegramMessage | None = None


class _WhatsAppText(_Wire):
    body: str


class _WhatsAppMedia(_Wire):
    caption: str | None = None


class _WhatsAppButton(_Wire):
    """A quick-reply button of a template message, as the user tapped it."""

    text: str | None = None


class _WhatsAppChoice(_Wire):
    """A reply button or a list row of an interactive message, as the user chose it."""

    title: str | None = None
    description: str | None = None


class _WhatsAppInteractive(_Wire):
    type: str | None = None
    button_reply: _WhatsAppChoice | None = None
    list_reply: _WhatsAppChoice | None = None


class _WhatsAppLocation(_Wire):
    latitude: float
    longitude: float
    name: str | None = None
    address: str | None = None


class _WhatsAppName(_Wire):
    formatted_name: str | None = None


class _WhatsAppPhone(_Wire):
    phone: str | None = None


class _WhatsAppEmail(_Wire):
    email: str | None = None


class _WhatsAppContact(_Wire):
    name: _WhatsAppName | None = None
    phones: list[_WhatsAppPhone] = Field(default_factory=list)
    emails: list[_WhatsAppEmail] = Field(default_factory=list)


class _WhatsAppMessage(_Wire):
    sender: str = Field(alias="from", pattern=r"^[A-Za-z0-9][A-Za-z0-9._=-]{0,63}$")
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


class _WhatsAppMetadata(_Wire):
    phone_number_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._=-]{0,47}$")


class _WhatsAppValue(_Wire):
    metadata: _WhatsAppMetadata | None = None
    # Each is read on its own (``_readable``): one Meta changed the shape of must not keep
    # the others of its call from being answered.
    messages: list[Any] = Field(default_factory=list)
    # What became of the business's own messages (``_failed_replies``), read on their own too.
    statuses: list[Any] = Field(default_factory=list)


class _WhatsAppError(_Wire):
    code: int | None = None
    title: str | None = None


class _WhatsAppStatus(_Wire):
    """What became of a message the business sent: sent, delivered, read or failed."""

    status: str
    id: str | None = None  # the wamid Meta answered the send with
    recipient_id: str | None = None
    errors: list[_WhatsAppError] = Field(default_factory=list)


class _WhatsAppChange(_Wire):
    field: str
    value: _WhatsAppValue


class _WhatsAppEntry(_Wire):
    changes: list[_WhatsAppChange] = Field(default_factory=list)


class WhatsAppPayload(_Wire):
    """A WhatsApp Cloud API webhook call: messages and statuses of business numbers."""

    object: str
    entry: list[_WhatsAppEntry] = Field(default_factory=list)


@dataclass(frozen=True)
class ChannelMessage:
    """A platform message as a run: its thread, the message, and where the reply goes."""

    key: ThreadKey
    message: InboundMessage
    reply_to: dict[str, Any]


_ADDRESSED = re.compile(r"^(/[A-Za-z0-9_]+)@([A-Za-z0-9_]+)(?=\s|$)")


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


def _captioned(kind: str, caption: str | None) -> str | None:
    """What the agent reads of a photo, video, document... that the user sent with words:
    the words, after a note of what came with them, which the agent cannot see."""
    if caption is None or not caption.strip():
        return None
    return f"[{kind} attached, not shown] {caption}"


def _place(
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


def _contact(name: str | None, *ways: str | None) -> str | None:
    """What the agent reads of a contact card the user shared: its name, then its phones
    and emails; None for a card with none of them."""
    said = [w.strip() for w in (name, *ways) if w is not None and w.strip()]
    return ", ".join(said) if said else None


def _contacts(cards: list[str | None]) -> str | None:
    read = [card for card in cards if card is not None]
    return "[contact shared] " + "; ".join(read) if read else None


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
        return _place(at.latitude, at.longitude, at.name, at.address)
    if message.type == "contacts" and message.contacts is not None:
        return _contacts(
            [
                _contact(
                    card.name.formatted_name if card.name else None,
                    *(p.phone for p in card.phones),
                    *(e.email for e in card.emails),
                )
                for card in message.contacts
            ]
        )
    media = getattr(message, message.type, None)
    caption = media.caption if isinstance(media, _WhatsAppMedia) else None
    return _captioned(message.type, caption)


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
        text = _place(venue.location.latitude, venue.location.longitude, venue.title, venue.address)
    elif message.location is not None:
        text = _place(message.location.latitude, message.location.longitude)
    elif message.contact is not None:
        card = message.contact
        name = " ".join(n.strip() for n in (card.first_name, card.last_name) if n and n.strip())
        text = _contacts([_contact(name, card.phone_number)])
    else:
        # An animation comes with a document too (the Bot API keeps both): it goes first.
        kinds = ("photo", "video", "animation", "audio", "document")
        kind = next((k for k in kinds if getattr(message, k) is not None), None)
        # A caption addressed to another bot ("/scan@OtherBot") is not for this one either.
        caption = _command(message.caption, username) if message.caption is not None else None
        text = _captioned(kind, caption) if kind is not None else None
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
                found.append(
                    ChannelMessage(
                        key=ThreadKey.of(f"whatsapp:{number}:{message.sender}"),
                        message=InboundMessage(
                            text=text,
                            message_id=f"whatsapp:{digest}",
                            user_id=f"whatsapp:{message.sender}",
                            channel="whatsapp",
                        ),
                        reply_to={
                            "channel": "whatsapp",
                            "phone_number_id": number,
                            "to": message.sender,
                        },
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
class _Failure:
    """A message the business sent that Meta then failed to deliver: whom it was for, why,
    and Meta's id for it (the ``wamid`` the send was answered with), if the status had one."""

    recipient: str
    why: str
    platform_id: str | None = None


def _failed_replies(payload: WhatsAppPayload) -> list[_Failure]:
    """The messages the business sent that Meta then failed to deliver (outside the 24-hour
    window, undeliverable...): one per failed status of ``payload``."""
    failed: list[_Failure] = []
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
                    failed.append(_Failure("unknown recipient", why, platform_id))
                    continue
                why = "; ".join(
                    " ".join(str(w) for w in (e.code, e.title) if w is not None)
                    for e in status.errors
                )
                failed.append(
                    _Failure(
                        status.recipient_id or "unknown recipient",
                        why or "no error given",
                        status.id,
                    )
                )
    return failed


def _count_messages(payload: WhatsAppPayload) -> int:
    return sum(len(c.value.messages) for e in payload.entry for c in e.changes)


def whatsapp_signature(body: bytes, app_secret: str) -> str:
    """The ``X-Hub-Signature-256`` header Meta sends with ``body``."""
    return "sha256=" + hmac.new(app_secret.encode(), body, hashlib.sha256).hexdigest()


def _same(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


@dataclass
class ChannelInbox:
    """What the webhooks need from the ingress: the run queue and the settings."""

    runs: RunQueue
    settings: Settings
    app: str
    max_message_bytes: int

    async def queue(self, channel: Channel, messages: list[ChannelMessage], total: int) -> dict:
        """Queue ``messages`` (of ``total`` received) as runs; what became of them."""
        counts = {"queued": 0, "duplicate": 0, "ignored": total - len(messages)}
        for found in messages:
            try:
                text = message_text(found.message.text)
            except ValueError as exc:
                log.info("%s message %s ignored: %s", channel, found.message.message_id, exc)
                counts["ignored"] += 1
                continue
            size = len(text.encode("utf-8"))
            if size > self.max_message_bytes:
                log.warning(
                    "%s message %s ignored: %d bytes, over threads.max_message_bytes (%d)",
                    channel,
                    found.message.message_id,
                    size,
                    self.max_message_bytes,
                )
                counts["ignored"] += 1
                continue
            message = found.message.model_copy(update={"text": text})
            try:
                _, queued = await self.runs.submit(found.key, message, found.reply_to)
            except MessageIdReused:
                # The platform's message, delivered again and read differently (by a newer
                # release, say): the first reading was queued and stands.
                log.warning(
                    "%s message %s: delivered again, read differently; the first reading stands",
                    channel,
                    message.message_id,
                )
                queued = False
            counts["queued" if queued else "duplicate"] += 1
        for outcome, n in counts.items():
            record_channel_message(self.app, channel, outcome, n)
        return counts


def _inbox(request: Request) -> ChannelInbox:
    inbox: ChannelInbox | None = getattr(request.app.state, "channels", None)
    if inbox is None:  # pragma: no cover - the ingress sets it before serving
        raise HTTPException(503, "channels are not ready")
    return inbox


async def _body(request: Request) -> bytes:
    """The request's body; 413 as soon as it passes what any platform sends, before it is
    read whole (or authenticated)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise HTTPException(413, f"body: over {MAX_BODY} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise HTTPException(413, f"body: over {MAX_BODY} bytes")
    return bytes(body)


def _parse(model: type[BaseModel], body: bytes) -> Any:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = [{**err, "loc": ("body", *err["loc"])} for err in exc.errors()]
        raise RequestValidationError(errors) from None


@router.post("/telegram/webhook")
async def telegram_webhook(request: Request) -> dict:
    """A Telegram update: its text message is queued as a run; the reply is sent back."""
    inbox = _inbox(request)
    settings = inbox.settings
    if settings.telegram_bot_token is None or settings.telegram_webhook_secret is None:
        raise HTTPException(
            404,
            "the telegram channel is not set up: set TELEGRAM_BOT_TOKEN and "
            "TELEGRAM_WEBHOOK_SECRET",
        )
    secret = settings.telegram_webhook_secret.get_secret_value()
    if not _same(request.headers.get("x-telegram-bot-api-secret-token"), secret):
        raise HTTPException(401, "header X-Telegram-Bot-Api-Secret-Token: missing or wrong")
    update = _parse(TelegramUpdate, await _body(request))
    messages = telegram_messages(update, settings.telegram_bot_username)
    return await inbox.queue("telegram", messages, 1)


@router.get("/whatsapp/webhook", response_class=PlainTextResponse)
async def whatsapp_verify(
    request: Request,
    mode: str = Query(alias="hub.mode"),
    token: str = Query(alias="hub.verify_token"),
    challenge: str = Query(alias="hub.challenge", max_length=256),
) -> str:
    """Meta's check when the webhook is registered: echo the challenge if the token is ours."""
    settings = _inbox(request).settings
    if settings.whatsapp_access_token is None or settings.whatsapp_verify_token is None:
        raise HTTPException(404, "the whatsapp channel is not set up: set WHATSAPP_ACCESS_TOKEN")
    if mode != "subscribe" or not _same(token, settings.whatsapp_verify_token.get_secret_value()):
        raise HTTPException(403, "query hub.verify_token: does not match WHATSAPP_VERIFY_TOKEN")
    return challenge


@router.post("/whatsapp/webhook")
async def whatsapp_webhook(request: Request) -> dict:
    """A WhatsApp webhook call: each message the agent can read is queued as a run of its
    chat; one in a shape stickyray does not read is counted as ignored. A status saying a
    reply failed is logged, counted, and noted on its run."""
    inbox = _inbox(request)
    settings = inbox.settings
    if settings.whatsapp_access_token is None or settings.whatsapp_app_secret is None:
        raise HTTPException(404, "the whatsapp channel is not set up: set WHATSAPP_ACCESS_TOKEN")
    body = await _body(request)
    expected = whatsapp_signature(body, settings.whatsapp_app_secret.get_secret_value())
    if not _same(request.headers.get("x-hub-signature-256"), expected):
        raise HTTPException(401, "header X-Hub-Signature-256: missing or wrong")
    payload = _parse(WhatsAppPayload, body)
    messages = whatsapp_messages(payload)
    queued = await inbox.queue("whatsapp", messages, _count_messages(payload))
    # Meta accepts a reply, then may report its failure here, by the wamid it answered the
    # send with: the run that reply was of notes it (its reply: failed). All are noted
    # before any is counted: refused (Redis down), Meta sends the whole call again.
    failures = _failed_replies(payload)
    runs = [
        await inbox.runs.not_delivered(failure.platform_id, f"not delivered: {failure.why}")
        if failure.platform_id is not None
        else None
        for failure in failures
    ]
    for failure, run in zip(failures, runs, strict=True):
        whose = failure.recipient if run is None else f"{failure.recipient} (run {run})"
        log.warning("whatsapp reply to %s failed after Meta accepted it: %s", whose, failure.why)
        record_reply(inbox.app, "whatsapp", "failed")
    return queued


def _units(text: str) -> int:
    """Length as the platforms count it: UTF-16 code units (an emoji may be two)."""
    return len(text.encode("utf-16-le")) // 2


def split_text(text: str, limit: int = MAX_TEXT) -> list[str]:
    """``text`` in pieces of at most ``limit`` UTF-16 units that join back into ``text``
    (less whitespace no piece could hold): each cut after a line break, or else a space, in
    the second half of its piece."""
    pieces: list[str] = []
    while _units(text) > limit:
        end = limit
        while _units(text[:end]) > limit:
            end -= 1
        cut = text.rfind("\n", end // 2, end)
        if cut < 0:
            cut = text.rfind(" ", end // 2, end)
        cut = cut + 1 if cut >= 0 else end  # the separator ends its piece
        _add_piece(pieces, text[:cut], limit)
        text = text[cut:]
    _add_piece(pieces, text, limit)
    return pieces


def _add_piece(pieces: list[str], piece: str, limit: int) -> None:
    # Telegram refuses a message of whitespace alone ("message text is empty"), which would
    # fail a reply whose every word was sent: such a piece ends the one before it when it
    # fits, else it is dropped (it shows nothing). The cut depends on the text alone, so a
    # worker that takes over a reply counts the same pieces as the one that started it.
    if piece.strip():
        pieces.append(piece)
    elif pieces and _units(pieces[-1] + piece) <= limit:
        pieces[-1] += piece


# Meta answers throttling and its own outages with HTTP 400 and one of these codes: they pass.
_WHATSAPP_TRANSIENT = {1, 2, 4, 17, 341, 613, 80007, 130429, 131000, 131016, 131048, 131056, 133004}


class ChannelSender:
    """Sends replies through the platforms' HTTP APIs (one client, one pool of connections).

    One call sends one message of at most ``MAX_TEXT`` units; ``split_text`` cuts longer
    replies, so that a piece that fails is sent again alone.
    """

    def __init__(self, settings: Settings, timeout_s: float = 15.0) -> None:
        self._settings = settings
        self._client = httpx.AsyncClient(timeout=timeout_s)
        # httpx logs each request's URL at INFO, and a Telegram URL holds the bot's token.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        self._secrets = [
            form
            for secret in (settings.telegram_bot_token, settings.whatsapp_access_token)
            if secret is not None
            for form in (secret.get_secret_value(), quote(secret.get_secret_value(), safe=""))
        ]

    async def aclose(self) -> None:
        await self._client.aclose()

    async def send(self, to: dict[str, Any], text: str) -> str | None:
        """Send ``text`` to the chat ``to`` names; raises ChannelSendFailed. Returns the id
        WhatsApp gave the message (its statuses name it so), None for Telegram."""
        channel = str(to.get("channel"))
        if channel == "telegram":
            await self._telegram(to, text)
            return None
        if channel == "whatsapp":
            return await self._whatsapp(to, text)
        raise ChannelSendFailed(channel, "no such channel", permanent=True)

    async def _telegram(self, to: dict[str, Any], text: str) -> None:
        token = self._settings.telegram_bot_token
        if token is None:
            raise ChannelSendFailed("telegram", "TELEGRAM_BOT_TOKEN is not set", permanent=True)
        url = f"{self._settings.telegram_api_base.rstrip('/')}/bot{token.get_secret_value()}"
        body: dict[str, Any] = {"chat_id": to["chat_id"], "text": text}
        if "message_thread_id" in to:
            body["message_thread_id"] = to["message_thread_id"]
        send = f"{url}/sendMessage"
        try:
            await self._post("telegram", send, body)
        except _Migrated as moved:  # the group became a supergroup: Telegram names its new id
            try:
                await self._post("telegram", send, body | {"chat_id": moved.chat_id})
            except _Migrated:
                raise ChannelSendFailed("telegram", "chat moved twice", permanent=True) from None

    async def _whatsapp(self, to: dict[str, Any], text: str) -> str | None:
        token = self._settings.whatsapp_access_token
        if token is None:
            raise ChannelSendFailed("whatsapp", "WHATSAPP_ACCESS_TOKEN is not set", permanent=True)
        url = f"{self._settings.whatsapp_api_base.rstrip('/')}/{to['phone_number_id']}/messages"
        body = {
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            "to": to["to"],
            "type": "text",
            "text": {"body": text},
        }
        headers = {"Authorization": f"Bearer {token.get_secret_value()}"}
        response = await self._post("whatsapp", url, body, headers)
        try:  # {"messages": [{"id": "wamid...."}], ...}; sent all the same without one
            platform_id = response.json()["messages"][0]["id"]
        except (ValueError, LookupError, TypeError):
            return None
        return platform_id if isinstance(platform_id, str) else None

    def _redacted(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    async def _post(
        self, channel: str, url: str, body: dict, headers: dict[str, str] | None = None
    ) -> httpx.Response:
        try:
            response = await self._client.post(url, json=body, headers=headers)
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:  # fails every time
            reason = self._redacted(f"{type(exc).__name__}: {exc}")
            raise ChannelSendFailed(channel, reason, permanent=True) from None
        except httpx.HTTPError as exc:  # no answer: the platform or the network is down
            reason = self._redacted(f"{type(exc).__name__}: {exc}")
            raise ChannelSendFailed(channel, reason, permanent=False) from None
        if response.is_success:
            return response
        if channel == "telegram" and (moved := _migrated_to(response)) is not None:
            raise _Migrated(moved)
        reason, retry_after, code = http_refusal(response, self._redacted)
        # 429 (too many messages), 5xx and Meta's throttling codes pass; any other 4xx
        # (blocked by the user, a chat that does not exist, a bad token) fails again.
        transient = (
            response.status_code == 429
            or response.status_code >= 500
            or (channel == "whatsapp" and code in _WHATSAPP_TRANSIENT)
        )
        raise ChannelSendFailed(
            channel,
            self._redacted(f"HTTP {response.status_code}: {reason}"),
            not transient,
            retry_after,
        )


class _Migrated(Exception):
    """Telegram's answer for a group upgraded to a supergroup: send to ``chat_id`` instead."""

    def __init__(self, chat_id: int) -> None:
        super().__init__(chat_id)
        self.chat_id = chat_id


def _migrated_to(response: httpx.Response) -> int | None:
    """The chat id a Telegram refusal says the chat moved to, if it says so."""
    try:
        parameters = response.json().get("parameters")
        moved = parameters.get("migrate_to_chat_id")
    except (ValueError, RecursionError, AttributeError):
        return None
    return moved if isinstance(moved, int) and not isinstance(moved, bool) else None


def _retry_after(header: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header: a number of seconds, or an HTTP date."""
    if header is None:
        return None
    if re.fullmatch(r"[0-9]+", header.strip()):
        return float(header)
    try:
        when = email.utils.parsedate_to_datetime(header)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # not an HTTP date (those are in GMT)
        return None
    return max(0.0, when.timestamp() - time.time())


def http_refusal(
    response: httpx.Response, redact: Callable[[str], str] = str
) -> tuple[str, float | None, int | None]:
    """What an HTTP error answer (a platform's, a webhook's) says, how long it asks to wait,
    and its error code. ``redact`` cleans the whole text before it is cut short, so that no
    part of a secret it quotes survives the cut."""
    retry_after = _retry_after(response.headers.get("retry-after"))

    def said(text: str) -> str:
        return redact(text)[:200]

    try:
        body = response.json()
    except (ValueError, RecursionError):  # not JSON, not text, or nested past the parser
        return said(response.text), retry_after, None
    if not isinstance(body, dict):
        return said(str(body)), retry_after, None
    # Telegram: {"ok": false, "description": ..., "parameters": {"retry_after": n}}
    parameters = body.get("parameters")
    if isinstance(parameters, dict) and isinstance(parameters.get("retry_after"), int | float):
        retry_after = float(parameters["retry_after"])
    if isinstance(body.get("description"), str):
        return said(body["description"]), retry_after, None
    # Meta: {"error": {"message": ..., "code": ...}}
    error = body.get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        code = error.get("code")
        return said(error["message"]), retry_after, code if isinstance(code, int) else None
    return said(json.dumps(body)), retry_after, None
