"""Which model embedded the stored memories, and moving them to another model.

A search compares the query's vector with the stored ones, which means something only when
one model made both: two models of the same width give vectors of the same shape in unrelated
spaces, and a search across them returns noise without any error. So the store records its
model the first time it is set up, and a later setup with another model, or another width,
is refused.

``reembed`` moves every stored memory to a new model. It fills a second column batch by
batch, each batch committed on its own, so a run that stops halfway resumes where it was. It
then swaps that column in and rebuilds the index in one transaction. Until the swap commits,
the record names the target, and every setup is refused; a run with the model that made the
stored vectors drops the unfinished move instead.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable
from typing import Any

import asyncpg

from memory._records import unit_rows
from memory.embedders import Embedder
from memory.migrations import EMBEDDING_INDEX, MIGRATION_LOCK, migrate
from stickyray.errors import ConfigError

__all__ = ["check_embedder", "column_dimension", "reembed"]

# Held for a whole re-embedding, so that two runs never fill the same column.
_REEMBED_LOCK = 0x5374_6963_6B79_0002
_NIL = uuid.UUID(int=0)

_RECORD = "SELECT model, target_model, target_dimension FROM stickyray_embedder"

# The schemas that hold a store: `memories` beside `stickyray_migrations`, so that an
# unrelated table of that name is not taken for one.
_STORE_SCHEMAS = """
SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relname = 'memories' AND c.relkind IN ('r', 'p')
   AND EXISTS (SELECT FROM pg_class m
                WHERE m.relnamespace = c.relnamespace AND m.relname = 'stickyray_migrations')
 ORDER BY n.nspname
"""

# The schema this session's search_path finds `memories` in, if that path was set on
# purpose (in the URL, or for the role or database) rather than left at the server's default.
_CHOSEN_SCHEMA = """
SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.oid = to_regclass('memories')
   AND (SELECT source FROM pg_settings WHERE name = 'search_path') <> 'default'
"""


async def column_dimension(conn: asyncpg.Connection, column: str) -> int | None:
    """The width of ``memories.<column>``; None if the table or the column does not exist."""
    found: int | None = await conn.fetchval(
        "SELECT atttypmod FROM pg_attribute WHERE attrelid = to_regclass('memories')"
        " AND attname = $1 AND NOT attisdropped",
        column,
    )
    return found


def _mismatch(stored: str | None, stored_dimension: int, model: str, dimension: int) -> str:
    made_by = f"embedded by {stored}" if stored else "embedded"
    return (
        f"the stored memories were {made_by} ({stored_dimension} dimensions), and the memory "
        f"config gives {model} ({dimension}): set memory.embedder and memory.embedding_model "
        "back, or move the memories to the new model with `stickyray memory reembed`"
    )


async def check_embedder(conn: asyncpg.Connection, model: str, dimension: int) -> None:
    """Refuse a store whose memories another model embedded; record ``model`` if none is.

    ``model`` names the embedder (``MemoryConfig.embedder_id``). A store set up before the
    record existed is taken to hold this model's vectors when the widths agree.
    """
    stored_dimension = await column_dimension(conn, "embedding")
    assert stored_dimension is not None, "migrations make the column"
    row = await conn.fetchrow(_RECORD)
    if row is None:
        if stored_dimension != dimension:
            raise ConfigError(_mismatch(None, stored_dimension, model, dimension))
        await conn.execute(
            "INSERT INTO stickyray_embedder (model, dimension, recorded_at)"
            " VALUES ($1, $2, now()) ON CONFLICT DO NOTHING",
            model,
            dimension,
        )
        row = await conn.fetchrow(_RECORD)  # another setup may have recorded first
    if row["target_model"] is not None:
        # With no record of the old model (a store from before it), a run with the old model
        # cannot tell it from a third one: it re-embeds, so it is not offered as a way back.
        back = f" (or with {row['model']}, to drop the move)" if row["model"] else ""
        raise ConfigError(
            f"a re-embedding of the stored memories with {row['target_model']} did not "
            f"finish: run `stickyray memory reembed` again with that model configured{back}"
        )
    if (row["model"], stored_dimension) != (model, dimension):
        raise ConfigError(_mismatch(row["model"], stored_dimension, model, dimension))


async def reembed(
    conn: asyncpg.Connection,
    embedder: Embedder,
    model: str,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> int | None:
    """Re-embed every stored memory with ``embedder``, named ``model``; how many this run did.

    ``conn`` must bypass row-level security (a superuser, or the tables' owner with
    BYPASSRLS), since the memories of every tenant move. Nothing should write memories
    meanwhile: those written before the last step are re-embedded by it, but a server still
    running the old model after the swap would store that model's vectors. ``progress`` is
    called with (done, total) after each batch. None if ``model`` embedded them already; an
    unfinished move to another model is then dropped.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not await conn.fetchval(
        "SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user"
    ):
        raise ConfigError(
            "re-embedding moves every tenant's memories, and row-level security hides them "
            "from this role: set DATABASE_URL to a superuser, or to the tables' owner with "
            "BYPASSRLS"
        )
    path = await conn.fetchval("SELECT current_setting('search_path')")
    if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _REEMBED_LOCK):
        raise ConfigError("another re-embedding of this database is running")
    try:
        await _enter_store_schema(conn)
        return await _reembed(conn, embedder, model, batch_size, progress or (lambda *_: None))
    finally:
        # A connection that broke, or was cancelled mid-statement, cannot unlock; its lock
        # ends with its session, and the error that stopped the run is the one to see.
        with contextlib.suppress(Exception):
            await conn.execute(
                "SELECT pg_advisory_unlock($1), set_config('search_path', $2, false)",
                _REEMBED_LOCK,
                path,
            )


