"""Channel replies: sent through Telegram's ``sendMessage`` and WhatsApp's ``/messages``.

The run worker sends each reply from the run queue's outbox through ``ChannelSender``, to the
chat its run's ``reply_to`` names. Both platforms refuse a text over 4,096 characters:
``split_text`` cuts a longer reply into pieces, each sent on its own. A refusal raises
``ChannelSendFailed``, permanent unless sending again can help (429, 5xx, Meta's throttling
codes), with how long the platform asks to wait (``http_refusal``). A Telegram group that
became a supergroup is sent to again under its new id. A WhatsApp user is sent to by phone
number, or by business-scoped user id when that is all Meta gave.
"""

from __future__ import annotations

import email.utils
import json
import logging
import re
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import httpx

from stickyray.errors import ChannelSendFailed
from stickyray.settings import Settings

__all__ = ["MAX_TEXT", "ChannelSender", "http_refusal", "split_text"]

# Both platforms refuse a text over 4,096 characters; longer replies go in several messages.
MAX_TEXT = 4096


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
        # A phone number goes in ``to``; a business-scoped user id (a user known only by it)
        # in ``recipient``.
        recipient = {"to": to["to"]} if "to" in to else {"recipient": to["recipient"]}
        body = {
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            **recipient,
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
