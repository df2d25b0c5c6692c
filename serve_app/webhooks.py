"""Sends run outcomes to webhooks: signed POSTs, to allowed URLs only (see stickyray.webhooks)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import httpx
from standardwebhooks.webhooks import Webhook

from serve_app.channels import http_refusal
from stickyray.errors import ChannelSendFailed
from stickyray.webhooks import WEBHOOK_CHANNEL, url_refusal

__all__ = ["WebhookSender"]


class WebhookSender:
    """POSTs signed run outcomes (one client, one pool of connections).

    ``send`` raises ChannelSendFailed (channel ``webhook``), ``permanent`` when sending again
    cannot help: a 4xx other than 408 and 429, a redirect, a URL no longer allowed.
    """

    def __init__(self, secret: str | None, prefixes: list[str], timeout_s: float = 15.0) -> None:
        self._signer = Webhook(secret) if secret is not None else None
        self._prefixes = prefixes
        # Redirects are refused, never followed: the allowed URL is the only one called.
        self._client = httpx.AsyncClient(timeout=timeout_s, follow_redirects=False)
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
            response = await self._client.post(url, content=body, headers=headers)
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:  # fails every time
            raise _failed(f"{type(exc).__name__}: {exc}", permanent=True) from None
        except httpx.HTTPError as exc:  # no answer: the receiver or the network is down
            raise _failed(f"{type(exc).__name__}: {exc}", permanent=False) from None
        if response.is_success:
            return
        status = response.status_code
        if response.is_redirect:
            raise _failed(f"HTTP {status}: redirects are not followed", permanent=True)
        reason, retry_after, _ = http_refusal(response)
        transient = status in (408, 429) or status >= 500
        raise _failed(f"HTTP {status}: {reason}", permanent=not transient, retry_after=retry_after)


def _failed(reason: str, *, permanent: bool, retry_after: float | None = None) -> ChannelSendFailed:
    return ChannelSendFailed(WEBHOOK_CHANNEL, reason, permanent=permanent, retry_after=retry_after)
