"""`stickyray serve`'s stops: Ctrl-C and SIGTERM, an interrupted start-up, and an embedded
server that dies while it serves. Ray never starts (serve_without_ray stubs it)."""

from __future__ import annotations

import io
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import redis
import yaml

import stickyray.cli
import stickyray.serve_command
from stickyray.config import sample_config_path
from stickyray.serve_command import StopRequests
from tests.conftest import free_port
from tests.unit.test_cli import no_memory_team

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def stop_signals() -> Iterator[None]:
    """Puts back the SIGINT and SIGTERM handlers `stickyray serve` replaces."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def _locks_taken(call: Callable[[], object]) -> list[str]:
    """The locks ``call`` takes, a stream's included (its buffer has one)."""
    lock_types = (type(threading.Lock()), type(threading.RLock()))
    taken: list[str] = []

    def profile(frame: object, event: str, arg: object) -> None:
        if event != "c_call":
            return
        owner = getattr(arg, "__self__", None)
        if isinstance(owner, lock_types) and getattr(arg, "__name__", "") in (
            "acquire",
            "__enter__",
        ):
            taken.append(repr(owner))
        elif arg is print or isinstance(owner, io.IOBase):
            taken.append(f"{arg!r} (a stream)")

    sys.setprofile(profile)
    try:
        call()
    finally:
        sys.setprofile(None)
    return taken


def test_a_stop_request_takes_no_lock() -> None:
    """The handler runs between two bytecodes of the main thread, wherever it is: a lock
    that thread holds (Event.wait holds its Condition's, print the stream's) would never be
    given back, and the process would hang with its servers running."""
    starting = StopRequests()
    assert _locks_taken(starting.request) == []  # the first, during start-up, says so
    with pytest.raises(KeyboardInterrupt):
        _locks_taken(starting.request)  # the second aborts
    up = StopRequests()
    up.settled()
    assert _locks_taken(up.request) == []


def test_a_real_signal_ends_the_wait(stop_signals: None) -> None:
    stop = StopRequests()
    stop.settled()
    stop.catch_signals()
    checks: list[float] = []

    def check() -> None:
        checks.append(time.monotonic())

    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        assert stop.wait(check, every_s=0.05) is None  # a stop, not a reason from check
    finally:
        timer.cancel()
    assert checks, "the check ran while waiting"


class Serve:
    """`stickyray serve` in its own session, with its output read as it comes."""

    def __init__(self, tmp_path: Path, memory: bool) -> None:
        config = yaml.safe_load(sample_config_path().read_text()) if memory else no_memory_team()
        path = tmp_path / "agents.yaml"
        path.write_text(yaml.safe_dump(config))
        self.data = tmp_path / "data"
        port = str(free_port())  # never a port something on this machine holds
        env = dict(
            os.environ, STICKYRAY_DATA_DIR=str(self.data), STICKYRAY_PORT=port, HF_HUB_OFFLINE="1"
        )
        for var in ("REDIS_URL", "DATABASE_URL", "RAY_ADDRESS", "STICKYRAY_CONFIG"):
            env.pop(var, None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.unit.serve_without_ray", "serve", "--config", str(path)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, text: str, timeout_s: float = 120.0) -> None:
        """Until a line holding ``text`` is printed (AssertionError after ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        while not any(text in line for line in self.lines):
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {text!r} in:\n{''.join(self.lines)}") from None
            if line is None:
                raise AssertionError(f"exited before {text!r}:\n{''.join(self.lines)}")
            self.lines.append(line)

    def exit_code(self, timeout_s: float) -> int:
        """The exit code (AssertionError if it does not exit within ``timeout_s``)."""
        try:
            code = self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout_s} s") from None
        self.wait_for_output_end()
        return code

    def wait_for_output_end(self) -> None:
        while (line := self._queue.get(timeout=30)) is not None:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def servers(self) -> list[psutil.Process]:
        """The redis-server and postgres processes of its data dir still running."""
        found = []
        for process in psutil.process_iter(["name", "cmdline"]):
            cmdline = " ".join(process.info["cmdline"] or [])
            if process.info["name"] in ("redis-server", "postgres") and str(self.data) in cmdline:
                found.append(process)
        return found

    def close(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        for process in self.servers():
            process.kill()


@pytest.fixture
def serving(tmp_path: Path) -> Iterator[list[Serve]]:
    started: list[Serve] = []
    yield started
    for serve in started:
        serve.close()


def test_sigterm_while_serving_shuts_down_cleanly(tmp_path: Path, serving: list[Serve]) -> None:
    """ray.init puts in Ray's own SIGTERM handler, which exits 15 at once."""
    serve = Serve(tmp_path, memory=False)
    serving.append(serve)
    serve.wait_for("Ctrl-C to stop")
    assert serve.servers(), "the embedded Redis runs"
    serve.process.send_signal(signal.SIGTERM)
    assert serve.exit_code(60) == 0, serve.output
    assert "stickyray: shutting down" in serve.output
    assert serve.servers() == [], "the embedded Redis was stopped"


@pytest.mark.parametrize("which", ["Redis", "Postgres"])
def test_an_embedded_server_that_dies_while_serving_stops_serve(
    tmp_path: Path, serving: list[Serve], which: str
) -> None:
    """Every request needing it would fail until serve is started again: exit, non-zero, so
    a supervisor does that."""
    serve = Serve(tmp_path, memory=which == "Postgres")
    serving.append(serve)
    serve.wait_for("Ctrl-C to stop")
    if which == "Redis":
        client = redis.Redis(unix_socket_path=str(serve.data / "redis" / "redis.sock"))
        pid = int(client.info("server")["process_id"])
        client.close()
    else:
        pid = int((serve.data / "postgres" / "postmaster.pid").read_text().split()[0])
    os.kill(pid, signal.SIGKILL)  # the OOM killer
    assert serve.exit_code(60) == 1, serve.output
    assert f"the embedded {which} (data in {serve.data}" in serve.output
    assert "stopped while serving; shutting down" in serve.output
    assert all(p.pid != pid for p in serve.servers())
    assert serve.servers() == [], "the servers still running were stopped"


def test_a_start_step_that_fails_after_ctrl_c_is_an_interrupted_start(
    stop_signals: None,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    redis_url: str,
) -> None:
    """A terminal's Ctrl-C reaches the whole process group: initdb and pg_ctl die of it."""
    import ray

    def killed_by_ctrl_c(team: object, settings: object) -> None:
        signal.raise_signal(signal.SIGINT)  # what the terminal sends stickyray...
        raise subprocess.CalledProcessError(-signal.SIGINT, ["initdb"])  # ...and initdb

    def no_ray(**_: object) -> None:
        raise AssertionError("Ray must not start")

    monkeypatch.setattr(stickyray.serve_command, "_start_memory", killed_by_ctrl_c)
    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("STICKYRAY_PORT", str(free_port()))
    assert stickyray.cli.main(["serve", "--config", str(sample_config_path())]) == 130
    err = capfd.readouterr().err
    assert "stickyray: start-up interrupted; stopped what started" in err
    assert "cannot start" not in err
