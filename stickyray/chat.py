"""``stickyray chat``: a terminal client that shows which agent answered each turn."""

from __future__ import annotations

import sys
import uuid
from typing import TextIO

import httpx

from actors.key import ThreadKey
from stickyray.errors import InvalidThreadKey

__all__ = ["run_chat"]


def run_chat(
    url: str, thread: str | None, stdin: TextIO | None = None, api_key: str | None = None
) -> int:
    """Read lines from stdin, send each to the thread, print the agent and reply.

    ``api_key``: the server's ``STICKYRAY_API_KEY``, if it has one.
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
    with httpx.Client(base_url=url, timeout=120, headers=headers) as client:
        while True:
            if source is sys.stdin:
                print("you> ", end="", flush=True)
            line = source.readline()
            if not line:
                print()
                return 0
            text = line.strip()
            if not text:
                continue
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # stdin's bytes were not UTF-8 (kept as surrogates)
                print("error: that line is not UTF-8, so it was not sent", file=sys.stderr)
                continue
            try:
                response = client.post(f"/v1/threads/{thread_id}/messages", json={"text": text})
            except httpx.HTTPError as exc:
                print(f"error: cannot reach {url}: {exc}", file=sys.stderr)
                return 1
            if response.status_code != 200:
                print(f"error {response.status_code}: {response.text}", file=sys.stderr)
                continue
            body = response.json()
            for handoff in body.get("handoffs", []):
                print(f"  ({handoff['from']} -> {handoff['to']}: {handoff['reason']})")
            who = body.get("agent") or "stickyray"
            print(f"[{who}] {body['reply']}", flush=True)
