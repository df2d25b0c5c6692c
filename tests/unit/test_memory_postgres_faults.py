"""The Postgres memory store under contention and faults: concurrent searches, a blocked
table, connections the server closed. Each test works in a tenant of its own."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import asyncpg
import numpy as np
import pytest

from memory.long_term import NewMemory
from memory.postgres import PostgresMemoryStore, init_connection
from stickyray.errors import StoreUnavailable

DIM = 384


def scope() -> tuple[str, str]:
    """A tenant no other test uses, and a user."""
    return f"tenant-{uuid.uuid4().hex[:10]}", "user-1"


async def wait_until(condition: Callable[[], Awaitable[bool]], within_s: float = 10.0) -> None:
    """Poll ``condition`` until it holds; fail after ``within_s`` seconds."""
    deadline = time.monotonic() + within_s
    while not await condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def vectors(n: int, seed: int = 0) -> np.ndarray:
    """``n`` random embeddings around one centre, so every search hits many of them."""
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=DIM)
    return (centre + rng.normal(scale=0.5, size=(n, DIM))).astype(np.float32)


async def test_concurrent_searches_of_one_user_do_not_deadlock(postgres_url: str) -> None:
    # How Postgres finds the rows a search touches depends on how many there are and on the
    # table's statistics: by primary key (uuid order) for a few, by a bitmap or a scan
    # (physical order) for more. One pool is pinned to the first, as a big table does for
    # small k; the other plans as this small table does.
    by_key = {"enable_bitmapscan": "off", "enable_seqscan": "off"}
    by_page: dict[str, str] = {}
    pools = [
        await asyncpg.create_pool(
            postgres_url, min_size=2, max_size=2, init=init_connection, server_settings=plan
        )
        for plan in (by_key, by_page)
    ]
    try:
        stores = [PostgresMemoryStore(pool, DIM) for pool in pools]
        await stores[0].setup()
        tenant, user = scope()
        new = [NewMemory(content=f"m{i}") for i in range(200)]
        await stores[0].add(tenant, user, new, vectors(200))
        await pools[0].execute("ANALYZE memories")  # so the planner knows the user has 200
        queries = vectors(100, seed=1)

        async def search(store: PostgresMemoryStore, query: np.ndarray, k: int) -> str:
            try:
                hits = await store.search(tenant, user, query, k=k)
            except Exception as exc:
                return type(exc).__name__
            return "ok" if len(hits) == k else f"{len(hits)} hits"

        outcomes: Counter[str] = Counter()
        for query in queries:
            # The same query with different k: overlapping rows, locked in either order.
            searches = [search(stores[i % 2], query, (10, 20, 30, 40)[i]) for i in range(4)]
            outcomes.update(await asyncio.gather(*searches))
    finally:
        for pool in pools:
            await pool.close()
    assert outcomes == {"ok": 400}


async def test_a_search_does_not_wait_for_a_row_another_transaction_holds(
    postgres_url: str,
) -> None:
    tenant, user = scope()
    async with PostgresMemoryStore.from_url(postgres_url, DIM, pool_size=1) as store:
        await store.setup()
        held, _ = await store.add(
            tenant, user, [NewMemory(content="held"), NewMemory(content="free")], vectors(2)
        )
        other = await asyncpg.connect(postgres_url)
        try:
            async with other.transaction():
                await other.execute("SELECT set_config('stickyray.tenant', $1, true)", tenant)
                await other.execute(
                    "SELECT 1 FROM memories WHERE id = $1 FOR UPDATE", uuid.UUID(held.id)
                )
                hits = await asyncio.wait_for(store.search(tenant, user, vectors(1)[0], k=2), 5)
        finally:
            await other.close()
    # Both are found; only the free one's access was counted.
    counts = {hit.memory.content: hit.memory.access_count for hit in hits}
    assert counts == {"held": 0, "free": 1}


async def test_a_locked_table_is_store_unavailable_not_a_hang(postgres_url: str) -> None:
    tenant, user = scope()
    async with PostgresMemoryStore.from_url(
        postgres_url, DIM, pool_size=1, command_timeout=1.0, acquire_timeout=0.2
    ) as store:
        await store.setup()
        await store.add(tenant, user, [NewMemory(content="x")], vectors(1))
        holder = await asyncpg.connect(postgres_url)  # as a REINDEX or an ALTER TABLE would
        try:
            async with holder.transaction():
                await holder.execute("LOCK TABLE memories IN ACCESS EXCLUSIVE MODE")
                blocked = asyncio.create_task(store.search(tenant, user, vectors(1)[0], k=1))

                async def waiting() -> bool:
                    query = "SELECT count(*) FROM pg_locks WHERE NOT granted AND pid <> $1"
                    return bool(await holder.fetchval(query, holder.get_server_pid()))

                await wait_until(waiting)
                # The one pooled connection is taken: the next search gives up waiting for it...
                started = time.monotonic()
                with pytest.raises(StoreUnavailable, match="TimeoutError"):
                    await asyncio.wait_for(store.search(tenant, user, vectors(1)[0], k=1), 5)
                assert time.monotonic() - started < 1.0
                # ...and the server ends the one waiting for the lock, before its command
                # timeout would.
                with pytest.raises(StoreUnavailable, match="canceling statement due to"):
                    await asyncio.wait_for(blocked, 5)
        finally:
            await holder.close()
        assert len(await store.search(tenant, user, vectors(1)[0], k=1)) == 1


def waiting_for_a_lock(holder: asyncpg.Connection, name: str) -> Callable[[], Awaitable[bool]]:
    """Whether a backend of the connections named ``name`` waits for a lock."""

    async def condition() -> bool:
        query = (
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE application_name = $1 AND wait_event_type = 'Lock'"
        )
        return bool(await holder.fetchval(query, name))

    return condition


async def test_the_server_ends_a_statement_stuck_behind_a_lock_and_the_connection_stays(
    postgres_url: str,
) -> None:
    tenant, user = scope()
    url, name = named(postgres_url)
    async with PostgresMemoryStore.from_url(url, DIM, pool_size=1, command_timeout=2.0) as store:
        await store.setup()
        await store.add(tenant, user, [NewMemory(content="x")], vectors(1))
        holder = await asyncpg.connect(postgres_url)
        try:
            backends = "SELECT array_agg(pid) FROM pg_stat_activity WHERE application_name = $1"
            before = await holder.fetchval(backends, name)
            async with holder.transaction():
                await holder.execute("LOCK TABLE memories IN ACCESS EXCLUSIVE MODE")
                # Not the client's TimeoutError, after which the connection is closed.
                with pytest.raises(StoreUnavailable, match=r"due to (statement|lock) timeout"):
                    await asyncio.wait_for(store.search(tenant, user, vectors(1)[0], k=1), 5)
            assert await holder.fetchval(backends, name) == before  # rolled back, and kept
        finally:
            await holder.close()
        assert len(await store.search(tenant, user, vectors(1)[0], k=1)) == 1


@pytest.mark.parametrize("how", ["cancelled", "timed out"])
async def test_a_search_given_up_leaves_no_backend_waiting_for_the_lock(
    postgres_url: str, how: str
) -> None:
    """Closing the connection does not end a backend waiting for a lock: the cancel does.

    Without the server's own limit (as with a pool made elsewhere), so only that is tested.
    """
    tenant, user = scope()
    url, name = named(postgres_url)
    timeout = 0.5 if how == "timed out" else 30.0
    async with PostgresMemoryStore.from_url(
        url, DIM, pool_size=1, command_timeout=timeout, statement_timeout=None
    ) as store:
        await store.setup()
        await store.add(tenant, user, [NewMemory(content="x")], vectors(1))
        holder = await asyncpg.connect(postgres_url)
        try:
            async with holder.transaction():
                await holder.execute("LOCK TABLE memories IN ACCESS EXCLUSIVE MODE")
                search = asyncio.create_task(store.search(tenant, user, vectors(1)[0], k=1))
                waiting = waiting_for_a_lock(holder, name)
                await wait_until(waiting)
                if how == "cancelled":  # the caller went away
                    search.cancel()
                    with pytest.raises(asyncio.CancelledError):
                        await search
                else:
                    with pytest.raises(StoreUnavailable, match="TimeoutError"):
                        await asyncio.wait_for(search, 5)

                async def gone() -> bool:
                    return not await waiting()

                # Before the fix the backend waited until the lock was released.
                await wait_until(gone, within_s=5)
        finally:
            await holder.close()
        assert len(await store.search(tenant, user, vectors(1)[0], k=1)) == 1


async def test_a_read_only_server_answers_searches_without_counting_them(
    postgres_url: str,
) -> None:
    """As a hot standby does: reads work, writes are StoreUnavailable (a 503)."""
    tenant, user = scope()
    async with PostgresMemoryStore.from_url(postgres_url, DIM, pool_size=1) as store:
        await store.setup()
        (stored,) = await store.add(tenant, user, [NewMemory(content="x")], vectors(1))
        await store.put_core(tenant, user, "persona", "kind", 100)
    read_only = {"default_transaction_read_only": "on"}
    pool = await asyncpg.create_pool(
        postgres_url, min_size=1, max_size=1, init=init_connection, server_settings=read_only
    )
    try:
        store = PostgresMemoryStore(pool, DIM)
        for _ in range(2):  # the connection is fine after the refused count
            (hit,) = await store.search(tenant, user, vectors(1)[0], k=1)
            assert (hit.memory.id, hit.memory.access_count) == (stored.id, 0)
        assert [block.value for block in await store.get_core(tenant, user)] == ["kind"]
        writes = [
            store.add(tenant, user, [NewMemory(content="y")], vectors(1)),
            store.delete(tenant, user, stored.id),
            store.put_core(tenant, user, "persona", "other", 100),
            store.delete_core(tenant, user, "persona"),
        ]
        for write in writes:
            with pytest.raises(StoreUnavailable, match="read-only transaction"):
                await write
    finally:
        await pool.close()


class _Refused:
    """A pooled connection on a server that fails every statement with ``error``."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def acquire(self, **_: object) -> _Refused:
        return self

    async def __aenter__(self) -> _Refused:
        return self

    async def __aexit__(self, *_: object) -> None:
        pass

    def transaction(self) -> _Refused:
        return self

    async def start(self) -> None:
        pass

    async def rollback(self) -> None:
        pass

    async def execute(self, *args: object) -> str:
        raise self.error


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.DiskFullError("could not extend file: No space left on device"),
        asyncpg.OutOfMemoryError("out of memory"),
        asyncpg.ConfigurationLimitExceededError("temporary file size exceeds temp_file_limit"),
    ],
    ids=["disk full", "out of memory", "limit exceeded"],
)
async def test_a_server_short_of_resources_is_store_unavailable(error: Exception) -> None:
    store = PostgresMemoryStore(_Refused(error), DIM)
    with pytest.raises(StoreUnavailable, match=str(error)):
        await store.get_core("tenant", "user")


