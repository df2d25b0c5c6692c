"""``stickyray serve`` as users run it: a bad config, and a full restart on the same data."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import yaml

from stickyray.testing import FakeLLMServer, FakeReply
from tests.conftest import free_port
from tests.e2e.conftest import wait_for
from tests.e2e.teams import openai_team

pytestmark = pytest.mark.slow


def _env(tmp_path: Path, fake: FakeLLMServer) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "RAY_ADDRESS")}
    env.update(
        STICKYRAY_DATA_DIR=str(tmp_path / "data"),
        OPENAI_API_KEY="test-key",
        OPENAI_BASE_URL=fake.openai_base_url,
        STICKYRAY_LLM_MAX_RETRIES="0",
    )
    return env


def test_bad_config_exits_before_ray_starts(tmp_path: Path, fake_llm: FakeLLMServer) -> None:
    config = tmp_path / "agents.yaml"
    team = openai_team()
    team["specialists"][0]["handoffs"] = ["nobody"]
    team["supervisor"]["temprature"] = 0.3
    config.write_text(yaml.safe_dump(team))
    done = subprocess.run(
        [sys.executable, "-m", "stickyray.cli", "serve", "--config", str(config)],
        env=_env(tmp_path, fake_llm),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert str(config) in done.stderr
    assert "supervisor.temprature" in done.stderr
    assert "serving" not in done.stdout
    assert not (tmp_path / "data").exists(), "nothing may start for a rejected config"


class Server:
    """One ``stickyray serve`` process."""

    def __init__(self, config: Path, port: int, env: dict[str, str]) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "stickyray.cli",
                "serve",
                "--config",
                str(config),
                "--port",
                str(port),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        wait_for(self._ready, timeout=180, what="stickyray serve to print its URL")
        assert httpx.get(f"{self.url}/healthz", timeout=10).status_code == 200

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            self._reader.join(timeout=10)
            raise AssertionError("serve exited early:\n" + "".join(self.lines))
        return any(f"at {self.url}" in line for line in self.lines)

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=120)
        self._reader.join(timeout=10)
        out = "".join(self.lines)
        assert self.proc.returncode == 0, out
        return out


def test_restart_keeps_active_agent_and_buffer(tmp_path: Path, fake_llm: FakeLLMServer) -> None:
    fake_llm.on(agent="triage", reply=FakeReply.tool_call("transfer_to_bookings", {"reason": "b"}))
    fake_llm.on(agent="bookings", reply=lambda r: FakeReply.text(f"ok: {r.last_user_text}"))
    config = tmp_path / "agents.yaml"
    config.write_text(yaml.safe_dump(openai_team()))
    env = _env(tmp_path, fake_llm)
    port = free_port()

    server = Server(config, port, env)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            first = client.post("/v1/threads/keep-me/messages", json={"text": "book a table"})
            assert first.json()["agent"] == "bookings"
            before = client.get("/v1/threads/keep-me").json()
    finally:
        output = server.stop()
    assert "shutting down" in output

    server = Server(config, port, env)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            after = client.get("/v1/threads/keep-me").json()
            assert after == before
            assert after["active_agent"] == "bookings" and after["turns"] == 1
            follow = client.post("/v1/threads/keep-me/messages", json={"text": "for 2 people"})
            assert (follow.json()["agent"], follow.json()["turn"]) == ("bookings", 2)
    finally:
        server.stop()
    assert [r.agent for r in fake_llm.requests] == ["triage", "bookings", "bookings"]
