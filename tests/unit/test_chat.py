"""``stickyray chat`` against a small local stand-in for the server's messages route."""

from __future__ import annotations

import io
import json
import logging
import socket
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

import stickyray.chat as chat
from stickyray.chat import run_chat


class FakeServer:
    """Answers ``POST /v1/threads/{id}/messages`` by the text sent (see ``_Handler``)."""

    def __init__(self) -> None:
        self.posts: list[dict[str, str]] = []  # every body received, in order
        self.release = threading.Event()  # lets a held "hang" answer go
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._http.daemon_threads = True
        self._http.fake = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}"

    def start(self) -> None:
        serve = threading.Thread(target=self._http.serve_forever, args=(0.05,), daemon=True)
        serve.start()

    def stop(self) -> None:
        self.release.set()
        self._http.shutdown()
        self._http.server_close()

    def ids_of(self, text: str) -> list[str]:
        return [post.get("message_id", "") for post in self.posts if post["text"] == text]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def _send(
        self,
        data: bytes,
        content_type: str = "application/json",
        length: int = 0,
        status: int = 200,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length or len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        fake: FakeServer = self.server.fake  # type: ignore[attr-defined]
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        fake.posts.append(body)
        text = body["text"]
        turn: dict[str, object] = {"agent": "bookings", "reply": f"ok: {text}", "handoffs": []}
        if text == "html":  # a proxy's page in place of the server's answer
            self._send(b"<html>\n<body>502 Bad Gateway</body>\n</html>", "text/html")
        elif text == "bad gateway":  # the same page with its status
            self._send(b"<html>502 Bad Gateway</html>", "text/html", status=502)
        elif text == "latin-1":
            self._send(b'{"agent": "bookings", "reply": "caf\xe9", "handoffs": []}')
        elif text == "no reply":
            self._send(json.dumps({"status": "failed", "agent": None}).encode())
        elif text == "a list":
            self._send(b"[]")
        elif text == "terse handoff":
            turn["handoffs"] = [{"from": "triage", "to": "bookings"}]
            self._send(json.dumps(turn).encode())
        elif text == "cut" and fake.ids_of("cut").count(body["message_id"]) == 1:
            # The first delivery's answer breaks off; a retry of its id gets it whole.
            data = json.dumps(turn).encode()
            self._send(data[:10], length=len(data))
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        elif text == "hang":
            fake.release.wait(30)
            self._send(json.dumps(turn).encode())
        else:
            self._send(json.dumps(turn).encode())


@pytest.fixture
def server() -> Iterator[FakeServer]:
    fake = FakeServer()
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.mark.parametrize(
    ("line", "shown"),
    [
        ("html", "(HTTP 200, text/html): <html> <body>502 Bad Gateway</body> </html>"),
        ("latin-1", '(HTTP 200, application/json): {"agent": "bookings", "reply": "caf'),
        ("no reply", '(HTTP 200, application/json): {"status": "failed", "agent": null}'),
        ("a list", "(HTTP 200, application/json): []"),
    ],
    ids=["html", "latin-1", "no-reply", "list"],
)
def test_chat_says_what_came_back_when_it_is_no_turn(
    server: FakeServer, line: str, shown: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A body that is not a turn is an error line, and the chat goes on to the next line."""
    assert run_chat(server.url, "t1", stdin=io.StringIO(f"{line}\nhello\n")) == 1
    out, err = capsys.readouterr()
    assert f"error: unexpected response {shown}" in err
    assert "Traceback" not in err
    assert "[bookings] ok: hello" in out


def test_an_error_status_is_a_line_with_no_answer(
    server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 502 page (or a 401, a 422) was shown and the chat still exited 0."""
    lines = "bad gateway\nbad gateway\nhello\n"
    assert run_chat(server.url, "t1", stdin=io.StringIO(lines)) == 1
    out, err = capsys.readouterr()
    assert "error 502: <html>502 Bad Gateway</html>" in err
    assert "[bookings] ok: hello" in out
    first, again = server.ids_of("bad gateway")
    assert first == again  # typed again, the same message id: no second turn if it ran


def test_chat_shows_a_handoff_without_a_reason(
    server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_chat(server.url, "t1", stdin=io.StringIO("terse handoff\n")) == 0
    out = capsys.readouterr().out
    assert "  (triage -> bookings)\n[bookings] ok: terse handoff" in out


def test_chat_waits_for_a_long_turn() -> None:
    """A turn may take minutes: only connecting is timed."""
    built: list[httpx.Client] = []

    class Recorded(httpx.Client):
        def __init__(self, **kwargs: object) -> None:
            super().__init__(**kwargs)  # type: ignore[arg-type]
            built.append(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(chat.httpx, "Client", Recorded)
        assert run_chat("http://127.0.0.1:9", "t1", stdin=io.StringIO("")) == 0
    (client,) = built
    assert client.timeout.read is None
    assert client.timeout.connect is not None


def test_chat_sends_each_line_with_a_message_id_of_its_own(server: FakeServer) -> None:
    assert run_chat(server.url, "t1", stdin=io.StringIO("hello\nhello\n")) == 0
    ids = server.ids_of("hello")
    assert len(ids) == 2 and all(ids) and ids[0] != ids[1]  # both answered: two turns


def test_chat_retries_a_lost_answer_with_the_same_message_id(
    server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """The server answers a repeated id from the stored turn, so the line runs once."""
    assert run_chat(server.url, "t1", stdin=io.StringIO("cut\ncut\nhello\n")) == 1
    out, err = capsys.readouterr()
    assert "error: no answer yet (" in err
    assert "the turn may still complete; type the same line again" in err
    assert "cannot reach" not in err
    assert "[bookings] ok: cut" in out and "[bookings] ok: hello" in out
    first, retry = server.ids_of("cut")
    assert first == retry
    assert server.ids_of("hello") != [first]


def test_chat_tells_a_timeout_from_a_server_it_cannot_reach(
    server: FakeServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A short read timeout stands in for a connection that stops answering mid-turn.
    monkeypatch.setattr(chat, "_TIMEOUT", httpx.Timeout(0.2, connect=10.0))
    assert run_chat(server.url, "t1", stdin=io.StringIO("hang\nhello\n")) == 1
    out, err = capsys.readouterr()
    assert "error: no answer yet (timed out): the turn may still complete" in err
    assert "[bookings] ok: hello" in out  # the session goes on


def test_chat_goes_on_when_it_cannot_reach_the_server(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as unused:  # a port nothing listens on once closed
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    assert run_chat(url, "t1", stdin=io.StringIO("hello\nagain\n")) == 1
    err = capsys.readouterr().err
    assert err.count(f"error: cannot reach {url}: ") == 2
    assert "no answer yet" not in err


def test_chat_keeps_httpx_request_logs_out_of_the_conversation(
    server: FakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)  # as the stickyray command configures logging
    httpx_log = logging.getLogger("httpx")
    before = httpx_log.level  # other modules quieten it too: start from a loud one
    httpx_log.setLevel(logging.NOTSET)
    try:
        assert run_chat(server.url, "t1", stdin=io.StringIO("hello\n")) == 0
        assert server.ids_of("hello")
        assert [r for r in caplog.records if r.name.startswith(("httpx", "httpcore"))] == []
        assert httpx_log.level == logging.NOTSET  # as it was before
    finally:
        httpx_log.setLevel(before)


def test_chat_skips_a_line_that_is_not_utf8_on_a_strict_stdin(
    server: FakeServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As with PYTHONIOENCODING=utf-8:strict: such bytes must not end the chat."""
    strict = io.TextIOWrapper(io.BytesIO(b"caf\xe9\nhello\n"), encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stdin", strict)
    assert run_chat(server.url, "t1") == 0
    out, err = capsys.readouterr()
    assert "error: that line is not UTF-8, so it was not sent" in err
    assert "[bookings] ok: hello" in out
    assert [post["text"] for post in server.posts] == ["hello"]
