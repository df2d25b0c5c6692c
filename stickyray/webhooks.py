"""Run webhooks: a queued run's outcome POSTed to a URL its caller gave, signed.

- Which URLs a caller may give is the operator's list (``runs.webhook_urls`` in
  ``agents.yaml``): a run's URL must have the scheme, host and port of one of them and a path
  at or under its path. Nothing else is called, so a caller cannot make the run worker reach
  an internal address; redirects are not followed, for the same reason.
- Each delivery is signed as Standard Webhooks specifies (``webhook-id``,
  ``webhook-timestamp`` and ``webhook-signature`` headers, HMAC-SHA256 with the
  ``whsec_`` secret in ``STICKYRAY_WEBHOOK_SECRET``), so any of that specification's
  libraries verifies it. ``webhook-id`` is the same on every retry of a delivery.
- The body is the run as ``GET /v1/threads/{id}/runs/{message_id}`` shows it, without the
  fields about its own delivery, under ``{"type": "run.finished", "timestamp", "data"}``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING
from urllib.parse import unquote_to_bytes

import httpx

from stickyray.errors import ConfigError

if TYPE_CHECKING:
    from actors.run_records import RunRecord
    from stickyray.config import TeamConfig
    from stickyray.settings import Settings

__all__ = [
    "WEBHOOK_CHANNEL",
    "check_webhooks",
    "check_secret",
    "normalize_prefix",
    "receiver_of",
    "url_refusal",
    "webhook_body",
    "webhook_id",
]

# The ``channel`` of a run's reply address when its outcome goes to a webhook.
WEBHOOK_CHANNEL = "webhook"
MAX_URL_LENGTH = 2048
# Standard Webhooks' secrets are 24 to 64 random bytes, base64 after "whsec_".
_SECRET_BYTES = (24, 64)
_EVENT = "run.finished"
# Fields of a run's record about the delivery of its own reply: not news to its receiver.
_DELIVERY_FIELDS = {"reply", "reply_error"}


# In a path, what a server may turn into another path than the one checked: encoded dots,
# slashes, backslashes, percent signs (encoded twice) and NULs, overlong UTF-8 (%c0, %c1)
# and IIS's %u escapes, and ";" (Tomcat, Jetty and Spring read "/..;/" as "/../").
_AMBIGUOUS = (b"%2e", b"%2f", b"%5c", b"%25", b"%00", b"%c0", b"%c1", b"%u", b"\\", b";")
# A "%" that starts no escape is sent as it is, and a server that decodes twice reads
# "%2%65" as "%2e" and then "."; escapes that decode to no UTF-8 (overlong forms of any
# length, as "%e0%80%ae" for ".") are read as "." or "/" by lenient decoders.
_BARE_PERCENT = re.compile(rb"%(?![0-9A-Fa-f]{2})")


def _parse(url: str) -> tuple[httpx.URL, bytes]:
    """``url`` parsed (dot segments removed, host lowercased) and its path as sent; ValueError
    if it cannot be called: not absolute http(s), credentials in it, or a path that a server
    may read as another (see ``_AMBIGUOUS``)."""
    if len(url) > MAX_URL_LENGTH:
        raise ValueError(f"is over {MAX_URL_LENGTH} characters")
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ValueError(f"is not a URL ({exc})") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError("must be an absolute http:// or https:// URL")
    if parsed.userinfo:
        raise ValueError("must not hold credentials (user:password@)")
    path = parsed.raw_path.split(b"?", 1)[0]
    if (
        any(part in path.lower() for part in _AMBIGUOUS)
        or _BARE_PERCENT.search(path)
        or not _utf8(unquote_to_bytes(path))
    ):
        raise ValueError(
            "must not have encoded dots, slashes, backslashes, percent signs or NULs, a '%' "
            "that starts no escape, escapes that are not UTF-8 (overlong ones) or %u escapes, "
            "nor ';', in its path"
        )
    return parsed, path


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def normalize_prefix(prefix: str) -> str:
    """An allowed URL prefix as ``runs.webhook_urls`` keeps it; ValueError saying why not."""
    parsed, path = _parse(prefix)
    if parsed.query or "#" in prefix:
        raise ValueError("must not have a query or a fragment: it is a prefix of URLs")
    origin = str(parsed.copy_with(raw_path=b"/")).removesuffix("/")
    return origin + (path.rstrip(b"/") or b"/").decode("ascii")


def receiver_of(url: str) -> str:
    """The server a webhook URL calls, as ``url_refusal`` compares them: scheme, host
    (lowercased) and port (the scheme's default left out), whatever the URL's spelling."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        return url  # refused when sent; its own receiver meanwhile
    port = f":{parsed.port}" if parsed.port is not None else ""
    return f"{parsed.scheme}://{parsed.host}{port}"


def url_refusal(url: str, prefixes: list[str]) -> str | None:
    """Why a run may not call ``url`` (None: it may) under the allowed ``prefixes``.

    Paths are compared as sent (percent-encoded), so one the prefix does not cover in so many
    bytes is refused even if a server would decode it to one it covers.
    """
    if not prefixes:
        return "webhooks are off: list the URLs they may call in agents.yaml runs.webhook_urls"
    try:
        parsed, path = _parse(url)
    except ValueError as exc:
        return str(exc)
    if "#" in url:
        return "must not have a fragment"
    for prefix, base in (_parse(p) for p in prefixes):
        if (parsed.scheme, parsed.host, parsed.port) != (prefix.scheme, prefix.host, prefix.port):
            continue
        base = base.rstrip(b"/")
        if not base or path == base or path.startswith(base + b"/"):
            return None
    return "is not under any URL in agents.yaml runs.webhook_urls"


def check_secret(secret: str) -> str:
    """``secret`` if Standard Webhooks can sign with it; ValueError saying what to fix."""
    hint = (
        "must be whsec_ followed by the base64 of 24 to 64 random bytes, such as "
        "python -c \"import base64,secrets; print('whsec_' + "
        'base64.b64encode(secrets.token_bytes(32)).decode())"'
    )
    if not secret.startswith("whsec_"):
        raise ValueError(hint)
    try:
        key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(hint) from None
    if not _SECRET_BYTES[0] <= len(key) <= _SECRET_BYTES[1]:
        raise ValueError(hint)
    return secret


def check_webhooks(team: TeamConfig, settings: Settings) -> None:
    """Fail before anything starts when runs may name webhooks that could not be signed."""
    if team.runs.webhook_urls and settings.webhook_secret is None:
        raise ConfigError(
            "agents.yaml lists runs.webhook_urls, so STICKYRAY_WEBHOOK_SECRET must be set: "
            "webhooks are signed, for their receivers to tell them from forgeries"
        )


def webhook_id(record_key: str, entry: str) -> str:
    """The ``webhook-id`` of a delivery: the same on every retry, by any worker, and new for
    every run (a run's record key with its outbox entry, hashed)."""
    digest = hashlib.sha256(f"{record_key}\n{entry}".encode()).hexdigest()
    return f"msg_{digest[:32]}"


def webhook_body(record: RunRecord) -> bytes:
    """The JSON body that tells a webhook how ``record``'s run ended."""
    finished = record.finished_at if record.finished_at is not None else time.time()
    return json.dumps(
        {
            "type": _EVENT,
            "timestamp": datetime.fromtimestamp(finished, UTC).isoformat(),
            "data": record.model_dump(mode="json", by_alias=True, exclude=_DELIVERY_FIELDS),
        },
        ensure_ascii=False,
    ).encode()
