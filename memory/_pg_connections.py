"""Postgres connections for the memory store: the pgvector codec, the errors that make the
store unavailable, and the transaction every query runs in (its tenant set for row-level
security, the server's limits under the client's).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import asyncpg
from asyncpg import exceptions as pgerr
from pgvector.asyncpg import register_vector

from stickyray.errors import StoreUnavailable

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DOWN",
    "SERVER_SHARE",
    "init_connection",
    "server_limits",
    "transaction",
    "unavailable",
]

log = logging.getLogger(__name__)

# What the store reports as unavailable (StoreUnavailable: a 503), not as a failure.
DOWN: tuple[type[BaseException], ...] = (
    OSError,  # refused, no socket file, and TimeoutError: command_timeout, pool acquire
    pgerr.PostgresConnectionError,  # class 08, including "closed in the middle of operation"
    pgerr.AdminShutdownError,
    pgerr.CrashShutdownError,
    pgerr.CannotConnectNowError,
    pgerr.InsufficientResourcesError,  # class 53: too many connections, disk full, out of memory
    pgerr.QueryCanceledError,  # the server's statement_timeout, or an operator's cancel
    pgerr.LockNotAvailableError,  # the server's lock_timeout
    pgerr.ReadOnlySQLTransactionError,  # a write to a standby, or a read-only database
)

# What a connection the server closed while it sat in the pool fails with.
_STALE: tuple[type[BaseException], ...] = (
    ConnectionError,  # reset, broken pipe
    pgerr.ConnectionDoesNotExistError,  # "connection was closed in the middle of operation"
    pgerr.AdminShutdownError,  # the server's goodbye: terminated, or shutting down
)

# How long a statement, or a wait for a pooled connection, may take before the store is
# unavailable (a 503) rather than a hang: a frozen server, or a table locked by a reindex.
DEFAULT_TIMEOUT_S = 10.0

# The server's own limit, as a share of the client's command timeout. The server gives up
# first, so the statement ends there too: a client that gives up closes the connection, and a
# backend waiting for a lock does not notice that, so it would keep its connection slot.
SERVER_SHARE = 0.9

# How long a connection given up mid-statement waits for asyncpg's request to cancel that
# statement before it is closed (closing cancels the request). Enough for the request to
# reach the server, and on a server that answers, for its reply.
_CANCEL_WAIT_S = 0.5

# The schema pgvector's type lives in: `public` usually, but managed Postgres often installs
# extensions into their own schema (on the search_path), and the codec must name it.
_VECTOR_SCHEMA = """
SELECT n.nspname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
 WHERE t.typname = 'vector' ORDER BY pg_type_is_visible(t.oid) DESC, n.nspname LIMIT 1
"""


async def init_connection(conn: asyncpg.Connection) -> None:
    """Pool ``init``: register the pgvector codec (skipped until the store's ``setup()``
    creates it)."""
    schema = await conn.fetchval(_VECTOR_SCHEMA)
    if schema is not None:
        await register_vector(conn, schema=schema)


@contextmanager
def unavailable() -> Iterator[None]:
    """Raise StoreUnavailable for an error that means the server is down or refusing (DOWN)."""
    try:
        yield
    except DOWN as exc:
        raise StoreUnavailable("postgres", str(exc) or type(exc).__name__) from exc


def server_limits(statement_timeout: float | None) -> dict[str, str]:
    """The settings that make the server end a statement, or a wait for a lock, after
    ``statement_timeout`` seconds (None: none, the server's own settings hold)."""
    if statement_timeout is None:
        return {}
    limit = str(max(1, round(statement_timeout * 1000)))  # ms; 0 would be no limit
    return {"statement_timeout": limit, "lock_timeout": limit}


@asynccontextmanager
async def transaction(
    pool: asyncpg.Pool, acquire_timeout: float | None, settings: dict[str, str]
) -> AsyncIterator[asyncpg.Connection]:
    """A pooled connection in a transaction with ``settings`` set locally (``set_config``);
    an error that means the server is unavailable, in it or around it, is StoreUnavailable.

    A pooled connection the server closed while it sat idle (a restart, an idle timeout)
    fails its first statement; nothing was done on it yet, so one other is tried.
    """
    calls = ", ".join(f"set_config(${2 * i + 1}, ${2 * i + 2}, true)" for i in range(len(settings)))
    args = [x for kv in settings.items() for x in kv]
    with unavailable():
        for retry in (False, True):
            async with pool.acquire(timeout=acquire_timeout) as conn:
                started = conn.transaction()
                begun = False
                try:
                    await started.start()
                    await conn.execute(f"SELECT {calls}", *args)
                    begun = True
                    yield conn
                    await started.commit()
                    return
                except BaseException as exc:
                    # Not asyncpg's transaction block: on a lost connection it raises
                    # InterfaceError in place of the error that says what happened.
                    await _abandon(conn, started, exc)
                    if begun or retry or not isinstance(exc, _STALE):
                        raise
                log.info("postgres closed a pooled connection; trying another")


async def _abandon(conn: asyncpg.Connection, transaction: Any, exc: BaseException) -> None:
    """End a transaction that ``exc`` interrupted, without replacing ``exc``.

    A timed-out or cancelled statement may still be running on a frozen server, and a
    rollback would wait for it (up to the command timeout) before the cancellation could
    go on: the connection is closed instead, once asyncpg's request to cancel the statement
    is through or ``_CANCEL_WAIT_S`` has passed. So is one whose rollback fails. (A second
    cancellation during that wait ends it, and is what is raised.)
    """
    if not isinstance(exc, TimeoutError | asyncio.CancelledError):
        try:
            await transaction.rollback()
            return
        except Exception:  # lost, or BEGIN never happened: nothing to keep
            pass
    try:
        # Closing the connection would cancel asyncpg's request to cancel the statement (its
        # tasks are in a private set, hence getattr), and a backend waiting for a lock does
        # not notice that its client left: it would wait on, in its connection slot.
        pending = [task for task in getattr(conn, "_cancellations", ()) if not task.done()]
        if pending:
            await asyncio.wait(pending, timeout=_CANCEL_WAIT_S)
    finally:  # also when the caller cancels the wait
        # A connection the server dropped is already back with its pool, which replaces it.
        with contextlib.suppress(pgerr.InterfaceError):
            conn.terminate()