async def _enter_store_schema(conn: asyncpg.Connection) -> None:
    """Put the schema that holds the store first on this session's search_path.

    The servers find the tables on their own role's search_path (a schema of the role's own,
    say, which `"$user"` names), and this role's may not reach it. Nothing is changed when no
    schema holds a store. ConfigError when several do, unless the session's search_path was
    set to find one of them.
    """
    schemas = [row[0] for row in await conn.fetch(_STORE_SCHEMAS)]
    if not schemas:
        return
    schema = schemas[0]
    if len(schemas) > 1:
        schema = await conn.fetchval(_CHOSEN_SCHEMA)
        if schema not in schemas:
            raise ConfigError(
                f"this database holds memory tables in {len(schemas)} schemas "
                f"({', '.join(schemas)}), and re-embedding moves one store: put its schema "
                "first on the search_path in DATABASE_URL (for example "
                f"?search_path={schemas[-1]},public)"
            )
    # Ahead of the path, not in its place: pgvector's type may live in a schema on it.
    await conn.execute(
        "SELECT set_config('search_path', quote_ident($1) || ', ' || current_setting("
        "'search_path'), false)",
        schema,
    )


async def _reembed(
    conn: asyncpg.Connection,
    embedder: Embedder,
    model: str,
    batch_size: int,
    progress: Callable[[int, int], None],
) -> int | None:
    from memory.postgres import init_connection

    dimension = embedder.dimension
    stored = await column_dimension(conn, "embedding")
    if stored is None:
        raise ConfigError(
            "there are no memories to re-embed here: the memory tables do not exist (the "
            "first `stickyray serve` with memory creates them)"
        )
    # Pending schema steps run as the tables' owner, so that what they create belongs to
    # the role the servers log in as, not to this one.
    owner = await conn.fetchval(
        "SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = to_regclass('memories')"
    )
    await conn.execute("SELECT set_config('role', $1, false)", owner)
    try:
        await migrate(conn, stored)
    finally:
        await conn.execute("RESET ROLE")
    await init_connection(conn)
    row = await conn.fetchrow(_RECORD)
    if row is None:  # set up, never started: nothing says which model made its vectors
        await conn.execute(
            "INSERT INTO stickyray_embedder (model, dimension, recorded_at) VALUES ('', $1, now())",
            stored,
        )
        row = await conn.fetchrow(_RECORD)
    if (row["model"], stored) == (model, dimension):
        if row["target_model"] is not None:  # back to the model that made them: move dropped
            async with conn.transaction():
                await conn.execute("ALTER TABLE memories DROP COLUMN IF EXISTS embedding_next")
                await conn.execute(
                    "UPDATE stickyray_embedder SET target_model = NULL, target_dimension = NULL"
                )
        return None
    resuming = (row["target_model"], row["target_dimension"]) == (model, dimension)
    async with conn.transaction():
        if not resuming or await column_dimension(conn, "embedding_next") != dimension:
            await conn.execute("ALTER TABLE memories DROP COLUMN IF EXISTS embedding_next")
            await conn.execute(
                f"ALTER TABLE memories ADD COLUMN embedding_next vector({dimension})"
            )
        await conn.execute(
            "UPDATE stickyray_embedder SET target_model = $1, target_dimension = $2",
            model,
            dimension,
        )
    total = await conn.fetchval("SELECT count(*) FROM memories")
    done = await conn.fetchval("SELECT count(*) FROM memories WHERE embedding_next IS NOT NULL")
    filled = 0
    last = _NIL
    while rows := await conn.fetch(
        "SELECT id, content FROM memories WHERE id >= $1 AND embedding_next IS NULL"
        " ORDER BY id LIMIT $2",
        last,
        batch_size,
    ):
        filled += await _fill(conn, embedder, rows)
        done += len(rows)
        progress(done, max(total, done))
        last = rows[-1]["id"]
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        # Writers wait from here to the commit, and readers from the first ALTER on.
        await conn.execute("LOCK TABLE memories IN SHARE ROW EXCLUSIVE MODE")
        while rows := await conn.fetch(  # written since the pass above
            "SELECT id, content FROM memories WHERE embedding_next IS NULL LIMIT $1", batch_size
        ):
            filled += await _fill(conn, embedder, rows)
        await conn.execute("ALTER TABLE memories DROP COLUMN embedding")
        await conn.execute("ALTER TABLE memories RENAME COLUMN embedding_next TO embedding")
        await conn.execute("ALTER TABLE memories ALTER COLUMN embedding SET NOT NULL")
        await conn.execute(EMBEDDING_INDEX)
        await conn.execute(
            "UPDATE stickyray_embedder SET model = target_model, dimension = target_dimension,"
            " target_model = NULL, target_dimension = NULL, recorded_at = now()"
        )
    return int(filled)


async def _fill(conn: asyncpg.Connection, embedder: Embedder, rows: list[Any]) -> int:
    vectors = await embedder.embed([row["content"] for row in rows])
    if vectors.shape != (len(rows), embedder.dimension):
        raise ValueError(
            f"the embedder gave {vectors.shape[0]} vectors of {vectors.shape[-1]} dimensions "
            f"for {len(rows)} texts, not {embedder.dimension} dimensions each"
        )
    # Checked and normalised as the stores do every other embedding they are given.
    vectors = unit_rows(vectors, embedder.dimension)
    await conn.executemany(
        "UPDATE memories SET embedding_next = $2 WHERE id = $1",
        [(row["id"], vector) for row, vector in zip(rows, vectors, strict=True)],
    )
    return len(rows)
