"""A stand-in for the Telegram Bot API and the WhatsApp Cloud API (and a webhook receiver)
on 127.0.0.1.

A real HTTP server in a thread of the test process: it records every call it gets and
answers as the platform does, or with the failures a test queues (``refuse``).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Call:
    """One request the platform got."""

    path: str
    headers: dict[str, str]
    body: Any
    raw: bytes = b""  # the body as sent (what a signature covers)


def whatsapp_sent(call: Call, number: int) -> dict[str, Any]:
    """What the Cloud API answers a message it accepted with."""
    to = call.body.get("to") if isinstance(call.body, dict) else None
    return {
        "messaging_product": "whatsapp",
        "contacts": [{"input": to, "wa_id": to}],
        "messages": [{"id": f"wamid.out{number}"}],
    }


class PlatformServer:
    """Records calls; answers 200 ``{"ok": true}`` unless a refusal is queued."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self._refusals: list[tuple[int, dict[str, Any], dict[str, str]]] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                length = int(self.headers.get("content-length", 0))
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw.decode("utf-8", "replace")
                status, answer, headers = server._answer(
                    Call(self.path, {k.lower(): v for k, v in self.headers.items()}, body, raw)
                )
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _answer(self, call: Call) -> tuple[int, dict[str, Any], dict[str, str]]:
        with self._lock:
            self.calls.append(call)
            if self._refusals:
                return self._refusals.pop(0)
        if call.path.endswith("/messages"):  # WhatsApp's answer: the message's id (wamid)
            return 200, whatsapp_sent(call, len(self.calls)), {}
        return 200, {"ok": True, "result": {"message_id": len(self.calls)}}, {}

    def refuse(
        self,
        status: int,
        body: dict[str, Any],
        times: int = 1,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Answer the next ``times`` calls with ``status`` and ``body``."""
        with self._lock:
            self._refusals.extend([(status, body, headers or {})] * times)

    def texts(self, path_part: str = "") -> list[str]:
        """The texts sent so far (Telegram's ``text``, WhatsApp's ``text.body``), in order."""
        with self._lock:
            calls = [c for c in self.calls if path_part in c.path]
        return [
            c.body["text"]["body"] if "messaging_product" in c.body else c.body["text"]
            for c in calls
        ]

    def wait_calls(self, n: int, timeout: float = 60.0) -> list[Call]:
        """Block until ``n`` calls arrived (polling); all calls so far."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if len(self.calls) >= n:
                    return list(self.calls)
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.calls)} platform calls, waited for {n}")
            time.sleep(0.02)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