@pytest.mark.parametrize("setting", ["statement_timeout", "lock_timeout"])
async def test_the_servers_own_timeouts_are_store_unavailable(
    postgres_url: str, setting: str
) -> None:
    tenant, user = scope()
    pool = await asyncpg.create_pool(
        postgres_url,
        min_size=1,
        max_size=1,
        init=init_connection,
        server_settings={setting: "100"},
    )
    holder = await asyncpg.connect(postgres_url)
    try:
        store = PostgresMemoryStore(pool, DIM)
        await store.setup()
        await store.add(tenant, user, [NewMemory(content="x")], vectors(1))
        async with holder.transaction():
            await holder.execute("LOCK TABLE memories IN ACCESS EXCLUSIVE MODE")
            with pytest.raises(StoreUnavailable, match="canceling statement"):
                await asyncio.wait_for(store.search(tenant, user, vectors(1)[0], k=1), 5)
    finally:
        await holder.close()
        await pool.close()


def named(url: str) -> tuple[str, str]:
    """``url`` with an application name of its own, and that name."""
    name = f"faults-{uuid.uuid4().hex[:8]}"
    return f"{url}{'&' if '?' in url else '?'}application_name={name}", name


def terminate_backends(postgres_url: str, name: str) -> int:
    """Terminate the backends of connections named ``name``; returns once they are gone.

    From another thread and event loop, so the caller's loop does not see its connections
    close until it next runs: as when it was busy, or the server restarted meanwhile.
    """
    terminated: list[int] = []

    async def terminate() -> None:
        admin = await asyncpg.connect(postgres_url)
        try:
            query = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            terminated.append(len(await admin.fetch(f"{query} WHERE application_name = $1", name)))

            async def gone() -> bool:
                count = "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
                return bool(await admin.fetchval(count, name) == 0)

            await wait_until(gone)
        finally:
            await admin.close()

    worker = threading.Thread(target=asyncio.run, args=(terminate(),))
    worker.start()
    worker.join()
    return terminated[0]


