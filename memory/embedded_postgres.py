"""A real Postgres 16 with pgvector for machines without one, through ``pgserver``.

The server listens on a unix socket only (no TCP port), in the data directory, which only
the server's user can enter. pgserver would move the socket to a world-writable directory
under ``/tmp`` when the data directory's path is too long for one, and every local user could
then connect as the superuser (the cluster trusts local connections); ``start()`` refuses
such a path instead. ``start()`` returns a URL
for a login role that is neither a superuser nor BYPASSRLS: superusers skip row-level
security even on FORCE'd tables, so connecting as ``postgres`` would quietly take down the
second tenant wall that :class:`memory.postgres.PostgresMemoryStore` relies on.

Run as root, pgserver creates a system user ``pgserver`` (``useradd``) to own the data and
run the server, and widens the permissions of every parent directory of the data directory
(``g+rx,o+rx``) so that user can reach it. ``useradd`` lives in ``/usr/sbin``, which a
minimal ``PATH`` (cron, ``env -i``, some CI runners) leaves out; ``start()`` adds the system
directories to ``PATH`` when it would otherwise not be found.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

__all__ = ["EmbeddedPostgres", "prepare_database"]

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_SYSTEM_USER = "pgserver"  # the user pgserver creates to run the server as, when root
_SYSTEM_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")
# sockaddr_un.sun_path is 108 bytes on Linux, the terminating NUL included.
_MAX_SOCKET_PATH_BYTES = 107

# Run by psql as the superuser. pgvector 0.6 is not a trusted extension, so the vector
# extension is created here: the application role could not do it, and its migration's
# CREATE EXTENSION IF NOT EXISTS is then a no-op.
_BOOTSTRAP = """
SELECT 'CREATE ROLE {role} LOGIN NOSUPERUSER NOBYPASSRLS'
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}')\\gexec
SELECT 'CREATE DATABASE {database} OWNER {role}'
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '{database}')\\gexec
\\connect {database}
CREATE EXTENSION IF NOT EXISTS vector;
"""


def ensure_useradd_on_path() -> None:
    """Put the directory holding ``useradd`` on ``PATH`` when running as root without it.

    pgserver calls ``useradd`` by name the first time it runs as root on a machine; with
    ``/usr/sbin`` missing from ``PATH`` that fails with a bare FileNotFoundError.
    """
    if os.geteuid() != 0 or shutil.which("useradd"):
        return
    try:
        pwd.getpwnam(_SYSTEM_USER)
        return  # made on an earlier run: pgserver will not call useradd
    except KeyError:
        pass
    found = shutil.which("useradd", path=os.pathsep.join(_SYSTEM_DIRS))
    if found is None:
        raise RuntimeError(
            "embedded Postgres runs as root and needs `useradd` (package `passwd`) to create "
            "its system user `pgserver`; install it, or set DATABASE_URL to an existing Postgres"
        )
    directory = os.path.dirname(found)
    os.environ["PATH"] = os.pathsep.join(p for p in (os.environ.get("PATH", ""), directory) if p)
    log.info("added %s to PATH for pgserver's useradd", directory)


class EmbeddedPostgres:
    """Starts Postgres with its data in ``data_dir``; ``start()`` returns an asyncpg URL."""

    def __init__(
        self, data_dir: Path, database: str = "stickyray", role: str = "stickyray"
    ) -> None:
        for what, name in (("database", database), ("role", role)):
            if not _NAME.match(name):
                raise ValueError(f"{what} name {name!r} must match {_NAME.pattern}")
        self._data_dir = data_dir.resolve()  # pgserver keeps it; the cwd may change
        self._database = database
        self._role = role
        self._server: Any = None

    @property
    def data_dir(self) -> Path:
        """The server's data directory."""
        return self._data_dir

    @property
    def url(self) -> str:
        """``postgresql://`` URL of the application role and database (after ``start``)."""
        return self._uri(self._role, self._database)

    @property
    def admin_url(self) -> str:
        """URL of the ``postgres`` superuser (after ``start``); bypasses row-level security."""
        return self._uri("postgres", self._database)

    def _uri(self, user: str, database: str) -> str:
        if self._server is None:
            raise RuntimeError("EmbeddedPostgres is not started")
        # postgresql://user:@/database?host=/socket/dir: asyncpg and psql both read the
        # host query parameter as "the unix socket in that directory".
        uri: str = self._server.get_postmaster_info().get_uri(user=user, database=database)
        return uri

    def start(self) -> str:
        """Start the server (or reuse the one serving ``data_dir``), bootstrap, return ``url``."""
        import pgserver

        socket = self._data_dir / ".s.PGSQL.5432"
        if len(os.fsencode(socket)) > _MAX_SOCKET_PATH_BYTES:
            raise ValueError(
                f"data directory path too long for the Postgres socket: {self._data_dir} "
                f"({len(os.fsencode(socket))} bytes with the socket's name, at most "
                f"{_MAX_SOCKET_PATH_BYTES}); set STICKYRAY_DATA_DIR to a shorter path, or "
                "DATABASE_URL"
            )
        self._data_dir.parent.mkdir(parents=True, exist_ok=True)
        self._forget_dead_handles()
        self._forget_stale_postmaster_pid()
        ensure_useradd_on_path()
        self._server = pgserver.get_server(self._data_dir, cleanup_mode="stop")
        script = _BOOTSTRAP.format(role=self._role, database=self._database)
        self._psql(self._uri("postgres", "postgres"), script)
        log.info("embedded Postgres at %s (data in %s)", self.url, self._data_dir)
        return self.url

    @staticmethod
    def holders(data_dir: Path) -> list[int]:
        """Live processes other than this one holding the server of ``data_dir`` (a running
        ``stickyray serve`` holds it for as long as it serves)."""
        import psutil
        from pgserver.postgres_server import PostgresServer

        handles = data_dir / ".handle_pids.json"
        with PostgresServer._lock:
            pids = json.loads(handles.read_text()) if handles.exists() else []
        return [pid for pid in pids if pid != os.getpid() and psutil.pid_exists(pid)]

    def _forget_dead_handles(self) -> None:
        # pgserver stops the server when the last process holding a handle lets go, and
        # counts holders in this file. A holder killed with SIGKILL never lets go, so without
        # this every later stop() would leave the server running.
        # pgserver reads and writes the file under its own lock, across processes; so does
        # this, or a holder added by a process starting at the same moment could be lost.
        import psutil
        from pgserver.postgres_server import PostgresServer

        handles = self._data_dir / ".handle_pids.json"
        with PostgresServer._lock:
            if handles.exists():
                pids = json.loads(handles.read_text())
                alive = [pid for pid in pids if psutil.pid_exists(pid)]
                if alive != pids:
                    handles.write_text(json.dumps(alive))

    def _forget_stale_postmaster_pid(self) -> None:
        # A server that died with its machine or container (power loss, OOM, kill -9) leaves
        # postmaster.pid behind, and its pid may since belong to another process. pgserver
        # would take that process for the server, fail to reach it, then SIGTERM it on clean-
        # up; Postgres itself would refuse to start while it lives. Only a live postgres of
        # this data dir keeps the file.
        from pgserver.postgres_server import PostgresServer

        pidfile = self._data_dir / "postmaster.pid"
        with PostgresServer._lock:  # a start in another process may be writing it
            try:
                pid = int(pidfile.read_text().split("\n", 1)[0])
            except (OSError, ValueError):
                return  # none, or not one Postgres wrote: left to Postgres to judge
            if _postmaster_of(pid, self._data_dir):
                return
            log.warning(
                "removing %s: pid %d in it is no Postgres of this data dir (left by a server "
                "that did not stop cleanly)",
                pidfile,
                pid,
            )
            pidfile.unlink(missing_ok=True)

    def running(self) -> bool:
        """Whether the server ``start`` reached is still running."""
        import psutil

        if self._server is None:
            return False
        process = self._server.get_postmaster_info().process
        try:
            return bool(process.is_running()) and process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def _psql(self, uri: str, script: str) -> None:
        from pgserver._commands import POSTGRES_BIN_PATH

        # ON_ERROR_STOP: without it psql reports a failed statement and still exits 0.
        done = subprocess.run(
            [str(POSTGRES_BIN_PATH / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", uri],
            input=script,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode != 0:
            raise RuntimeError(f"bootstrapping embedded Postgres failed: {done.stderr.strip()}")

    def stop(self) -> None:
        """Stop the server, unless another process still holds a pgserver handle on it."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.cleanup()  # cleanup_mode="stop": stops, keeps the data
        # pgserver keeps the object per data dir and hands it back to the next get_server
        # without counting this process as a holder again; a later start must count.
        from pgserver.postgres_server import PostgresServer

        with PostgresServer._lock:
            PostgresServer._instances.pop(self._data_dir, None)


def _postmaster_of(pid: int, data_dir: Path) -> bool:
    """Whether ``pid`` is a live postgres serving ``data_dir`` (True when that cannot be
    told: such a file is left alone)."""
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        if "postgres" not in process.name():
            return False
        cmdline = process.cmdline()
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True
    if str(data_dir) in cmdline:  # pg_ctl starts it as `postgres -D <data dir> ...`
        return True
    try:
        return Path(process.cwd()) == data_dir  # the postmaster runs in its data dir
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def prepare_database(
    database_url: str | None, data_dir: Path, dimension: int, embedder_id: str
) -> tuple[str, EmbeddedPostgres | None]:
    """The memory database's URL, migrated and checked against the embedder (ConfigError if
    another model's memories are stored): ``database_url``, or an embedded server.

    Without a URL, a server is started with its data in ``data_dir``; it is returned so the
    caller can stop it (``None`` otherwise).
    """
    import asyncio

    from memory.postgres import PostgresMemoryStore

    postgres = None
    url = database_url
    if url is None:
        postgres = EmbeddedPostgres(data_dir)
        url = postgres.start()

    async def migrate(url: str) -> None:
        # No statement timeout: a migration may build an index over every stored memory, and
        # a setup running elsewhere holds the migration lock until it is done.
        async with PostgresMemoryStore.from_url(
            url, dimension=dimension, command_timeout=None, embedder_id=embedder_id
        ) as store:
            await store.setup()

    try:
        asyncio.run(migrate(url))
    except BaseException:
        if postgres is not None:
            postgres.stop()
        raise
    return url, postgres
