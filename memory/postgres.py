"""The MemoryStore in Postgres with pgvector: HNSW search, and two walls between tenants.

Wall one: every query filters by tenant and user in its WHERE clause. Wall two: row-level
security, enabled and FORCE'd on both tables (so it binds the table owner too), with a policy
that admits only rows of the tenant named by ``stickyray.tenant``; every transaction sets that
first. A query that forgets its WHERE clause still sees one tenant's rows and no other's.
Superusers and BYPASSRLS roles skip RLS entirely, so connect as an ordinary role
(``setup()`` warns otherwise).

Pools need the pgvector codec on every connection: pass ``init=init_connection`` to
``asyncpg.create_pool`` (``from_url`` does).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import asyncpg
import numpy as np
from asyncpg import exceptions as pgerr

from memory._pg_connections import (
    DEFAULT_TIMEOUT_S,
    SERVER_SHARE,
    init_connection,
    server_limits,
    transaction,
    unavailable,
)
from memory._pg_search import (
    DEFAULT_EF_SEARCH,
    MAX_EF_SEARCH,
    MIN_CANDIDATES,
    OVERSAMPLE,
    SELECT,
    TOUCH,
    exact_pass,
    real,
    record_of,
    score_rows,
)
from memory._records import (
    check_names,
    check_new,
    check_room,
    core_block,
    new_records,
    now_utc,
    rank,
    unit_rows,
)
from memory.long_term import (
    CoreBlock,
    MemoryHit,
    MemoryKind,
    MemoryRecord,
    NewMemory,
    SearchWeights,
)
from memory.migrations import migrate
from memory.reembed import check_embedder, column_dimension
from stickyray.errors import ConfigError

__all__ = [
    "DEFAULT_EF_SEARCH",
    "DEFAULT_TIMEOUT_S",
    "PostgresMemoryStore",
    "init_connection",
]

log = logging.getLogger(__name__)


# The first key of the per-user transaction lock that counting core blocks takes (the
# two-key form: its own space, apart from the migrations' one-key locks).
_CORE_LOCK = 0x5374_0001


class PostgresMemoryStore:
    """MemoryStore on an asyncpg pool (whose ``init`` must be :func:`init_connection`).

    ``ef_search`` is the floor of pgvector's ``hnsw.ef_search`` per query (see
    ``DEFAULT_EF_SEARCH``); a query for k results raises it to the candidates it fetches.
    ``acquire_timeout`` bounds the wait for a pooled connection (None: no bound); bound each
    statement with the pool's ``command_timeout``, and ``statement_timeout`` a little under
    it: each transaction sets the server's ``statement_timeout`` and ``lock_timeout`` to that
    many seconds, so the server ends a statement before the client gives up on it (None:
    the server's own settings). ``embedder_id`` names the model the embeddings come from
    (``MemoryConfig.embedder_id``): ``setup()`` records it in a new store and refuses a store
    that another model filled (see memory/reembed.py).
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        dimension: int = 384,
        clock: Callable[[], datetime] = now_utc,
        ef_search: int = DEFAULT_EF_SEARCH,
        acquire_timeout: float | None = DEFAULT_TIMEOUT_S,
        embedder_id: str | None = None,
        statement_timeout: float | None = None,
    ) -> None:
        if dimension < 1:
            raise ValueError(f"dimension must be at least 1, got {dimension}")
        if statement_timeout is not None and statement_timeout <= 0:
            raise ValueError(f"statement_timeout must be positive, got {statement_timeout}")
        self._pool = pool
        self._dimension = dimension
        self._clock = clock
        self._ef_search = ef_search
        self._acquire_timeout = acquire_timeout
        self._embedder_id = embedder_id
        self._limits = server_limits(statement_timeout)
        self._read_only_seen = False

    @classmethod
    @asynccontextmanager
    async def from_url(
        cls,
        url: str,
        dimension: int = 384,
        *,
        pool_size: int = 10,
        command_timeout: float | None = DEFAULT_TIMEOUT_S,
        acquire_timeout: float | None = DEFAULT_TIMEOUT_S,
        **options: Any,
    ) -> AsyncIterator[PostgresMemoryStore]:
        """A store on a new pool for ``url``, closed on exit; ``options`` go to the store.

        A statement that runs past ``command_timeout`` seconds, or a wait for a connection
        past ``acquire_timeout``, raises StoreUnavailable. The server is told to end a
        statement, or a wait for a lock, a little before ``command_timeout``.
        """
        with unavailable():
            pool = await asyncpg.create_pool(
                url,
                min_size=1,
                max_size=pool_size,
                init=init_connection,
                timeout=10.0,
                command_timeout=command_timeout,
            )
        if command_timeout is not None:
            options.setdefault("statement_timeout", command_timeout * SERVER_SHARE)
        try:
            yield cls(pool, dimension, acquire_timeout=acquire_timeout, **options)
        finally:
            await pool.close()

    @property
    def dimension(self) -> int:
        """Length of the embeddings this store holds."""
        return self._dimension

    async def setup(self) -> None:
        """Apply pending migrations, then check the embedder.

        With ``embedder_id``, ConfigError if another model's memories are stored; without,
        ValueError if they have another dimension.
        """
        with unavailable():
            async with self._pool.acquire(timeout=self._acquire_timeout) as conn:
                await migrate(conn, self._dimension)
                await self._check(conn)
        # Connections opened before the extension existed have no vector codec yet.
        await self._pool.expire_connections()
        with unavailable():
            async with self._pool.acquire(timeout=self._acquire_timeout) as conn:
                probe = await conn.fetchval("SELECT '[1]'::vector")
        if isinstance(probe, str):  # without the codec, asyncpg gives the text form
            raise ConfigError(
                "the pgvector codec is not registered on the pool's connections: "
                "create the pool with init=memory.postgres.init_connection"
            )

    async def _check(self, conn: asyncpg.Connection) -> None:
        if self._embedder_id is not None:
            await check_embedder(conn, self._embedder_id, self._dimension)
        else:
            found = await column_dimension(conn, "embedding")
            if found != self._dimension:
                raise ValueError(
                    f"store holds {found}-dimensional embeddings, embedder gives "
                    f"{self._dimension}: use the embedder the store was set up with, or a new "
                    "database"
                )
        if await conn.fetchval(
            "SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user"
        ):
            log.warning(
                "Postgres role bypasses row-level security: only WHERE clauses keep tenants apart"
            )

    @asynccontextmanager
    async def _scoped(
        self, tenant: str, settings: dict[str, str] | None = None
    ) -> AsyncIterator[asyncpg.Connection]:
        """A connection in a transaction whose RLS tenant is ``tenant``, plus local settings
        (the server's limits first, so ``settings`` may override them)."""
        values = {"stickyray.tenant": tenant, **self._limits, **(settings or {})}
        async with transaction(self._pool, self._acquire_timeout, values) as conn:
            yield conn

    async def add(
        self, tenant: str, user_id: str, memories: list[NewMemory], embeddings: np.ndarray
    ) -> list[MemoryRecord]:
        """Store memories with their (n, dimension) embeddings; returns the stored records."""
        rows = check_new(memories, embeddings, self._dimension)
        now = self._clock()
        records = [
            record.model_copy(update={"importance": real(record.importance)})
            for record in new_records(tenant, user_id, memories, now)
        ]
        if not records:
            return []
        async with self._scoped(tenant) as conn:
            await conn.executemany(
                "INSERT INTO memories (id, tenant, user_id, agent, kind, content, embedding,"
                " importance, created_at, last_accessed_at, access_count, metadata)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, 0, $10::jsonb)"
                " ON CONFLICT (id) DO NOTHING",
                [
                    (
                        uuid.UUID(r.id),
                        tenant,
                        user_id,
                        r.agent,
                        r.kind,
                        r.content,
                        row,
                        r.importance,
                        now,
                        json.dumps(r.metadata),
                    )
                    for r, row in zip(records, rows, strict=True)
                ],
            )
            given = [uuid.UUID(m.id) for m in memories if m.id is not None]
            if given:
                # Some may have been stored before: what is stored is what is returned.
                found = await conn.fetch(
                    f"SELECT {SELECT} FROM memories"
                    " WHERE tenant = $1 AND user_id = $2 AND id = ANY($3::uuid[])",
                    tenant,
                    user_id,
                    given,
                )
                stored = {row["id"]: record_of(tenant, user_id, row) for row in found}
                for key in given:
                    if str(key) not in stored:  # row-level security hides the other tenant's
                        raise ValueError(f"memory id {key} is taken by another tenant or user")
                records = [stored.get(r.id, r) for r in records]
        return records

    async def search(
        self,
        tenant: str,
        user_id: str,
        embedding: np.ndarray,
        k: int,
        kinds: list[MemoryKind] | None = None,
        agent: str | None = None,
        weights: SearchWeights | None = None,
    ) -> list[MemoryHit]:
        """The k best memories of (tenant, user) by combined score, best first.

        Candidates come from the HNSW index, then are re-ranked by ``combined_score``.
        """
        check_names(tenant=tenant, user_id=user_id, agent=agent)
        query = unit_rows(embedding, self._dimension)[0]
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        if k == 0:
            return []
        weights = weights or SearchWeights()
        # LIMIT takes a bigint; a k past it asks for every row anyway.
        wanted = min(max(OVERSAMPLE * k, MIN_CANDIDATES), 2**63 - 1)
        where = "tenant = $1 AND user_id = $2"
        args: list[Any] = [tenant, user_id, query, wanted]
        if kinds is not None:
            args.append(list(kinds))
            where += f" AND kind = ANY(${len(args)}::text[])"
        if agent is not None:
            args.append(agent)
            where += f" AND (agent IS NULL OR agent = ${len(args)})"
        select = f"SELECT {SELECT}, embedding <=> $3 AS distance FROM memories WHERE {where}"
        # An HNSW scan yields at most ef_search rows, so it must cover the candidates; past
        # pgvector's limit the scan comes back short and the exact pass below runs.
        ef_search = min(max(self._ef_search, wanted), MAX_EF_SEARCH)
        settings = {
            "hnsw.ef_search": str(ef_search),
            # The access-count UPDATE makes every search a write; waiting for its WAL flush
            # would cost more than the search. A crash may lose the last few counts, no more.
            "synchronous_commit": "off",
        }
        async with self._scoped(tenant, settings) as conn:
            rows = await conn.fetch(f"{select} ORDER BY embedding <=> $3 LIMIT $4", *args)
            if len(rows) < wanted:
                # pgvector 0.6 filters AFTER the HNSW scan: the scan yields the ef_search
                # nearest rows of the whole table, and the WHERE clause then drops other
                # users' rows (and other kinds/agents), so a selective filter can leave fewer
                # candidates than wanted, even none. 0.8's hnsw.iterative_scan would keep
                # scanning; 0.6 has no such thing, so a short pass is redone exactly: `+ 0`
                # makes the ORDER BY an expression no index can serve, so the planner scans
                # the (tenant, user_id) btree and sorts. That returns fewer only if fewer rows
                # match at all, and costs one distance per matching row.
                rows = await conn.fetch(f"{select} ORDER BY (embedding <=> $3) + 0 LIMIT $4", *args)
            now = self._clock()
            scored = score_rows(tenant, user_id, rows, now, weights)
            hits = rank(scored, k)
            if len(rows) == wanted and len(hits) == k:
                query = (where, args)
                hits = await exact_pass(
                    conn, tenant, user_id, scored, query, now, k, weights, widen_to=ef_search
                )
            ids = [uuid.UUID(hit.memory.id) for hit in hits]
            touched = await self._touch(conn, tenant, user_id, ids, now)
            if touched is None:
                return hits
            fresh = {
                row["id"]: {"access_count": row[1], "last_accessed_at": row[2]} for row in touched
            }
            kept = set(fresh)
            if len(kept) < len(hits):
                # Skipped: locked by a concurrent search (returned, uncounted) or deleted
                # since the SELECT (READ COMMITTED: left out).
                rows = await conn.fetch(
                    "SELECT id::text FROM memories"
                    " WHERE tenant = $1 AND user_id = $2 AND id = ANY($3::uuid[])",
                    tenant,
                    user_id,
                    [key for key in ids if str(key) not in fresh],
                )
                kept.update(row["id"] for row in rows)
        return [
            hit.model_copy(
                update={"memory": hit.memory.model_copy(update=fresh.get(hit.memory.id, {}))}
            )
            for hit in hits
            if hit.memory.id in kept
        ]

    async def _touch(
        self,
        conn: asyncpg.Connection,
        tenant: str,
        user_id: str,
        ids: list[uuid.UUID],
        now: datetime,
    ) -> list[asyncpg.Record] | None:
        """Count the hits as accesses: their new counts, or None if the server is read-only.

        The count is a recency hint, so a hot standby (or a database set read-only) still
        answers searches. The failed UPDATE aborts the transaction; it wrote nothing, and its
        COMMIT rolls it back.
        """
        try:
            return await conn.fetch(TOUCH, tenant, user_id, ids, now)
        except pgerr.ReadOnlySQLTransactionError:
            level = logging.DEBUG if self._read_only_seen else logging.INFO
            self._read_only_seen = True
            log.log(level, "postgres is read-only: searches do not count their hits as accesses")
            return None

    async def delete(self, tenant: str, user_id: str, memory_id: str) -> bool:
        """Delete one memory; False if (tenant, user) has no memory with that id."""
        check_names(tenant=tenant, user_id=user_id)
        try:
            key = uuid.UUID(memory_id)
        except ValueError:
            return False  # no memory has an id that is not a UUID
        async with self._scoped(tenant) as conn:
            status = await conn.execute(
                "DELETE FROM memories WHERE tenant = $1 AND user_id = $2 AND id = $3",
                tenant,
                user_id,
                key,
            )
        return bool(status == "DELETE 1")

    async def get_core(self, tenant: str, user_id: str) -> list[CoreBlock]:
        """Every core block of (tenant, user), by label."""
        check_names(tenant=tenant, user_id=user_id)
        async with self._scoped(tenant) as conn:
            rows = await conn.fetch(
                'SELECT label, value, char_limit AS "limit", updated_at FROM core_blocks'
                ' WHERE tenant = $1 AND user_id = $2 ORDER BY label COLLATE "C"',
                tenant,
                user_id,
            )
        return [CoreBlock(**dict(row.items())) for row in rows]

    async def put_core(
        self,
        tenant: str,
        user_id: str,
        label: str,
        value: str,
        limit: int,
        max_blocks: int | None = None,
    ) -> CoreBlock:
        """Create or replace a core block (see MemoryStore.put_core).

        With ``max_blocks``, the user's blocks are counted under a transaction lock of that
        user's own, so two writers of new labels (two replicas, one turn each) take turns.
        """
        check_names(tenant=tenant, user_id=user_id)
        block = core_block(label, value, limit, self._clock())
        async with self._scoped(tenant) as conn:
            if max_blocks is not None:
                await conn.execute(
                    "SELECT pg_advisory_xact_lock($1,"
                    " hashtext(json_build_array($2::text, $3::text)::text))",
                    _CORE_LOCK,
                    tenant,
                    user_id,
                )
                labels = await conn.fetch(
                    "SELECT label FROM core_blocks WHERE tenant = $1 AND user_id = $2",
                    tenant,
                    user_id,
                )
                check_room(block.label, [row["label"] for row in labels], max_blocks)
            await conn.execute(
                "INSERT INTO core_blocks (tenant, user_id, label, value, char_limit, updated_at)"
                " VALUES ($1, $2, $3, $4, $5, $6)"
                " ON CONFLICT (tenant, user_id, label) DO UPDATE SET value = EXCLUDED.value,"
                " char_limit = EXCLUDED.char_limit, updated_at = EXCLUDED.updated_at",
                tenant,
                user_id,
                block.label,
                block.value,
                block.limit,
                block.updated_at,
            )
        return block

    async def delete_core(self, tenant: str, user_id: str, label: str) -> bool:
        """Delete one core block; False if (tenant, user) has none with that label."""
        check_names(tenant=tenant, user_id=user_id, label=label)
        async with self._scoped(tenant) as conn:
            status = await conn.execute(
                "DELETE FROM core_blocks WHERE tenant = $1 AND user_id = $2 AND label = $3",
                tenant,
                user_id,
                label,
            )
        return bool(status == "DELETE 1")
