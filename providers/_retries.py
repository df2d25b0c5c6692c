"""Retries the SDKs leave undone: a streamed reply that fails after its response began, and a
``Retry-After`` longer than a model call should wait.

The SDKs retry a request until its response starts. A streamed reply can still fail after
that: an overload or server error sent inside the stream, a dropped connection, a stream that
ends before its finish. While none of its text has gone to the caller (who shows what it is
told), the provider makes the whole call again, with backoff. The SDK's retries and these share
one budget: a model call makes at most ``max_retries + 1`` requests in all, each new attempt
given only the SDK retries not yet used (not ``max_retries`` each, which multiplied them).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from providers.model import ModelResponse, TextSink
from stickyray.errors import ProviderError
from stickyray.turns import Usage

__all__ = [
    "MAX_RETRY_AFTER_S",
    "SERVER_ERROR_TYPES",
    "StreamBroke",
    "error_type",
    "refuse_long_retry_after",
    "requests_made",
    "retry_stream",
]

log = logging.getLogger(__name__)

# The OpenAI SDK's own limit; the Anthropic SDK has none and would sleep for an hour if asked.
MAX_RETRY_AFTER_S = 120.0
# Error types (Anthropic's and OpenAI's) that a stream reports for a failure of the server,
# not of the request: a new request may well succeed.
SERVER_ERROR_TYPES = frozenset({"api_error", "overloaded_error", "server_error"})
_MAX_DELAY_S = 8.0  # the SDKs' longest backoff
_RETRY_COUNT_HEADER = "x-stainless-retry-count"


class StreamBroke(Exception):
    """A streamed attempt that failed after its response began, in a way the next attempt may
    not; ``usage`` is what the stream reported spending before it broke, ``requests`` how many
    requests the attempt made (the SDK's retries before the response began, and itself)."""

    def __init__(self, detail: str, usage: Usage, requests: int = 1) -> None:
        super().__init__(detail, usage, requests)
        self.detail = detail
        self.usage = usage
        self.requests = requests


def requests_made(response: Any) -> int:
    """How many requests the SDK made to open ``response``: the retry count both SDKs send
    with each request (``x-stainless-retry-count``), plus one."""
    try:
        return int(response.request.headers.get(_RETRY_COUNT_HEADER, 0)) + 1
    except (AttributeError, RuntimeError, TypeError, ValueError):  # no request kept: say one
        return 1


def error_type(body: object) -> str | None:
    """The ``type`` of an API error body: Anthropic's ``{"error": {"type": ...}}``, or the
    error object itself, as the OpenAI SDK keeps it."""
    if not isinstance(body, dict):
        return None
    inner = body.get("error")
    kind = (inner if isinstance(inner, dict) else body).get("type")
    return kind if isinstance(kind, str) else None


async def retry_stream(
    vendor: str,
    agent: str,
    attempt: Callable[[TextSink, int], Awaitable[ModelResponse]],
    on_text: TextSink,
    *,
    retries: int,
    delay_s: float,
) -> ModelResponse:
    """``attempt(sink, sdk_retries)``, made again after a StreamBroke while ``on_text`` has
    been told nothing and fewer than ``retries + 1`` requests were made in all: each attempt
    may have the SDK retry ``sdk_retries`` times, the retries not yet used. What broken
    attempts spent counts in the reply, or, when the last attempt breaks too or fails
    otherwise, in the ProviderError's ``usage``."""
    told = False
    spent = Usage()
    made = 0  # requests, the SDK's retries among them

    async def tell(text: str) -> None:
        nonlocal told
        told = True
        await on_text(text)

    retry = 0
    while True:
        try:
            response = await attempt(tell, retries - made)
        except StreamBroke as broke:
            spent += broke.usage
            made += max(broke.requests, 1)
            if told or made > retries:
                raise ProviderError(vendor, agent, broke.detail, spent.model_dump()) from None
            retry += 1
            wait = min(delay_s * 2 ** (retry - 1), _MAX_DELAY_S) * (1 - 0.25 * random.random())
            log.warning(
                "%s stream for agent %s broke before its text (%s; it spent %d input and %d "
                "output tokens): made again in %.1f s, %d of at most %d requests made",
                vendor,
                agent,
                broke.detail,
                broke.usage.input_tokens,
                broke.usage.output_tokens,
                wait,
                made,
                retries + 1,
            )
            await asyncio.sleep(wait)
            continue
        except ProviderError as failed:  # a retry refused (a 400, a 429 past the SDK's tries)
            if spent == Usage():
                raise
            # The broken attempts before it were paid for all the same.
            total = spent + Usage.model_validate(failed.usage)
            raise ProviderError(vendor, agent, failed.detail, total.model_dump()) from None
        if spent == Usage():
            return response
        return response.model_copy(update={"usage": spent + response.usage})


async def refuse_long_retry_after(response: Any) -> None:
    """An HTTP client response hook: an answer asking for a wait over ``MAX_RETRY_AFTER_S``
    is not retried (``x-should-retry: false``, which both SDKs obey), so the call fails at
    once, as the OpenAI SDK makes it do, instead of holding its turn for as long as asked."""
    wait = _retry_after_s(response.headers)
    if wait is not None and wait > MAX_RETRY_AFTER_S:
        response.headers["x-should-retry"] = "false"


def _retry_after_s(headers: Mapping[str, str]) -> float | None:
    """The seconds to wait, read as the SDKs read them: ``retry-after-ms``, then
    ``Retry-After`` in seconds or as a date."""
    for name, per_second in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        try:
            return float(headers.get(name, "")) / per_second
        except ValueError:
            pass
    date = email.utils.parsedate_tz(headers.get("retry-after", ""))
    return None if date is None else email.utils.mktime_tz(date) - time.time()