async def test_connections_the_server_closed_while_idle_are_replaced(postgres_url: str) -> None:
    """As after a Postgres restart: every pooled connection is dead, the server is back."""
    tenant, user = scope()
    url, name = named(postgres_url)
    async with PostgresMemoryStore.from_url(url, DIM, pool_size=4) as store:
        await store.setup()
        await store.add(tenant, user, [NewMemory(content="x")], vectors(1))

        async def search() -> int:
            return len(await store.search(tenant, user, vectors(1)[0], k=1))

        assert await asyncio.gather(*(search() for _ in range(4))) == [1] * 4  # 4 connections
        assert terminate_backends(postgres_url, name) == 4
        assert await asyncio.gather(*(search() for _ in range(4))) == [1] * 4


async def test_a_connection_lost_during_a_search_is_store_unavailable(postgres_url: str) -> None:
    tenant, user = scope()
    url, name = named(postgres_url)
    lose = False

    def clock() -> datetime:
        # A search reads the time between its SELECT and its UPDATE, inside its transaction.
        if lose:
            terminate_backends(postgres_url, name)
        return datetime.now(UTC)

    async with PostgresMemoryStore.from_url(url, DIM, pool_size=1, clock=clock) as store:
        await store.setup()
        await store.add(tenant, user, [NewMemory(content="x")], vectors(1))
        lose = True
        # Not asyncpg's "cannot call Transaction.__aexit__()" InterfaceError (a 500).
        with pytest.raises(StoreUnavailable, match="closed in the middle of operation"):
            await store.search(tenant, user, vectors(1)[0], k=1)


