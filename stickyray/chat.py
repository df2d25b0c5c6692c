"""``stickyray chat``: a terminal client that shows which agent answered each turn."""

from __future__ import annotations

import logging
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

import httpx

from actors.key import ThreadKey
from stickyray.errors import InvalidThreadKey

__all__ = ["run_chat"]

# No read timeout: one turn may make several model calls, each retried for minutes, and
# giving up early would only lose an answer the server goes on to produce.
_TIMEOUT = httpx.Timeout(None, connect=10.0)
# Errors raised before the request reached the server.
_UNREACHABLE = (httpx.ConnectError, httpx.ConnectTimeout, httpx.ProxyError)


def run_chat(
    url: str, thread: str | None, stdin: TextIO | None = None, api_key: str | None = None
) -> int:
    """Read lines from stdin, send each to the thread, print the agent and reply.

    ``api_key``: the server's ``STICKYRAY_API_KEY``, if it has one. Returns 2 for a thread
    id or URL refused up front, 1 when a line got no answer it could show, else 0.
    """
    thread_id = thread or f"chat-{uuid.uuid4().hex[:8]}"
    try:
        ThreadKey.of(thread_id)  # the server's rule, checked before the first line is typed
    except InvalidThreadKey as exc:
        print(f"stickyray: thread id {thread_id!r}: {exc.reason}", file=sys.stderr)
        return 2
    problem = _url_problem(url)
    if problem is not None:
        print(f"stickyray: --url {url!r}: {problem}", file=sys.stderr)
        return 2
    source = stdin or sys.stdin
    print(f"thread {thread_id} at {url}  (/help for commands, Ctrl-D or Ctrl-C to quit)")
    try:
        return _converse(url, thread_id, source, api_key)
    except KeyboardInterrupt:
        print()
        return 0


def _url_problem(url: str) -> str | None:
    """What is wrong with the server URL, checked before the first line is typed."""
    example = "give the server's address, e.g. http://127.0.0.1:8000"
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        return f"not a URL ({exc}): {example}"
    if parsed.scheme not in ("http", "https") or not parsed.host:
        return f"needs http:// or https:// and a host: {example}"
    return None


def _converse(url: str, thread_id: str, source: TextIO, api_key: str | None) -> int:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    if source is sys.stdin:
        _keep_undecodable_bytes(source)
    unanswered = False
    # The last line whose answer was not shown, and the message id it was sent with:
    # the same line typed again next reuses the id, so the server answers from the stored
    # turn instead of running it a second time.
    pending: tuple[str, str] | None = None
    with (
        _quiet_http_logs(),
        httpx.Client(base_url=url, timeout=_TIMEOUT, headers=headers) as client,
    ):
        while True:
            if source is sys.stdin:
                print("you> ", end="", flush=True)
            try:
                line = source.readline()
            except UnicodeDecodeError:  # a stream that could not be made lenient
                print("error: that line is not UTF-8, so it was not sent", file=sys.stderr)
                continue
            if not line:
                print()
                return 1 if unanswered else 0
            text = line.strip()
            if not text:
                continue
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # stdin's bytes were not UTF-8 (kept as surrogates)
                print("error: that line is not UTF-8, so it was not sent", file=sys.stderr)
                continue
            message_id = pending[1] if pending and pending[0] == text else uuid.uuid4().hex
            pending = (text, message_id)
            try:
                response = client.post(
                    f"/v1/threads/{thread_id}/messages",
                    json={"text": text, "message_id": message_id},
                )
            except _UNREACHABLE as exc:  # nothing was sent
                print(f"error: cannot reach {url}: {_reason(exc)}", file=sys.stderr)
                unanswered = True
                continue
            except httpx.HTTPError as exc:  # sent, and the answer did not come back whole
                print(
                    f"error: no answer yet ({_reason(exc)}): the turn may still complete; "
                    "type the same line again to get its reply without running it twice",
                    file=sys.stderr,
                )
                unanswered = True
                continue
            if response.status_code != 200:  # refused, or a proxy's page: not answered
                print(f"error {response.status_code}: {response.text}", file=sys.stderr)
                unanswered = True
                continue
            shown = _show(response)
            if shown is not None:
                print(shown, flush=True)
                pending = None
            else:
                print(
                    f"error: unexpected response (HTTP 200, "
                    f"{response.headers.get('content-type', 'no content type')}): "
                    f"{_excerpt(response.text)}",
                    file=sys.stderr,
                )
                unanswered = True


def _show(response: httpx.Response) -> str | None:
    """The turn as printed (handoffs, then ``[agent] reply``); None for a body that is not one."""
    try:
        body = response.json()
    except ValueError:  # not JSON, or not UTF-8 (UnicodeDecodeError is a ValueError)
        return None
    if not isinstance(body, dict) or not isinstance(body.get("reply"), str):
        return None
    lines = []
    handoffs = body.get("handoffs")
    for handoff in handoffs if isinstance(handoffs, list) else []:
        if isinstance(handoff, dict):
            went = f"{handoff.get('from', '?')} -> {handoff.get('to', '?')}"
            reason = handoff.get("reason")
            lines.append(f"  ({went}: {reason})" if reason else f"  ({went})")
    who = body.get("agent") or "stickyray"
    lines.append(f"[{who}] {body['reply']}")
    return "\n".join(lines)


def _excerpt(text: str, limit: int = 200) -> str:
    """The start of a body, on one line."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit] + "..."


def _reason(exc: httpx.HTTPError) -> str:
    return str(exc) or type(exc).__name__


def _keep_undecodable_bytes(stream: TextIO) -> None:
    """Read bytes that are not UTF-8 as surrogates, so such a line is skipped, not fatal."""
    reconfigure = getattr(stream, "reconfigure", None)
    if reconfigure is None:
        return
    try:
        reconfigure(errors="surrogateescape")
    except (OSError, ValueError):  # not a text file that can be reconfigured
        pass


@contextmanager
def _quiet_http_logs() -> Iterator[None]:
    """Keep httpx's line per request (INFO) out of the conversation."""
    loggers = [logging.getLogger(name) for name in ("httpx", "httpcore")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
