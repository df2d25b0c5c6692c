"""Channels: the Telegram and WhatsApp webhooks, from the platform's call to queued runs.

A webhook authenticates the platform's call, turns each message the agent can read into a
queued run of the chat's thread and answers 200 at once (the platforms wait a few seconds
at most, and call again when they get no 2xx). The run worker answers the run like any
other, then sends its reply back through the same channel (``channel_sender``), from the run
queue's outbox. The platform's message id is the run's message id, so a webhook the platform
repeats queues nothing twice.

- Telegram (Bot API): ``POST /v1/channels/telegram/webhook``, authenticated by the
  ``X-Telegram-Bot-Api-Secret-Token`` header (the ``secret_token`` given to setWebhook).
- WhatsApp (Cloud API): ``GET /v1/channels/whatsapp/webhook`` answers Meta's verification
  challenge; ``POST`` is authenticated by ``X-Hub-Signature-256`` (HMAC-SHA256 of the body
  with the app secret).

What each platform's messages read as, and their threads, is in ``channel_telegram`` and
``channel_whatsapp``. Messages the agent cannot read (voice, stickers, reactions, media
without a caption) and texts over ``threads.max_message_bytes`` are acknowledged and ignored,
and counted. Of WhatsApp's delivery statuses only a failed one is read: logged, counted as a
failed reply, and noted on the run whose reply it was (found by the message id WhatsApp
answered the send with).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ValidationError

from actors.run_queue import RunQueue
from serve_app.channel_messages import ChannelMessage
from serve_app.channel_telegram import TelegramUpdate, telegram_messages
from serve_app.channel_whatsapp import (
    WhatsAppPayload,
    count_messages,
    failed_replies,
    whatsapp_messages,
)
from stickyray.errors import MessageIdReused
from stickyray.metrics import record_channel_message, record_reply
from stickyray.settings import Settings
from stickyray.turns import message_text

__all__ = [
    "CHANNELS_PREFIX",
    "MAX_BODY",
    "ChannelInbox",
    "router",
    "whatsapp_signature",
]

log = logging.getLogger(__name__)

Channel = Literal["telegram", "whatsapp"]

# The most a webhook call may hold, per platform. A Telegram update holds one message, a few
# KB; Meta documents WhatsApp's calls (a batch of messages and statuses) as up to 3 MB, and a
# call refused with 413 is sent again until Meta drops it, messages and all.
MAX_BODY = 1024 * 1024
_MAX_BODIES: dict[Channel, int] = {"telegram": MAX_BODY, "whatsapp": 3 * MAX_BODY}

CHANNELS_PREFIX = "/v1/channels"
router = APIRouter(prefix=CHANNELS_PREFIX, tags=["channels"])


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


async def _body(request: Request, channel: Channel) -> bytes:
    """The request's body; 413 as soon as it passes what ``channel``'s platform sends,
    before it is read whole (or authenticated)."""
    cap = _MAX_BODIES[channel]
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise HTTPException(413, f"body: over {cap} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > cap:
            raise HTTPException(413, f"body: over {cap} bytes")
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
    update = _parse(TelegramUpdate, await _body(request, "telegram"))
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
    body = await _body(request, "whatsapp")
    expected = whatsapp_signature(body, settings.whatsapp_app_secret.get_secret_value())
    if not _same(request.headers.get("x-hub-signature-256"), expected):
        raise HTTPException(401, "header X-Hub-Signature-256: missing or wrong")
    payload = _parse(WhatsAppPayload, body)
    messages = whatsapp_messages(payload)
    queued = await inbox.queue("whatsapp", messages, count_messages(payload))
    # Meta accepts a reply, then may report its failure here, by the wamid it answered the
    # send with: the run that reply was of notes it (its reply: failed). All are noted
    # before any is counted: refused (Redis down), Meta sends the whole call again.
    failures = failed_replies(payload)
    runs = [
        await inbox.runs.replies.not_delivered(failure.platform_id, f"not delivered: {failure.why}")
        if failure.platform_id is not None
        else None
        for failure in failures
    ]
    for failure, run in zip(failures, runs, strict=True):
        whose = failure.recipient if run is None else f"{failure.recipient} (run {run})"
        log.warning("whatsapp reply to %s failed after Meta accepted it: %s", whose, failure.why)
        record_reply(inbox.app, "whatsapp", "failed")
    return queued