@asynccontextmanager
async def frozen_store(
    postgres_url: str, command_timeout: float
) -> AsyncIterator[Callable[[], Awaitable[int]]]:
    """A search of a one-connection store holding one memory, whose backend is frozen
    (SIGSTOP) inside the block and thawed after it."""
    tenant, user = scope()
    url, name = named(postgres_url)
    async with PostgresMemoryStore.from_url(
        url, DIM, pool_size=1, command_timeout=command_timeout
    ) as store:
        await store.setup()
        await store.add(tenant, user, [NewMemory(content="x")], vectors(1))
        admin = await asyncpg.connect(postgres_url)
        try:
            query = "SELECT pid FROM pg_stat_activity WHERE application_name = $1"
            (backend,) = [row["pid"] for row in await admin.fetch(query, name)]
        finally:
            await admin.close()

        async def search() -> int:
            return len(await store.search(tenant, user, vectors(1)[0], k=1))

        try:
            os.kill(backend, signal.SIGSTOP)
        except PermissionError:
            pytest.skip("cannot signal the Postgres server's processes")
        try:
            yield search
        finally:
            os.kill(backend, signal.SIGCONT)
        assert await search() == 1  # the store works again


async def test_a_frozen_server_is_store_unavailable_after_one_timeout(postgres_url: str) -> None:
    """An unresponsive backend (or a half-open network path): no answer, no error."""
    async with frozen_store(postgres_url, command_timeout=2.0) as search:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="TimeoutError"):
            await asyncio.wait_for(search(), 10)
        # One timeout and the short wait for the cancel request to go out (2.5 s), not a
        # second timeout waiting for a ROLLBACK, or the cancellation, on that backend (4 s).
        assert time.monotonic() - started < 3.5


async def test_a_search_cancelled_on_a_frozen_server_is_cancelled_at_once(
    postgres_url: str,
) -> None:
    """A rollback would wait out the command timeout, then surface as StoreUnavailable."""
    async with frozen_store(postgres_url, command_timeout=5.0) as search:
        started = time.monotonic()
        with pytest.raises(TimeoutError):  # the caller's own deadline, not the store's
            await asyncio.wait_for(search(), 0.5)
        assert time.monotonic() - started < 3.0, "the cancellation waited for the server"
