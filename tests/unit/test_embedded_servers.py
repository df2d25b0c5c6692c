"""The embedded servers start from relative data directories, as with the default `.stickyray`."""

from __future__ import annotations

from pathlib import Path

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
