"""The memory schema's migrations: each step applied once, in order, under one lock."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import asyncpg

__all__ = ["EMBEDDING_INDEX", "MIGRATIONS", "MIGRATION_LOCK", "Migration", "migrate"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Migration:
    """One schema step, applied once: a ``str.format`` template whose ``{dimension}`` is the
    embedding width (so literal braces are doubled)."""

    version: int
    sql: str


# The HNSW index over the embeddings: made by step 2, and made again by a re-embedding.
EMBEDDING_INDEX = (
    "CREATE INDEX memories_embedding_idx ON memories"
    " USING hnsw (embedding vector_cosine_ops) WITH (m = 16, ef_construction = 64)"
)

# fillfactor 70 leaves room on each page for the new version of a row whose access count a
# search bumps, so that UPDATE is HOT. Without it (rows are ~1.7 KB, four to a full page)
# every hit was re-inserted into the HNSW graph, and dead entries thinned later scans:
# searches took 6 ms instead of 1.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        """
        CREATE TABLE memories (
            id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
            tenant text NOT NULL,
            user_id text NOT NULL,
            agent text,
            kind text NOT NULL CHECK (kind IN ('episodic', 'semantic')),
            content text NOT NULL,
            importance real NOT NULL CHECK (importance BETWEEN 0 AND 1),
            created_at timestamptz NOT NULL,
            last_accessed_at timestamptz NOT NULL,
            access_count integer NOT NULL DEFAULT 0,
            metadata jsonb NOT NULL DEFAULT '{{}}'
        ) WITH (fillfactor = 70);
        CREATE INDEX memories_scope_idx ON memories (tenant, user_id);
        CREATE TABLE core_blocks (
            tenant text NOT NULL,
            user_id text NOT NULL,
            label text NOT NULL,
            value text NOT NULL,
            char_limit integer NOT NULL CHECK (char_limit > 0),
            updated_at timestamptz NOT NULL,
            PRIMARY KEY (tenant, user_id, label),
            CHECK (char_length(value) <= char_limit)
        );
        """,
    ),
    # pgvector on its own: the one step that needs the extension and fixes the dimension.
    Migration(
        2,
        """
        CREATE EXTENSION IF NOT EXISTS vector;
        ALTER TABLE memories ADD COLUMN embedding vector({dimension}) NOT NULL;
        """
        + EMBEDDING_INDEX,
    ),
    Migration(
        3,
        """
        ALTER TABLE memories ENABLE ROW LEVEL SECURITY;
        ALTER TABLE memories FORCE ROW LEVEL SECURITY;
        CREATE POLICY tenant_wall ON memories
            USING (tenant = current_setting('stickyray.tenant', true));
        ALTER TABLE core_blocks ENABLE ROW LEVEL SECURITY;
        ALTER TABLE core_blocks FORCE ROW LEVEL SECURITY;
        CREATE POLICY tenant_wall ON core_blocks
            USING (tenant = current_setting('stickyray.tenant', true));
        """,
    ),
    # Which model embedded the stored memories (one row), so that a change of model is
    # refused instead of searching one model's vectors with another's; `target_*` is set
    # while a re-embedding moves them to another model (memory/reembed.py).
    Migration(
        4,
        """
        CREATE TABLE stickyray_embedder (
            only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
            model text NOT NULL,
            dimension integer NOT NULL,
            target_model text,
            target_dimension integer,
            recorded_at timestamptz NOT NULL
        );
        """,
    ),
)

# The one bootstrap statement: the version table must exist before it can be read.
_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS stickyray_migrations (
    version integer PRIMARY KEY,
    applied_at timestamptz NOT NULL
)
"""
# Any fixed 64-bit key works; concurrent setups (and a re-embedding's last step) queue on it
# instead of racing DDL.
MIGRATION_LOCK = 0x5374_6963_6B79_0001


async def migrate(conn: asyncpg.Connection, dimension: int) -> None:
    """Apply every step not yet recorded; concurrent callers queue on one advisory lock."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute(_VERSION_TABLE)
    for migration in MIGRATIONS:
        async with conn.transaction():
            # Taken again per step: the step, its check and its record are one unit.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            done = await conn.fetchval(
                "SELECT true FROM stickyray_migrations WHERE version = $1", migration.version
            )
            if done:
                continue
            await conn.execute(migration.sql.format(dimension=dimension))
            await conn.execute(
                "INSERT INTO stickyray_migrations (version, applied_at) VALUES ($1, now())",
                migration.version,
            )
            log.info("applied memory migration %d", migration.version)
