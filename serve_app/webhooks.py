"""Sends run outcomes to webhooks: signed POSTs, to allowed URLs only (see stickyray.webhooks)."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

import httpx
from standardwebhooks.webhooks import Webhook

from serve_app.channel_sender import http_refusal
from stickyray.errors import ChannelSendFailed
from stickyray.webhooks import WEBHOOK_CHANNEL, url_refusal

__all__ = ["WebhookSender"]

# Of an error answer's body, what is read for its reason.
_MAX_ERROR_BODY = 64 * 1024


class WebhookSender:
    """POSTs signed run outcomes (one client, one pool of connections).

    ``send`` raises ChannelSendFailed (channel ``webhook``), ``permanent`` when sending again
    cannot help: a 4xx other than 408 and 429, a redirect, a URL no longer allowed.
    """

    def __init__(self, secret: str | None, prefixes: list[str], timeout_s: float = 15.0) -> None:
        self._signer = Webhook(secret) if secret is not None else None
        self._timeout_s = timeout_s
        self._prefixes = prefixes
        # Redirects are refused, never followed: the allowed URL is the only one called. No
        # cap on connections: the run worker's posting slots bound them, and with httpx's
        # 100 one receiver's calls waiting out their timeout would hold every other's back.
        self._client = httpx.AsyncClient(
            timeout=timeout_s,
            follow_redirects=False,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=20),
        )
        logging.getLogger("httpx").setLevel(logging.WARNING)  # a URL may hold a token

    async def aclose(self) -> None:
        await self._client.aclose()

    async def send(self, url: str, webhook_id: str, body: bytes) -> None:
        """POST ``body`` to ``url``, signed; raises ChannelSendFailed if it is not taken."""
        if self._signer is None:
            raise _failed("STICKYRAY_WEBHOOK_SECRET is not set", permanent=True)
        # Checked again when sending: the list may have shrunk since the run was queued.
        refusal = url_refusal(url, self._prefixes)
        if refusal is not None:
            raise _failed(f"the URL {refusal}", permanent=True)
        now = datetime.now(UTC)
        headers = {
            "content-type": "application/json",
            "user-agent": "stickyray-webhooks",
            "webhook-id": webhook_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": self._signer.sign(webhook_id, now, body),
        }
        try:
            # A receiver that answers a byte at a time passes every per-read timeout: the
            # whole call has one, so a slow receiver cannot hold a sending slot for long.
            async with asyncio.timeout(self._timeout_s):
                return await self._post(url, body, headers)
        except TimeoutError:
            raise _failed(f"no answer within {self._timeout_s:g} s", permanent=False) from None

    async def _post(self, url: str, body: bytes, headers: dict[str, str]) -> None:
        try:
            async with self._client.stream("POST", url, content=body, headers=headers) as answer:
                if answer.is_success:
                    return  # taken: its body, readable or not, says nothing more
                status = answer.status_code
                if answer.is_redirect:
                    raise _failed(f"HTTP {status}: redirects are not followed", permanent=True)
                refused = await _read_refusal(answer)
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:  # fails every time
            raise _failed(f"{type(exc).__name__}: {exc}", permanent=True) from None
        except httpx.HTTPError as exc:  # no answer: the receiver or the network is down
            raise _failed(f"{type(exc).__name__}: {exc}", permanent=False) from None
        reason, retry_after, _ = http_refusal(refused)
        transient = status in (408, 429) or status >= 500
        raise _failed(f"HTTP {status}: {reason}", permanent=not transient, retry_after=retry_after)


async def _read_refusal(answer: httpx.Response) -> httpx.Response:
    """``answer`` with at most ``_MAX_ERROR_BODY`` bytes of its body, as one that was read
    (an unreadable body reads as empty: the status says enough)."""
    body = b""
    try:
        async for chunk in answer.aiter_bytes():
            body += chunk
            if len(body) >= _MAX_ERROR_BODY:
                break
    except httpx.HTTPError:
        pass
    # As sent (bytes): a header value outside ASCII must not make a refusal unreadable.
    headers = [(k, v) for k, v in answer.headers.raw if k.lower() != b"content-encoding"]
    return httpx.Response(answer.status_code, headers=headers, content=body[:_MAX_ERROR_BODY])


def _failed(reason: str, *, permanent: bool, retry_after: float | None = None) -> ChannelSendFailed:
    return ChannelSendFailed(WEBHOOK_CHANNEL, reason, permanent=permanent, retry_after=retry_after)
